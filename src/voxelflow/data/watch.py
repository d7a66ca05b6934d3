"""Watching a source for arriving data: one notice per settled batch, a cursor that survives restarts.

A :class:`Watcher` lists its source (a local folder or any fsspec URL such as ``s3://``), keeps
what it has not announced yet, and once nothing under the source has changed for ``settle_s``
seconds hands the batch to ``emit`` (the CLI sends it as the Prefect event
``voxelflow.data.arrived``). What was announced is kept in the database (table ``cursors``) after
``emit`` returns, so a restart announces neither twice what it announced before nor misses what
landed while it was down. A crash between ``emit`` and the cursor write announces that batch again,
under the same event id (:func:`announcement_id`), which Prefect's trigger service skips when it has
seen it; were it not skipped, the ingest it starts would find every object ``duplicate``.

The ingest that follows announces what it stored the same way (:func:`dataset_update`,
:func:`unlabelled_update`): the event goes out first, with an id derived from what it announces and
what was announced before, and only once it was delivered is the announcement recorded. A run that
dies in between is rerun, sends the same id again, and one lifecycle runs, not zero and not two.
An event reaches a triggered run as its ``announcement`` (event, resource, payload keys, id):
:func:`accept_announcement` refuses, and audits, one about another pipeline or carrying more than
data references (a spec, say: a triggered run takes its spec from its deployment).

Local folders wake the watcher through ``watchfiles`` as soon as something changes; object stores
are listed every ``poll_s`` seconds. The library never imports Prefect: ``emit`` is injected.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import fsspec
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite

from voxelflow.core import audit
from voxelflow.core.db import Database, cursors, now

DATA_ARRIVED, DATASET_UPDATED, CASES_UNLABELLED = ("voxelflow.data.arrived", "voxelflow.dataset.updated",
                                                   "voxelflow.cases.unlabelled")
# what an event's payload may hold: references to data (where, which objects and cases, digests), never configuration
DATA_REFERENCES = frozenset({"source", "objects", "sizes", "versions", "count", "bytes", "cases", "new_cases",
                             "dataset_digest"})
_NAMESPACE = uuid.UUID("6f0c8d2e-5b1a-4c8e-9a57-3d1f0e7b2a64")  # of voxelflow's announcement ids


# The route of a voxelflow.data.arrived event, a label of its resource that the deployments' triggers match: a
# watched folder or bucket (ingest-arrived ingests it) or a series voxelflow receive or a DICOMweb watch put in the
# spool (predict-arrived routes it). Each flow checks the route again itself; the label only spares the other run.
ROUTE_LABEL, ROUTE_SOURCE, ROUTE_SPOOL = "voxelflow.route", "source", "spool"


def resource_id(pipeline: str) -> str:
    """The Prefect resource every event about ``pipeline`` concerns (what its deployments' triggers match)."""
    return f"voxelflow.dataset.{pipeline}"


def announcement_id(event: str, pipeline: str, announced: Any, before: Any = None) -> uuid.UUID:
    """The event id of announcing ``announced`` (JSON: case ids, object versions) of ``pipeline`` as ``event``
    when ``before`` was the last thing announced: the same announcement always gets the same id, so a
    retry repeats it; any later one (even back to an earlier dataset) gets another."""
    body = json.dumps([event, pipeline, announced, before], sort_keys=True, default=str)
    return uuid.uuid5(_NAMESPACE, hashlib.sha256(body.encode()).hexdigest())


@dataclass
class Arrival:
    """One settled batch: the objects (key, size, mtime or etag) that are new or changed; ``id`` is
    its event id (the same when the batch is announced again after a crash)."""

    source: str
    objects: list[dict[str, Any]] = field(default_factory=list)
    id: uuid.UUID | None = None

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
        objects = [{"key": k, "version": v, "size": s} for k, (v, s) in sorted(fresh.items())]
        arrival = Arrival(self.source, objects, announcement_id(
            DATA_ARRIVED, self.cursor, [[o["key"], o["version"]] for o in objects],
            {k: self.announced.get(k) for k in sorted(fresh)}))
        self.emit(arrival)
        self.announced.update({k: v for k, (v, _) in fresh.items()})
        self._save()
        self._pending = {}
        return arrival

    def run(self, stop: threading.Event, on_error: Callable[[Exception], None] | None = None) -> None:
        """Until ``stop`` is set: wake on local changes (or every ``poll_s``) and step. A step that fails
        (the event was not delivered, the database is away) raises, or with ``on_error`` is reported to
        it and tried again ``poll_s`` later: nothing was recorded, so the batch is announced then."""
        wake = threading.Event()
        if "file" in (self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)):
            threading.Thread(target=self._local_events, args=(stop, wake), daemon=True,
                             name="voxelflow-watch-events").start()
        run_steps(stop, self.step, on_error, pause_s=self._pause_s, retry_s=self.poll_s, wake=wake)

    def _pause_s(self) -> float:
        if self._pending:  # wake when the batch would be settled (earlier if something changes)
            return min(self.poll_s, max(0.05, self._changed_at + self.settle_s - time.monotonic()))
        return self.poll_s

    def _local_events(self, stop: threading.Event, wake: threading.Event) -> None:
        from watchfiles import watch

        for _ in watch(self.root, stop_event=stop, debounce=200, recursive=True):
            wake.set()


