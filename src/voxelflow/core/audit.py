"""A tamper-evident audit log in the shared database: each record carries the hash of the one before.

Appending reads only the newest record (O(1)) while holding the ``audit`` lock, so concurrent
writers on any number of machines extend one chain; ``seq`` is the primary key, so a fork is
impossible even without the lock. :func:`verify` walks the chain and names the first bad record.

A chain alone cannot show that its newest records were deleted (what is left is a valid, shorter
chain), so the head (sequence number and hash) is also written somewhere the log's writer cannot
rewrite: MLflow model version tags at each promotion (:func:`anchor_in_mlflow`). :func:`verify`
checks the log against the newest such anchor.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.engine import Connection

from voxelflow.core.db import Database, audit_log
from voxelflow.core.mlflow_client import client

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


def find(db: Database, events: tuple[str, ...], **match: Any) -> dict[str, Any] | None:
    """The newest record of one of ``events`` whose details hold ``match``: how a retry finds the record an
    earlier attempt of the same move wrote, so that it is written once."""
    with db.transaction() as conn:
        rows = conn.execute(select(audit_log).where(audit_log.c.event.in_(events))
                            .order_by(audit_log.c.seq.desc())).all()
    for row in rows:
        try:
            details = json.loads(row.details)
        except ValueError:
            continue
        if isinstance(details, dict) and all(details.get(k) == v for k, v in match.items()):
            return {**row._asdict(), "details": details}
    return None


@dataclass(frozen=True)
class Sink:
    """The audit log as a registry move records itself: the record appended once and anchored on the model
    version it concerns. The registry is given one (:class:`voxelflow.release.registry.AuditSink`) and never
    imports this module."""

    db: Database
    tracking_uri: str

    def record(self, event: str, actor: str, anchor: str, once: dict[str, Any] | None = None,
               **details: Any) -> dict[str, Any]:
        """Append ``event`` (unless a record of it matching ``once`` exists: a retry's) and anchor the chain's
        head on version ``anchor`` of ``details["model"]``."""
        entry = (find(self.db, (event,), **once) if once else None) or append(self.db, event, actor, **details)
        anchor_in_mlflow(self.tracking_uri, details["model"], anchor, entry)
        return entry


def entries(db: Database) -> Iterator[dict[str, Any]]:
    """Every record, oldest first; ``details`` stays text when it is not JSON (a tampered row)."""
    with db.transaction() as conn:
        for row in conn.execute(select(audit_log).order_by(audit_log.c.seq)):
            try:
                details = json.loads(row.details)
            except ValueError:
                details = row.details
            yield {**row._asdict(), "details": details}


@dataclass(frozen=True)
class Anchor:
    """A copy of the chain's head at one moment: record ``seq`` had hash ``hash``; ``where`` it is kept."""

    seq: int
    hash: str
    where: str


@dataclass
class Verdict:
    ok: bool
    entries: int
    problem: str = ""
    head: str = GENESIS
    anchor: Anchor | None = None  # the newest anchor the log was checked against


def verify(db: Database, anchors: Iterable[Anchor] = ()) -> Verdict:
    """Check every link of the chain, then the newest anchor: a log that ends before the anchored
    record, or holds another hash there, lost or rewrote records. The first problem is named."""
    newest = max(anchors, key=lambda a: a.seq, default=None)
    prev, n = GENESIS, 0
    for entry in entries(db):
        if entry["seq"] != n:
            return Verdict(False, n, f"record {n} is missing (found {entry['seq']} next)", prev, newest)
        if entry["prev"] != prev:
            return Verdict(False, n, f"record {n} does not follow the record before it", prev, newest)
        if not isinstance(entry["details"], dict) or entry["hash"] != entry_hash(entry):
            return Verdict(False, n, f"record {n} was changed after it was written", prev, newest)
        if newest is not None and n == newest.seq and entry["hash"] != newest.hash:
            return Verdict(False, n, f"record {n} differs from the copy of the head kept in {newest.where}: "
                                     "the log was rewritten", prev, newest)
        prev = entry["hash"]
        n += 1
    if newest is not None and n <= newest.seq:
        return Verdict(False, n, f"the log ends at record {n - 1} but {newest.where} anchors record {newest.seq}: "
                                 "the newest records were deleted", prev, newest)
    return Verdict(True, n, head=prev, anchor=newest)


ANCHOR_SEQ, ANCHOR_HASH = "voxelflow.audit_seq", "voxelflow.audit_hash"


def anchor_in_mlflow(tracking_uri: str, model: str, version: str, entry: dict[str, Any]) -> Anchor:
    """Tag a model version with ``entry``'s place in the chain (call it with the entry that records
    the version's promotion). Registry errors raise: an anchor silently not written protects nothing."""
    mc = client(tracking_uri)
    mc.set_model_version_tag(model, version, ANCHOR_HASH, entry["hash"])
    mc.set_model_version_tag(model, version, ANCHOR_SEQ, str(entry["seq"]))
    return Anchor(int(entry["seq"]), entry["hash"], f"MLflow tags of {model} version {version}")


def mlflow_anchors(tracking_uri: str) -> list[Anchor]:
    """Every anchor kept in the registry's model version tags (all models). Registry errors raise."""
    mc, found, token = client(tracking_uri), [], None
    while True:
        page = mc.search_model_versions(f"tags.`{ANCHOR_SEQ}` LIKE '%'", max_results=1000, page_token=token)
        for mv in page:
            seq, digest = mv.tags.get(ANCHOR_SEQ, ""), mv.tags.get(ANCHOR_HASH, "")
            if not seq.isdigit() or len(digest) != 64:
                raise ValueError(f"model {mv.name} version {mv.version} carries a malformed audit anchor "
                                 f"({ANCHOR_SEQ}={seq!r}, {ANCHOR_HASH}={digest!r})")
            found.append(Anchor(int(seq), digest, f"MLflow tags of {mv.name} version {mv.version}"))
        token = page.token
        if not token:
            return found
