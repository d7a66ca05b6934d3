"""A tamper-evident audit log in the shared database: each record carries the hash of the one before.

Appending reads only the newest record (O(1)) while holding the ``audit`` lock, so concurrent
writers on any number of machines extend one chain; ``seq`` is the primary key, so a fork is
impossible even without the lock. :func:`verify` walks the chain and names the first bad record.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.engine import Connection

from voxelflow.db import Database, audit_log

GENESIS = "0" * 64
FIELDS = ("seq", "at", "event", "actor", "details", "prev")


def entry_hash(entry: dict[str, Any]) -> str:
    body = {k: entry[k] for k in FIELDS}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def _append(conn: Connection, event: str, actor: str, details: dict[str, Any]) -> dict[str, Any]:
    last = conn.execute(
        select(audit_log.c.seq, audit_log.c.hash).order_by(audit_log.c.seq.desc()).limit(1)
    ).first()
    prev, seq = (last.hash, last.seq + 1) if last else (GENESIS, 0)
    entry = {
        "seq": seq,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "event": event,
        "actor": actor,
        "details": json.loads(json.dumps(details, sort_keys=True, default=str)),
        "prev": prev,
    }
    entry["hash"] = entry_hash(entry)
    conn.execute(insert(audit_log).values(**{**entry, "details": json.dumps(entry["details"], sort_keys=True)}))
    return entry


def append(db: Database, event: str, actor: str, conn: Connection | None = None, **details: Any) -> dict[str, Any]:
    """Append one event. Pass ``conn`` to join a transaction that already holds a lock."""
    if conn is not None:
        with db.locked_in(conn, "audit"):
            return _append(conn, event, actor, details)
    with db.locked("audit") as own:
        return _append(own, event, actor, details)


def entries(db: Database) -> Iterator[dict[str, Any]]:
    """Every record, oldest first; ``details`` stays text when it is not JSON (a tampered row)."""
    with db.transaction() as conn:
        for row in conn.execute(select(audit_log).order_by(audit_log.c.seq)):
            try:
                details = json.loads(row.details)
            except ValueError:
                details = row.details
            yield {**row._asdict(), "details": details}


@dataclass
class Verdict:
    ok: bool
    entries: int
    problem: str = ""
    head: str = GENESIS


def verify(db: Database) -> Verdict:
    """Check every link of the chain; the first broken one is named by its sequence number."""
    prev, n = GENESIS, 0
    for entry in entries(db):
        if entry["seq"] != n:
            return Verdict(False, n, f"record {n} is missing (found {entry['seq']} next)", prev)
        if entry["prev"] != prev:
            return Verdict(False, n, f"record {n} does not follow the record before it", prev)
        if not isinstance(entry["details"], dict) or entry["hash"] != entry_hash(entry):
            return Verdict(False, n, f"record {n} was changed after it was written", prev)
        prev = entry["hash"]
        n += 1
    return Verdict(True, n, head=prev)