def run_steps(stop: threading.Event, step: Callable[[], Any], on_error: Callable[[Exception], None] | None, *,
              pause_s: Callable[[], float], retry_s: float, wake: threading.Event | None = None) -> None:
    """The loop of a watcher or receiver: until ``stop`` is set, ``step()``, then wait ``pause_s()`` seconds
    (cut short by ``wake``, cleared after each wait, when given; by ``stop`` otherwise). A step that raises
    ends the loop with its error, or with ``on_error`` is reported to it and tried again ``retry_s`` later."""
    wake = wake if wake is not None else stop
    while not stop.is_set():
        try:
            step()
        except Exception as exc:
            if on_error is None:
                raise
            on_error(exc)
            stop.wait(retry_s)
            continue
        wake.wait(pause_s())
        if wake is not stop:
            wake.clear()


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


class AnnouncementRefused(ValueError):
    """An event a triggered run will not act on (the reason says why); the refusal is in the audit log."""


def accept_announcement(db: Database, pipeline: str, announcement: Any, event: str) -> None:
    """Refuse, and audit as ``announcement.refused``, an ``announcement`` (``{"id", "event", "resource",
    "keys"}``: the triggering event's id, name, resource and payload keys, as the deployments' triggers
    pass it) that is not ``event`` about ``pipeline``, or whose payload carries more than data references."""
    if not isinstance(announcement, dict) or not isinstance(announcement.get("keys"), list):
        reason = "the announcement is not the event's id, event, resource and payload keys"
        announcement = announcement if isinstance(announcement, dict) else {}
    elif announcement.get("event") != event:
        reason = f"the event is {announcement.get('event')!r}, this run acts on {event!r}"
    elif announcement.get("resource") != resource_id(pipeline):
        reason = (f"the event concerns {announcement.get('resource')!r}, this run's spec is the pipeline "
                  f"{pipeline!r} ({resource_id(pipeline)})")
    elif extra := sorted(str(k) for k in set(announcement["keys"]) - DATA_REFERENCES):
        reason = (f"the event's payload names {', '.join(extra)}: an event carries data references only "
                  f"({', '.join(sorted(DATA_REFERENCES))}); a triggered run takes its spec from its deployment")
    else:
        return
    audit.append(db, "announcement.refused", "voxelflow", pipeline=pipeline, announced=str(announcement.get("event")),
                 event_id=str(announcement.get("id")), reason=reason)
    raise AnnouncementRefused(f"refused event {announcement.get('id')}: {reason}")


def dataset_update(db: Database, pipeline: str, case_ids: list[str], threshold: int,
                   announce: Callable[[uuid.UUID, int], None]) -> int | None:
    """How many of ``case_ids`` (the labelled dataset) were not in the last announced dataset, when
    they reach ``threshold``; else None. Then ``announce(event_id, new)`` is called, and once it
    returned the dataset is recorded as announced: an ``announce`` that raises records nothing, and the
    next call announces the same dataset under the same id.

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
        announce(announcement_id(DATASET_UPDATED, pipeline, sorted(case_ids), last), new)
        set_cursor(db, name, sorted(case_ids), conn)
    return new


def unlabelled_update(db: Database, pipeline: str, case_ids: Iterable[str],
                      announce: Callable[[uuid.UUID, list[str]], None]) -> list[str]:
    """The unlabelled cases among ``case_ids`` not announced before (sorted), after ``announce(event_id,
    cases)`` returned and they were recorded as announced; nothing is recorded when it raises."""
    name = f"unlabelled-announced:{pipeline}"
    with db.locked(name) as conn:
        last = sorted(get_cursor(db, name, conn) or ())
        fresh = sorted(set(case_ids) - set(last))
        if not fresh:
            return []
        announce(announcement_id(CASES_UNLABELLED, pipeline, fresh, last), fresh)
        set_cursor(db, name, sorted({*last, *fresh}), conn)
    return fresh
