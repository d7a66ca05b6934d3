"""The ingestion ledger: one row per arrived object with its state (``ingested``, ``duplicate`` or
``quarantined``), the rows of a case's objects, the cases a new one supersedes, and the dataset it holds."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update

from voxelflow.core import audit
from voxelflow.core.db import Database, ledger
from voxelflow.core.storage import sha256_bytes


def dataset_digest(case_ids: list[str]) -> str:
    """The digest of a dataset: of its case ids, in any order."""
    return sha256_bytes(*(c.encode() for c in sorted(case_ids)))[:16]


def ingested_cases(db: Database, pipeline: str) -> list[str]:
    """Every case the ledger says was ingested for ``pipeline``: the dataset."""
    with db.transaction() as conn:
        rows = conn.execute(
            select(ledger.c.case_id).where(ledger.c.pipeline == pipeline, ledger.c.state == "ingested",
                                           ledger.c.superseded_by.is_(None)).distinct()
        ).all()
    return sorted(r.case_id for r in rows)


def rows_of(conn, pipeline: str, objects: list[str], *columns) -> list:
    """The ledger rows (``columns``, default all) of these object keys, one query per 500 keys."""
    query = select(*columns) if columns else select(ledger)
    rows: list = []
    for i in range(0, len(objects), 500):
        rows += conn.execute(query.where(ledger.c.pipeline == pipeline, ledger.c.object.in_(objects[i:i + 500])))
    return rows


def known_hashes(conn, pipeline: str, objects: list[str]) -> dict[str, set[str]]:
    """Object key -> the hashes the ledger holds for it."""
    known: dict[str, set[str]] = {}
    for r in rows_of(conn, pipeline, objects, ledger.c.object, ledger.c.sha256):
        known.setdefault(r.object, set()).add(r.sha256)
    return known


def case_ingested(conn, pipeline: str, case_id: str) -> bool:
    """Whether the ledger holds an ``ingested`` row of this case."""
    return conn.execute(
        select(ledger.c.id).where(ledger.c.pipeline == pipeline, ledger.c.case_id == case_id,
                                  ledger.c.state == "ingested").limit(1)
    ).first() is not None


def supersede(conn, db: Database, pipeline: str, new: str, objects: list[str], shas: dict[str, str],
              dups: set[str], rows: list) -> list[dict[str, Any]]:
    """A new case that holds every object of earlier cases replaces them in the dataset.

    That is a DICOM series whose slices arrived in two batches, a label that came after its image,
    or a file replaced under its name: the earlier case would otherwise stay in the dataset beside
    the new one (a half volume, an unlabelled copy, the old label). Rows of this case's objects
    with the same bytes move to the new case (quarantined ones too: the grouping they were
    quarantined in, a series with missing slices, is gone); the earlier cases' other rows (older
    bytes under these names) stay as they were, marked ``superseded_by``, as do quarantined rows of
    earlier bytes under these names (``missing-file`` before an object existed, ``truncated`` while it
    was being copied). A case that shares only some objects with the new one (two raters' labels of
    one image) is left alone. ``new`` is the new case's id, ``objects`` its object keys, ``shas`` their
    hashes, ``dups`` those holding the same bytes as another of its objects, ``rows`` the ledger's rows of
    these objects. Returns the changes, ``{case, by, regrouped}`` each (``case`` None for quarantined rows).
    """
    earlier = sorted({r.case_id for r in rows if r.case_id and r.case_id != new and r.superseded_by is None})
    members: dict[str, set[str]] = {}
    if earlier:
        for r in conn.execute(select(ledger.c.case_id, ledger.c.object).where(
                ledger.c.pipeline == pipeline, ledger.c.case_id.in_(earlier))):
            members.setdefault(r.case_id, set()).add(r.object)
    replaced = {c for c, held in members.items() if held <= set(objects)}
    moved: dict[str, int] = {}
    for r in rows:
        if shas.get(r.object) != r.sha256 or r.case_id == new:
            continue
        if r.case_id is None and r.state == "quarantined":
            was = f"quarantined ({r.reason}) in an earlier grouping"
        elif r.case_id in replaced:
            was = f"case {r.case_id}"
        else:
            continue
        conn.execute(update(ledger).where(ledger.c.id == r.id).values(
            case_id=new, state="duplicate" if r.object in dups else "ingested", reason=None,
            detail=f"regrouped into {new}, was {was}"))
        moved[r.case_id or "quarantine"] = moved.get(r.case_id or "quarantine", 0) + 1
    if replaced:
        conn.execute(update(ledger).where(ledger.c.pipeline == pipeline, ledger.c.case_id.in_(sorted(replaced)))
                     .values(superseded_by=new))
    # quarantined rows of earlier bytes under these names: named before they existed (missing-file), or
    # caught half-copied (truncated); the whole object is here now, in this case
    earlier_bytes = [r.id for r in rows if r.case_id is None and r.sha256 != shas.get(r.object)
                     and r.superseded_by is None]
    if earlier_bytes:
        conn.execute(update(ledger).where(ledger.c.id.in_(earlier_bytes)).values(superseded_by=new))
    changes = [{"case": old, "by": new, "regrouped": moved.get(old, 0)} for old in sorted(replaced)]
    if moved.get("quarantine"):
        changes.append({"case": None, "by": new, "regrouped": moved["quarantine"]})
    if changes:
        audit.append(db, "data.cases_superseded", "voxelflow", conn=conn, pipeline=pipeline, case=new,
                     superseded=[c["case"] for c in changes if c["case"]],
                     regrouped_objects=sum(c["regrouped"] for c in changes))
    return changes


def read_ledger(db: Database, pipeline: str | None = None, state: str | None = None) -> list[dict[str, Any]]:
    """Every object ever seen, oldest first, with its state and reason."""
    query = select(ledger).order_by(ledger.c.id)
    if pipeline:
        query = query.where(ledger.c.pipeline == pipeline)
    if state:
        query = query.where(ledger.c.state == state)
    with db.transaction() as conn:
        return [{**r._asdict(), "at": r.at.isoformat() if r.at else None} for r in conn.execute(query)]
