"""Ingestion: find arrived cases, decode and check them fully, store each as a Zarr v3 group.

Every arrived object ends in exactly one ledger state: ``ingested``, ``duplicate`` or
``quarantined`` (with a reason code). Ingestion is idempotent on content hashes.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import fsspec
import nibabel as nib
import numpy as np
import xarray as xr
from sqlalchemy import insert, select

from voxelflow.config import DataSpec
from voxelflow.db import Database, ledger, now
from voxelflow.storage import CaseStore, Layout, sha256_bytes

NIFTI_SUFFIXES = (".nii", ".nii.gz")


class QuarantineError(ValueError):
    """A file that must not be accepted; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class SourceCase:
    name: str
    image: str
    label: str | None = None

    @property
    def objects(self) -> list[str]:
        return [u for u in (self.image, self.label) if u]


@dataclass
class Volume:
    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, ...]


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
            image = item["image"] if isinstance(item, dict) else item
            label = item.get("label") if isinstance(item, dict) else None
            name = Path(str(image)).name
            for suffix in NIFTI_SUFFIXES[::-1]:
                name = name.removesuffix(suffix)
            cases.append(
                SourceCase(
                    name=name or f"case{i}",
                    image=url(_join(root, image)),
                    label=url(_join(root, label)) if label else None,
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
                cases.append(SourceCase(posixpath.basename(entry), url(image), url(label) if label else None))
    else:
        raise ValueError(f"unknown layout {layout!r}")
    return cases


def read_bytes(url: str) -> bytes:
    with fsspec.open(url, "rb") as fh:
        return fh.read()


def decode_nifti(data: bytes, name: str, max_voxels: int) -> Volume:
    """Decode every voxel and check it; raise :class:`QuarantineError` on anything unusable."""
    if not name.endswith(NIFTI_SUFFIXES):
        raise QuarantineError("unsupported-format", f"{name}: expected a NIfTI file (.nii or .nii.gz)")
    try:
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        img = nib.Nifti1Image.from_stream(io.BytesIO(data))
    except Exception as exc:  # nibabel raises many kinds on corrupt headers
        raise QuarantineError("unreadable", f"{name}: {exc}") from exc
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise QuarantineError("bad-shape", f"{name}: expected a 3-D volume, got shape {img.shape}")
    if int(np.prod(shape)) > max_voxels:
        raise QuarantineError("too-large", f"{name}: {int(np.prod(shape))} voxels exceed the limit {max_voxels}")
    if min(shape) < 2:
        raise QuarantineError("bad-shape", f"{name}: a dimension is smaller than 2 ({shape})")
    try:
        array = np.asanyarray(img.dataobj).reshape(shape)
    except Exception as exc:  # truncated pixel data fails only here
        raise QuarantineError("truncated", f"{name}: pixel data cannot be decoded ({exc})") from exc
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise QuarantineError("bad-dtype", f"{name}: voxel type {array.dtype} is not numeric")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise QuarantineError("non-finite", f"{name}: contains NaN or infinite values")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise QuarantineError("bad-affine", f"{name}: affine is singular or not finite")
    spacing = tuple(float(s) for s in img.header.get_zooms()[:3])
    return Volume(array=array, affine=affine, spacing=spacing)


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
    report = IngestReport()
    pipeline = layout.pipeline
    for i, case in enumerate(cases):
        blobs: dict[str, bytes] = {}
        missing: list[str] = []
        for obj in case.objects:
            try:
                blobs[obj] = read_bytes(obj)
            except FileNotFoundError:
                missing.append(obj)
        shas = {obj: hashlib.sha256(b).hexdigest() for obj, b in blobs.items()}
        shas.update({obj: "missing" for obj in missing})
        with db.transaction() as conn:
            already = _seen(conn, pipeline, shas)
        if len(already) == len(shas):  # every object already accounted for: nothing arrived
            report.seen += len(shas)
            if progress:
                progress(i + 1, len(cases))
            continue
        content = sha256_bytes(*blobs.values())
        case_id = case_id_for(content)
        problem: QuarantineError | None = None
        image = label = None
        if missing:
            problem = QuarantineError("missing-file", f"{len(missing)} object(s) of the case do not exist")
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
                    pipeline=pipeline, object=obj, sha256=shas[obj], size=len(blobs.get(obj, b"")), case_id=cid,
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
