"""Watching a source for arriving data: one notice per settled batch, a cursor that survives restarts.

A :class:`Watcher` lists its source (a local folder or any fsspec URL such as ``s3://``), keeps
what it has not announced yet, and once nothing under the source has changed for ``settle_s``
seconds hands the batch to ``emit`` (the CLI sends it as the Prefect event
``voxelflow.data.arrived``). What was announced is kept in the database (table ``cursors``) after
``emit`` returns, so a restart announces neither twice what it announced before nor misses what
landed while it was down. A crash between ``emit`` and the cursor write announces that batch again:
the ingest it starts finds every object ``duplicate`` and does nothing twice.

Local folders wake the watcher through ``watchfiles`` as soon as something changes; object stores
are listed every ``poll_s`` seconds. The library never imports Prefect: ``emit`` is injected.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import fsspec
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite

from voxelflow.db import Database, cursors, now


@dataclass
class Arrival:
    """One settled batch: the objects (key, size, mtime or etag) that are new or changed."""

    source: str
    objects: list[dict[str, Any]] = field(default_factory=list)

    def payload(self) -> dict[str, Any]:
        return {"source": self.source, "objects": [o["key"] for o in self.objects],
                "sizes": [o["size"] for o in self.objects], "versions": [o["version"] for o in self.objects],
                "count": len(self.objects), "bytes": sum(o["size"] for o in self.objects)}


def _signature(info: dict[str, Any]) -> str:
    for key in ("ETag", "etag", "mtime", "LastModified", "created"):
        if info.get(key) is not None:
            return str(info[key]).strip('"')
    return ""


class Watcher:
    def __init__(self, source: str, db: Database, name: str, emit: Callable[[Arrival], None],
                 settle_s: float = 2.0, poll_s: float = 2.0) -> None:
        self.source, self.db, self.emit = source.rstrip("/"), db, emit
        self.settle_s, self.poll_s = settle_s, poll_s
        self.cursor = f"watch:{name}:{self.source}"
        self.fs, self.root = fsspec.core.url_to_fs(self.source)
        self.announced = self._load()
        self._pending: dict[str, tuple[str, int]] = {}  # key -> (version, size) seen at the last scan
        self._changed_at = 0.0

    # ------------------------------------------------------------ cursor
    def _load(self) -> dict[str, str]:
        return get_cursor(self.db, self.cursor) or {}

    def _save(self) -> None:
        set_cursor(self.db, self.cursor, self.announced)

    # ------------------------------------------------------------ scanning
    def scan(self) -> dict[str, tuple[str, int]]:
        """Every object under the source: key -> (version: etag or mtime, size). Hidden names are skipped."""
        self.fs.invalidate_cache(self.root)
        try:
            found = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        proto = self.source.split("://", 1)[0] + "://" if "://" in self.source else ""
        for path, info in found.items():
            if any(part.startswith(".") for part in path[len(self.root):].split("/")):
                continue  # temporary files of copies in progress (rsync, aws s3 cp)
            key = path if not proto or path.startswith(proto) else proto + path
            out[key] = (_signature(info), int(info.get("size") or 0))
        return out

    def step(self, at: float | None = None) -> Arrival | None:
        """Scan once; announce the unannounced objects when nothing has changed for ``settle_s``."""
        at = time.monotonic() if at is None else at
        listing = self.scan()
        fresh = {k: v for k, v in listing.items() if self.announced.get(k) != v[0]}
        if fresh != self._pending:
            self._pending, self._changed_at = fresh, at
            return None
        if not fresh or at - self._changed_at < self.settle_s:
            return None
        arrival = Arrival(self.source, [{"key": k, "version": v, "size": s} for k, (v, s) in sorted(fresh.items())])
        self.emit(arrival)
        self.announced.update({k: v for k, (v, _) in fresh.items()})
        self._save()
        self._pending = {}
        return arrival

    def run(self, stop: threading.Event) -> None:
        """Until ``stop`` is set: wake on local changes (or every ``poll_s``) and step."""
        wake = threading.Event()
        if "file" in (self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)):
            threading.Thread(target=self._local_events, args=(stop, wake), daemon=True,
                             name="voxelflow-watch-events").start()
        while not stop.is_set():
            self.step()
            if self._pending:  # wake when the batch would be settled (earlier if something changes)
                wait = min(self.poll_s, max(0.05, self._changed_at + self.settle_s - time.monotonic()))
            else:
                wait = self.poll_s
            wake.wait(wait)
            wake.clear()

    def _local_events(self, stop: threading.Event, wake: threading.Event) -> None:
        from watchfiles import watch

        for _ in watch(self.root, stop_event=stop, debounce=200, recursive=True):
            wake.set()


def get_cursor(db: Database, name: str, conn=None) -> Any:
    query = select(cursors.c.value).where(cursors.c.name == name)
    if conn is not None:
        row = conn.execute(query).first()
    else:
        with db.transaction() as c:
            row = c.execute(query).first()
    return json.loads(row.value) if row else None


def set_cursor(db: Database, name: str, value: Any, conn=None) -> None:
    values = {"name": name, "value": json.dumps(value, sort_keys=True), "updated": now()}
    dialect = postgresql if db.url.startswith("postgresql") else sqlite
    stmt = dialect.insert(cursors).values(**values).on_conflict_do_update(
        index_elements=[cursors.c.name], set_={"value": values["value"], "updated": values["updated"]})
    if conn is not None:
        conn.execute(stmt)
    else:
        with db.transaction() as c:
            c.execute(stmt)


def dataset_update(db: Database, pipeline: str, case_ids: list[str], threshold: int) -> int | None:
    """How many of ``case_ids`` (the labelled dataset) were not in the last announced dataset, when
    they reach ``threshold`` (the dataset is then recorded as announced); else None.

    Counted by case id, not by size: a case that replaced another (a corrected label, a series that
    grew) is new, although the dataset did not grow. Under the pipeline's lock, so two ingests
    finishing together announce the new cases once.
    """
    name = f"dataset-announced:{pipeline}"
    with db.locked(name) as conn:
        last = get_cursor(db, name, conn)
        if isinstance(last, int):  # recorded as a count before case ids were kept
            new = len(case_ids) - last
        else:
            new = len(set(case_ids) - set(last or ()))
        if new < threshold:
            return None
        set_cursor(db, name, sorted(case_ids), conn)
    return new
