"""Where each stage keeps its outputs under ``VOXELFLOW_HOME``, and small safe-write helpers."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Layout:
    """Paths of one pipeline's stores; names follow the stage they serve."""

    home: Path
    pipeline: str

    @property
    def dataset_dir(self) -> Path:
        return self.home / "datasets" / self.pipeline

    @property
    def raw_store(self) -> Path:
        return self.dataset_dir / "raw.zarr"

    @property
    def ledger(self) -> Path:
        return self.dataset_dir / "ledger.jsonl"

    @property
    def quarantine_dir(self) -> Path:
        return self.dataset_dir / "quarantine"

    def preprocessed_store(self, transform_digest: str) -> Path:
        return self.dataset_dir / "preprocessed" / f"{transform_digest}.zarr"

    def checkpoint_dir(self, run_key: str) -> Path:
        return self.home / "checkpoints" / self.pipeline / run_key

    @property
    def audit_log(self) -> Path:
        return self.home / "audit.log"

    @property
    def api_keys(self) -> Path:
        return self.home / "api-keys.json"

    @property
    def reports_dir(self) -> Path:
        return self.home / "reports" / self.pipeline


def sha256_bytes(*blobs: bytes) -> str:
    h = hashlib.sha256()
    for blob in blobs:
        h.update(hashlib.sha256(blob).digest())
    return h.hexdigest()


def digest_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see the old or the new content, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True, default=str) + "\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
