"""A tamper-evident audit log: JSON lines, each carrying the hash of the one before it."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GENESIS = "0" * 64


def _entry_hash(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def append(log: Path, event: str, actor: str, **details: Any) -> dict[str, Any]:
    """Append one event; a file lock keeps concurrent writers from forking the chain."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a+", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            fh.seek(0)
            prev, seq = GENESIS, 0
            for line in fh:
                if line.strip():
                    last = json.loads(line)
                    prev, seq = last["hash"], last["seq"] + 1
            entry = {
                "seq": seq,
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "event": event,
                "actor": actor,
                "details": details,
                "prev": prev,
            }
            entry["hash"] = _entry_hash(entry)
            fh.write(json.dumps(entry, sort_keys=True, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
    return entry


@dataclass
class Verdict:
    ok: bool
    entries: int
    problem: str = ""


def verify(log: Path) -> Verdict:
    """Check every link of the chain; the first broken one is named."""
    if not log.exists():
        return Verdict(True, 0)
    prev = GENESIS
    n = 0
    with open(log, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                return Verdict(False, n, f"line {lineno}: not valid JSON")
            if entry.get("seq") != n:
                return Verdict(False, n, f"line {lineno}: sequence {entry.get('seq')} where {n} was expected")
            if entry.get("prev") != prev:
                return Verdict(False, n, f"line {lineno}: does not follow the entry before it")
            if entry.get("hash") != _entry_hash(entry):
                return Verdict(False, n, f"line {lineno}: content was changed after it was written")
            prev = entry["hash"]
            n += 1
    return Verdict(True, n)
