"""Ingestion: find arrived cases, decode and check them fully, store each as a Zarr v3 group.

Every arrived object ends in exactly one ledger state: ``ingested``, ``duplicate`` or
``quarantined`` (with a reason code). Ingestion is idempotent on content hashes.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import fsspec
import numpy as np
import xarray as xr
from sqlalchemy import insert, select

from voxelflow.config import DataSpec
from voxelflow.db import Database, ledger, now
from voxelflow.formats import NIFTI_SUFFIXES, Volume, read_nifti
from voxelflow.formats import VolumeError as QuarantineError
from voxelflow.storage import CaseStore, Layout, sha256_bytes


@dataclass(frozen=True)
class SourceCase:
    name: str
    image: str
    label: str | None = None
    outside: str | None = None  # why an entry points outside the source: never read

    @property
    def objects(self) -> list[str]:
        return [u for u in (self.image, self.label) if u]


@dataclass
class IngestReport:
    ingested: list[str] = field(default_factory=list)
    duplicate: list[str] = field(default_factory=list)
    quarantined: list[dict[str, str]] = field(default_factory=list)
    dataset_digest: str = ""
    case_ids: list[str] = field(default_factory=list)
    objects: dict[str, int] = field(default_factory=dict)  # new ledger rows by state, in objects
    seen: int = 0  # objects the ledger had already accounted for (same key, same bytes)

    def summary(self) -> dict[str, Any]:
        return {
            "ingested": len(self.ingested),
            "duplicate": len(self.duplicate),
            "quarantined": len(self.quarantined),
            "objects": dict(self.objects),
            "already_seen": self.seen,
            "cases": len(self.case_ids),
            "dataset_digest": self.dataset_digest,
        }


def _join(base: str, rel: str) -> str:
    rel = rel.removeprefix("./")
    return posixpath.join(base.rstrip("/"), rel)


def _escapes(rel: str) -> str | None:
    """Why a manifest entry would leave the source (absolute, ``..``, encoded or not), or None."""
    from urllib.parse import unquote

    decoded = rel
    for _ in range(3):  # %252e%252e is %2e%2e is ..
        decoded = unquote(decoded)
    for text in (rel, decoded):
        text = text.replace("\\", "/")
        if "://" in text or text.startswith("/") or (len(text) > 1 and text[1] == ":"):
            return f"{rel!r} is an absolute path or URL"
        if ".." in text.split("/"):
            return f"{rel!r} climbs out of the source"
    return None


def _leaves_by_link(fs, root: str, path: str) -> bool:
    """A local path whose real location (symlinks followed) is outside the real source folder."""
    import os

    if "file" not in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)):
        return False  # object stores have no links
    real_root = os.path.realpath(root)
    return os.path.commonpath([real_root, os.path.realpath(path)]) != real_root


def discover(source: str, layout: str) -> list[SourceCase]:
    """List the cases under an fsspec URL, in a stable order."""
    fs, root = fsspec.core.url_to_fs(source)
    if not fs.exists(root):
        raise FileNotFoundError(f"data source {source!r} does not exist")
    proto = source.split("://", 1)[0] + "://" if "://" in source else ""
    url = lambda p: p if not proto or p.startswith(proto) else proto + p  # noqa: E731
    cases: list[SourceCase] = []
    if layout == "decathlon":
        manifest = _join(root, "dataset.json")
        if not fs.exists(manifest):
            raise FileNotFoundError(f"{source}: decathlon layout needs a dataset.json")
        meta = json.loads(fs.cat_file(manifest))
        for i, item in enumerate(meta.get("training", [])):
            image = str(item["image"] if isinstance(item, dict) else item)
            label = item.get("label") if isinstance(item, dict) else None
            label = str(label) if label else None
            name = Path(image).name
            for suffix in NIFTI_SUFFIXES[::-1]:
                name = name.removesuffix(suffix)
            outside = next((why for why in map(_escapes, filter(None, (image, label))) if why), None)
            if outside is None:
                for rel in filter(None, (image, label)):
                    if _leaves_by_link(fs, root, _join(root, rel)):
                        outside = f"{rel!r} is a link to outside the source"
            cases.append(
                SourceCase(
                    name=name or f"case{i}",
                    # an entry outside the source is named as written and never joined, opened or read
                    image=image if outside else url(_join(root, image)),
                    label=(label if outside else url(_join(root, label))) if label else None,
                    outside=outside,
                )
            )
    elif layout == "folder":
        for entry in sorted(fs.ls(root, detail=False)):
            if not fs.isdir(entry):
                continue
            files = {posixpath.basename(f): f for f in fs.ls(entry, detail=False)}
            image = next((files[n] for n in ("image.nii.gz", "image.nii") if n in files), None)
            label = next((files[n] for n in ("label.nii.gz", "label.nii") if n in files), None)
            if image is None:
                image = next((f for n, f in sorted(files.items()) if not n.startswith("label")), None)
            if image:
                links = [f for f in (image, label) if f and _leaves_by_link(fs, root, f)]
                outside = f"{posixpath.basename(links[0])!r} is a link to outside the source" if links else None
                cases.append(SourceCase(posixpath.basename(entry), url(image), url(label) if label else None,
                                        outside))
    else:
        raise ValueError(f"unknown layout {layout!r}")
    return cases


def read_bytes(url: str) -> bytes:
    with fsspec.open(url, "rb") as fh:
        return fh.read()


def fetch(url: str, limit: int) -> tuple[bytes | None, str, int]:
    """(bytes, sha256, size) of one object, read in blocks; bytes is None when it is over ``limit``.

    The hash covers every byte either way, so an oversized object still gets its one ledger row.
    """
    h, size, kept = hashlib.sha256(), 0, bytearray()
    with fsspec.open(url, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
            size += len(block)
            if size <= limit:
                kept += block
            elif kept:
                kept = bytearray()
    return (bytes(kept) if size <= limit else None), h.hexdigest(), size


def max_object_bytes(max_voxels: int) -> int:
    """The largest file a case may arrive as: 8-byte voxels plus a header and extensions."""
    return max_voxels * 8 + (1 << 20)


def decode_nifti(data: bytes, name: str, max_voxels: int) -> Volume:
    """Decode every voxel and check it; raise :class:`QuarantineError` on anything unusable.

    NIfTI-1 and NIfTI-2, plain or gzip: the header is read first and nothing is inflated or
    allocated beyond what it declares, within ``max_voxels`` (see :mod:`voxelflow.formats`).
    """
    if not name.endswith(NIFTI_SUFFIXES):
        raise QuarantineError("unsupported-format", f"{name}: expected a NIfTI file (.nii or .nii.gz)")
    return read_nifti(data, name, max_voxels)


def check_label(image: Volume, label: Volume, name: str) -> np.ndarray:
    if label.array.shape != image.array.shape:
        raise QuarantineError(
            "label-mismatch", f"{name}: label shape {label.array.shape} differs from image {image.array.shape}"
        )
    if not np.allclose(label.affine, image.affine, atol=1e-3):
        raise QuarantineError("label-mismatch", f"{name}: label affine differs from the image's")
    values = label.array
    if np.issubdtype(values.dtype, np.floating) and not np.array_equal(values, np.round(values)):
        raise QuarantineError("bad-label", f"{name}: label holds non-integer values")
    if values.min() < 0 or values.max() > 255:
        raise QuarantineError("bad-label", f"{name}: label values must lie in 0..255")
    return values.astype(np.uint8)


def case_id_for(content_hash: str) -> str:
    return f"case-{content_hash[:16]}"


def case_dataset(image: Volume, label: np.ndarray | None, attrs: dict[str, Any]) -> xr.Dataset:
    dims = ("x", "y", "z")
    data_vars = {"image": (dims, image.array)}
    if label is not None:
        data_vars["label"] = (dims, label)
    return xr.Dataset(data_vars, attrs=attrs)


def write_case(raw: CaseStore, case_id: str, image: Volume, label: np.ndarray | None, attrs: dict[str, Any]) -> None:
    """Store one case as its own Zarr v3 store (``image``, optional ``label``) through xarray, then commit it."""
    raw.write(case_id, case_dataset(image, label, attrs), chunks=tuple(min(s, 128) for s in image.array.shape))


def load_case(raw: CaseStore, case_id: str) -> dict[str, Any]:
    """Read one ingested case back: arrays plus the geometry needed to resample it."""
    ds = raw.open(case_id)
    out = {
        "image": np.asarray(ds["image"].values),
        "affine": np.asarray(ds.attrs["affine"], dtype=np.float64),
        "attrs": dict(ds.attrs),
    }
    if "label" in ds:
        out["label"] = np.asarray(ds["label"].values)
    return out


def dataset_digest(case_ids: list[str]) -> str:
    return sha256_bytes(*(c.encode() for c in sorted(case_ids)))[:16]


def ingested_cases(db: Database, pipeline: str) -> list[str]:
    """Every case the ledger says was ingested for ``pipeline``: the dataset."""
    with db.transaction() as conn:
        rows = conn.execute(
            select(ledger.c.case_id).where(ledger.c.pipeline == pipeline, ledger.c.state == "ingested").distinct()
        ).all()
    return sorted(r.case_id for r in rows)


def _seen(conn, pipeline: str, shas: dict[str, str]) -> set[str]:
    """The objects (of ``shas``) the ledger already accounts for with these exact bytes."""
    if not shas:
        return set()
    rows = conn.execute(
        select(ledger.c.object, ledger.c.sha256).where(ledger.c.pipeline == pipeline, ledger.c.object.in_(list(shas)))
    ).all()
    return {r.object for r in rows if shas.get(r.object) == r.sha256}


def _case_ingested(conn, pipeline: str, case_id: str) -> bool:
    return conn.execute(
        select(ledger.c.id).where(ledger.c.pipeline == pipeline, ledger.c.case_id == case_id,
                                  ledger.c.state == "ingested").limit(1)
    ).first() is not None


def ingest(
    data: DataSpec,
    layout: Layout,
    db: Database,
    source: str,
    progress: Callable[[int, int], None] | None = None,
) -> IngestReport:
    """Ingest every case under ``source``; each object the ledger has not seen gets exactly one state.

    Decoding runs outside any lock; the decision (ingest, duplicate or quarantine), the Zarr write
    and the ledger rows happen under the pipeline's ingest lock, so two ingests of one source at
    once store each case once and record each object once.
    """
    cases = discover(source, data.layout)
    limit = max_object_bytes(data.max_voxels)
    report = IngestReport()
    pipeline = layout.pipeline
    for i, case in enumerate(cases):
        blobs: dict[str, bytes] = {}
        shas: dict[str, str] = {}
        sizes: dict[str, int] = {}
        missing: list[str] = []
        oversized: list[str] = []
        for obj in case.objects:
            if case.outside:
                shas[obj] = "not-read"  # outside the source: never opened
                continue
            try:
                blob, shas[obj], sizes[obj] = fetch(obj, limit)
            except FileNotFoundError:
                missing.append(obj)
                shas[obj] = "missing"
                continue
            if blob is None:
                oversized.append(obj)
            else:
                blobs[obj] = blob
        with db.transaction() as conn:
            already = _seen(conn, pipeline, shas)
        if len(already) == len(shas):  # every object already accounted for: nothing arrived
            report.seen += len(shas)
            if progress:
                progress(i + 1, len(cases))
            continue
        content = sha256_bytes(*(shas[o].encode() for o in case.objects)) if (case.outside or oversized) \
            else sha256_bytes(*blobs.values())
        case_id = case_id_for(content)
        problem: QuarantineError | None = None
        image = label = None
        if case.outside:
            problem = QuarantineError("outside-source", case.outside)
        elif missing:
            problem = QuarantineError("missing-file", f"{len(missing)} object(s) of the case do not exist")
        elif oversized:
            problem = QuarantineError("too-large", f"{len(oversized)} object(s) over {limit} bytes, the most "
                                                   f"data.max_voxels allows; kept where they arrived")
        elif not layout.raw.is_committed(case_id):
            try:
                image = decode_nifti(blobs[case.image], posixpath.basename(case.image), data.max_voxels)
                if case.label:
                    lab = decode_nifti(blobs[case.label], posixpath.basename(case.label), data.max_voxels)
                    label = check_label(image, lab, case.name)
            except QuarantineError as exc:
                problem = exc
        with db.locked(f"ingest:{pipeline}") as conn:
            fresh = [obj for obj in case.objects if obj not in _seen(conn, pipeline, shas)]
            committed = problem is None and layout.raw.is_committed(case_id)
            at = now()
            if problem is not None:
                state, cid = "quarantined", None
                for obj in fresh:
                    if obj in blobs:
                        layout.store.write_bytes(layout.quarantine(shas[obj]), blobs[obj])
                report.quarantined.append({"case": case.name, "reason": problem.reason, "detail": problem.detail})
            elif committed and _case_ingested(conn, pipeline, case_id):
                state, cid = "duplicate", case_id
                report.duplicate.append(case_id)
            else:
                if not committed:  # else a crash after the commit: record what is there
                    write_case(layout.raw, case_id, image, label, {
                        "case_name": case.name, "source_sha256": content, "spacing": list(image.spacing),
                        "affine": image.affine.tolist(), "modality": "unknown", "dtype": str(image.array.dtype),
                    })
                state, cid = "ingested", case_id
                report.ingested.append(case_id)
            for obj in fresh:
                conn.execute(insert(ledger).values(
                    pipeline=pipeline, object=obj, sha256=shas[obj], size=sizes.get(obj, 0), case_id=cid,
                    state=state, reason=problem.reason if problem else None,
                    detail=problem.detail if problem else None, at=at,
                ))
            report.objects[state] = report.objects.get(state, 0) + len(fresh)
            report.seen += len(case.objects) - len(fresh)
        if progress:
            progress(i + 1, len(cases))
    report.case_ids = ingested_cases(db, pipeline)
    report.dataset_digest = dataset_digest(report.case_ids)
    return report


def read_ledger(db: Database, pipeline: str | None = None, state: str | None = None) -> list[dict[str, Any]]:
    """Every object ever seen, oldest first, with its state and reason."""
    query = select(ledger).order_by(ledger.c.id)
    if pipeline:
        query = query.where(ledger.c.pipeline == pipeline)
    if state:
        query = query.where(ledger.c.state == state)
    with db.transaction() as conn:
        return [{**r._asdict(), "at": r.at.isoformat() if r.at else None} for r in conn.execute(query)]
