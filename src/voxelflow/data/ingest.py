"""Ingestion: find arrived cases, decode and check them fully, store each as a Zarr v3 group.

Every arrived object ends in exactly one ledger state: ``ingested``, ``duplicate`` or
``quarantined`` (with a reason code). Ingestion is idempotent on content hashes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import fsspec
import numpy as np
import xarray as xr
from sqlalchemy import insert, select, update

from voxelflow.core import audit
from voxelflow.core.db import Database, ledger, now
from voxelflow.core.storage import CaseStore, Layout, sha256_bytes
from voxelflow.data import dicom, dicom_series
from voxelflow.data.formats import NIFTI_SUFFIXES, Volume, read_nifti, scrub_nifti
from voxelflow.data.formats import VolumeError as QuarantineError
from voxelflow.spec.config import DataSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceCase:
    name: str
    image: str
    label: str | None = None
    outside: str | None = None  # why an entry points outside the source: never read
    series: tuple[str, ...] = ()  # dicom layout: every object of one series (or one object that is not DICOM)
    not_dicom: bool = False  # dicom layout: a lone object whose first MiB is no DICOM header (hashed, never kept)
    voxels: int = 0  # dicom layout: rows x columns x frames, summed over the series' headers
    pixel_bytes: int = 0  # dicom layout: the pixel bytes those headers declare

    @property
    def objects(self) -> list[str]:
        if self.series:
            return [*self.series, *([self.label] if self.label else [])]
        return [u for u in (self.image, self.label) if u]


@dataclass
class IngestReport:
    ingested: list[str] = field(default_factory=list)
    duplicate: list[str] = field(default_factory=list)
    quarantined: list[dict[str, str]] = field(default_factory=list)
    dataset_digest: str = ""  # of the labelled cases: what training uses and lineage checks
    case_ids: list[str] = field(default_factory=list)  # labelled cases: what preprocessing and training use
    unlabelled: list[str] = field(default_factory=list)  # stored, never used for training or evaluation
    objects: dict[str, int] = field(default_factory=dict)  # new ledger rows by state, in objects
    seen: int = 0  # objects the ledger had already accounted for (same key, same bytes)
    superseded: list[dict[str, Any]] = field(default_factory=list)  # {case, by, regrouped}: see _supersede
    arrived: int = 0  # objects found under the source: sum(objects.values()) + seen
    warnings: list[str] = field(default_factory=list)  # said at every run (e.g. de-identification is off)

    def summary(self) -> dict[str, Any]:
        return {
            "ingested": len(self.ingested),
            "duplicate": len(self.duplicate),
            "quarantined": len(self.quarantined),
            "arrived": self.arrived,
            "objects": dict(self.objects),
            "already_seen": self.seen,
            "superseded": len(self.superseded),
            "cases": len(self.case_ids),
            "unlabelled": len(self.unlabelled),
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
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}")
    cases: list[SourceCase] = []
    named: set[str] = set()  # mixed: what dataset.json names (and itself) is not read as DICOM
    if layout in ("decathlon", "mixed"):
        manifest = _join(root, "dataset.json")
        if fs.exists(manifest):
            named.add(posixpath.normpath(manifest))
            try:
                meta = json.loads(fs.cat_file(manifest))
            except ValueError as exc:
                raise ValueError(f"{source}: dataset.json is not valid JSON ({exc})") from None
        elif layout == "decathlon":
            raise FileNotFoundError(f"{source}: decathlon layout needs a dataset.json")
        else:
            meta = {}
        if not isinstance(meta, dict):
            raise ValueError(f"{source}: dataset.json must be an object whose training and test are lists")
        # `training` entries are labelled cases; `test` entries (Decathlon's imagesTs) unlabelled ones
        training, test = meta.get("training") or [], meta.get("test") or []
        if not isinstance(training, list) or not isinstance(test, list):
            raise ValueError(f"{source}: dataset.json must be an object whose training and test are lists")
        entries = [*((f"training[{i}]", t) for i, t in enumerate(training)),
                   *((f"test[{i}]", t) for i, t in enumerate(test))]
        for i, (where, item) in enumerate(entries):
            image = item.get("image") if isinstance(item, dict) else item
            label = item.get("label") if isinstance(item, dict) else None
            if not isinstance(image, str) or not image or not isinstance(label, (str, type(None))):
                raise ValueError(f"{source}: dataset.json {where} needs an image path (a string) and at most "
                                 "one label path")
            label = label or None
            name = Path(image).name
            for suffix in NIFTI_SUFFIXES[::-1]:
                name = name.removesuffix(suffix)
            outside = next((why for why in map(_escapes, filter(None, (image, label))) if why), None)
            if outside is None:
                for rel in filter(None, (image, label)):
                    named.add(posixpath.normpath(_join(root, rel)))
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
    if layout == "folder":
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
    if layout in ("dicom", "mixed"):
        manifest = _join(root, dicom_series.LABELS_MANIFEST)
        labels = dicom_series.labels(fs, manifest, source)  # SeriesInstanceUID -> label NIfTI, relative to the source
        skip = {posixpath.normpath(_join(root, rel)) for rel in labels.values() if not _escapes(rel)}
        skip |= {posixpath.normpath(manifest)} | named
        inside = []
        for path in sorted(fs.find(root)):
            if posixpath.normpath(path) in skip:
                continue
            if _leaves_by_link(fs, root, path):
                key = url(path)
                cases.append(SourceCase(f"object{len(cases)}", key, None, "a link to outside the source", (key,)))
            else:
                inside.append(path)
        groups = dicom_series.group(fs, inside, url)
        for i, (uid, series) in enumerate(sorted(groups.items(), key=lambda kv: kv[1].keys[0])):
            rel = labels.get(uid)
            outside = _escapes(rel) if rel else None
            if rel and outside is None and _leaves_by_link(fs, root, _join(root, rel)):
                outside = f"{rel!r} is a link to outside the source"
            label = (rel if outside else url(_join(root, rel))) if rel else None
            cases.append(SourceCase(f"series{i}", series.keys[0], label, outside, tuple(series.keys),
                                    series.not_dicom, series.voxels, series.pixel_bytes))
    return cases


LAYOUTS = typing.get_args(DataSpec.model_fields["layout"].annotation)  # the spec's Literal: one list


def read_bytes(url: str) -> bytes:
    with fsspec.open(url, "rb") as fh:
        return fh.read()


def fetch(url: str, limit: int) -> tuple[bytes | None, str, int]:
    """(bytes, sha256, size) of one object, hashed while it is read in blocks; bytes is None when it is over
    ``limit``.

    The hash covers every byte either way, so an oversized object still gets its one ledger row.
    """
    h, size, kept = hashlib.sha256(), 0, []
    with fsspec.open(url, "rb") as fh:
        while block := fh.read(_BLOCK):
            h.update(block)
            size += len(block)
            if size <= limit:
                kept.append(block)
            elif kept:
                kept = []
    if size > limit:
        return None, h.hexdigest(), size
    return (kept[0] if len(kept) == 1 else b"".join(kept)), h.hexdigest(), size


_BLOCK = 1 << 24  # most volumes arrive in one block: no copy when they are joined


def max_object_bytes(max_voxels: int) -> int:
    """The largest file a case may arrive as: 8-byte voxels plus a header and extensions."""
    return max_voxels * 8 + (1 << 20)


def decode_nifti(data: bytes, name: str, max_voxels: int) -> Volume:
    """Decode every voxel and check it; raise :class:`QuarantineError` on anything unusable.

    NIfTI-1 and NIfTI-2, plain or gzip: the header is read first and nothing is inflated or
    allocated beyond what it declares, within ``max_voxels`` (see :mod:`voxelflow.data.formats`).
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
    return values.astype(np.uint8, copy=False)


def modality(slices: list[dicom.Slice]) -> str:
    """The DICOM Modality of a series (from its first object); NIfTI does not say."""
    if not slices:
        return "unknown"
    return str(slices[0].dataset.get("Modality", "unknown") or "unknown")


def case_id_for(content_hash: str) -> str:
    return f"case-{content_hash[:16]}"


def compressors() -> tuple:
    """How raw cases are compressed: Blosc LZ4 after a bit shuffle, which releases the GIL. Against zarr's
    default (Zstandard), measured on 128³ float32: a CT-like volume 2.5 times as fast and 10 % smaller,
    Gaussian noise 20 % faster and 3 % smaller."""
    from zarr.codecs import BloscCodec

    return (BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),)


def case_dataset(image: Volume, label: np.ndarray | None, attrs: dict[str, Any]) -> xr.Dataset:
    dims = ("x", "y", "z")
    encoding = {"compressors": compressors()}  # kept by CaseStore.write
    data_vars = {"image": xr.Variable(dims, image.array, encoding=encoding)}
    if label is not None:
        data_vars["label"] = xr.Variable(dims, label, encoding=dict(encoding))
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


def has_label(raw: CaseStore, case_id: str) -> bool:
    """Whether a stored case has a label array (one metadata lookup, no voxel read)."""
    return raw.store.exists(f"{raw.key(case_id)}/label/zarr.json")


def dataset_digest(case_ids: list[str]) -> str:
    return sha256_bytes(*(c.encode() for c in sorted(case_ids)))[:16]


def ingested_cases(db: Database, pipeline: str) -> list[str]:
    """Every case the ledger says was ingested for ``pipeline``: the dataset."""
    with db.transaction() as conn:
        rows = conn.execute(
            select(ledger.c.case_id).where(ledger.c.pipeline == pipeline, ledger.c.state == "ingested",
                                           ledger.c.superseded_by.is_(None)).distinct()
        ).all()
    return sorted(r.case_id for r in rows)


def _rows_of(conn, pipeline: str, objects: list[str], *columns) -> list:
    """The ledger rows (``columns``, default all) of these object keys, one query per 500 keys."""
    query = select(*columns) if columns else select(ledger)
    rows: list = []
    for i in range(0, len(objects), 500):
        rows += conn.execute(query.where(ledger.c.pipeline == pipeline, ledger.c.object.in_(objects[i:i + 500])))
    return rows


def _known(conn, pipeline: str, objects: list[str]) -> dict[str, set[str]]:
    """Object key -> the hashes the ledger holds for it."""
    known: dict[str, set[str]] = {}
    for r in _rows_of(conn, pipeline, objects, ledger.c.object, ledger.c.sha256):
        known.setdefault(r.object, set()).add(r.sha256)
    return known


def _case_ingested(conn, pipeline: str, case_id: str) -> bool:
    return conn.execute(
        select(ledger.c.id).where(ledger.c.pipeline == pipeline, ledger.c.case_id == case_id,
                                  ledger.c.state == "ingested").limit(1)
    ).first() is not None


@dataclass
class _Prepared:
    """One case read, hashed, decoded, de-identified and (when accepted) written: everything but the decision.

    Small: the voxels and bytes stay with the worker that prepared them.
    """

    case: SourceCase
    shas: dict[str, str]
    sizes: dict[str, int]
    dups: set[str] = field(default_factory=set)  # dicom: the same bytes under another name, before grouping
    first: dict[str, str] = field(default_factory=dict)  # sha -> first object with those bytes
    case_id: str = ""
    problem: QuarantineError | None = None
    done: bool = False  # every object already in the ledger: nothing arrived


def _prepare(case: SourceCase, data: DataSpec, layout: Layout, limit: int, deid_key: str | None,
             known: dict[str, set[str]]) -> _Prepared:
    """Everything outside the lock; safe to run for several cases at once.

    ``known`` is what the ledger held for these objects when the run started: objects it already
    accounts for are never decoded again (the decision re-checks under the lock).
    """
    blobs: dict[str, bytes] = {}
    prep = _Prepared(case, {}, {})
    shas, sizes = prep.shas, prep.sizes
    missing: list[str] = []
    oversized: list[str] = []
    # a series over the limits its headers declare: every object hashed as it streams by, none held
    bounded = dicom_series.bound(len(case.series), case.voxels, case.pixel_bytes, data.max_voxels,
                                 data.max_series_files, limit) if case.series and not case.not_dicom else None
    for obj in case.objects:
        if case.outside:
            shas[obj] = "not-read"  # outside the source: never opened
            continue
        try:  # an object that is not DICOM is hashed as it streams by and never held
            blob, shas[obj], sizes[obj] = fetch(obj, 0 if case.not_dicom or bounded else limit)
        except FileNotFoundError:
            missing.append(obj)
            shas[obj] = "missing"
            continue
        if case.not_dicom or bounded:
            continue
        if blob is None:
            oversized.append(obj)
        else:
            blobs[obj] = blob
    fresh = [obj for obj in case.objects if shas[obj] not in known.get(obj, ())]
    if not fresh:
        prep.done = True
        return prep
    for obj in case.series:
        if shas[obj] in prep.first and obj in blobs:
            prep.dups.add(obj)
        prep.first.setdefault(shas[obj], obj)
    if case.series:
        content = sha256_bytes(*(h.encode() for h in sorted(prep.first)),
                               *([shas[case.label].encode()] if case.label else []))
    elif case.outside or oversized:
        content = sha256_bytes(*(shas[o].encode() for o in case.objects))
    else:
        content = _of_blobs(*(shas[o] for o in blobs))
    case_id = prep.case_id = case_id_for(content)
    image = label = None
    problem: QuarantineError | None = None
    slices: list[dicom.Slice] = []
    deidentified: dict[str, dicom.Slice] = {}
    if case.outside:
        problem = QuarantineError("outside-source", case.outside)
    elif case.not_dicom and not missing:
        problem = QuarantineError("unreadable", "not a DICOM object (no DICOM header in its first MiB); "
                                                "left where it arrived")
    elif missing:
        problem = QuarantineError("missing-file", f"{len(missing)} object(s) of the case do not exist")
    elif bounded:
        problem = bounded
    elif oversized:
        problem = QuarantineError("too-large", f"{len(oversized)} object(s) over {limit} bytes, the most "
                                               f"data.max_voxels allows; kept where they arrived")
    elif case.series:
        for obj in case.series:  # every object, so each one that can be is quarantined de-identified
            if obj not in prep.dups:
                try:
                    if data.deidentify == "none":
                        sl = dicom.parse(blobs[obj], f"object {shas[obj][:16]}")
                    else:
                        sl = deidentified[obj] = dicom.deidentify(blobs[obj], deid_key or "",
                                                                  f"object {shas[obj][:16]}")
                except QuarantineError as exc:
                    problem = problem or exc
                    continue
                slices.append(sl)
        if problem is None and not layout.raw.is_committed(case_id):
            try:
                image = dicom.stack(slices, data.max_voxels)
                if case.label:
                    lab = decode_nifti(blobs[case.label], posixpath.basename(case.label), data.max_voxels)
                    label = check_label(image, lab, case.name)
            except QuarantineError as exc:
                problem = exc
    elif not layout.raw.is_committed(case_id):
        try:
            image = decode_nifti(blobs[case.image], posixpath.basename(case.image), data.max_voxels)
            if case.label:
                lab = decode_nifti(blobs[case.label], posixpath.basename(case.label), data.max_voxels)
                label = check_label(image, lab, case.name)
        except QuarantineError as exc:
            problem = exc
    prep.problem = problem
    if problem is not None:
        # kept under its hash for each object the ledger did not hold: DICOM de-identified (what could
        # not be de-identified stays where it arrived), unless de-identification is off; NIfTI without its
        # free text and extensions (one whose header does not parse stays where it arrived)
        for obj in fresh:
            if obj in prep.dups:
                blob = None
            elif obj in case.series:
                blob = (blobs.get(obj) if data.deidentify == "none" else
                        deidentified[obj].deidentified_bytes() if obj in deidentified else None)
            else:
                blob = blobs.get(obj)
                blob = scrub_nifti(blob, f"object {shas[obj][:16]}", limit) if blob is not None else None
            if blob is not None:
                layout.store.write_bytes(layout.quarantine(shas[obj]), blob)
    elif image is not None:
        # written before the decision: a case is committed by its marker, and an attempt that loses
        # a race with another ingest of the same bytes holds the same content (swept later)
        write_case(layout.raw, case_id, image, label, {  # hashes only: names may identify
            "source_sha256": content, "spacing": list(image.spacing), "affine": image.affine.tolist(),
            "modality": modality(slices), "dtype": str(image.array.dtype),
        })
    return prep


def _of_blobs(*hexdigests: str) -> str:
    """``sha256_bytes(*blobs)`` from the blobs' sha256 hex digests: the bytes are not hashed twice."""
    h = hashlib.sha256()
    for d in hexdigests:
        h.update(bytes.fromhex(d))
    return h.hexdigest()


def _supersede(conn, db: Database, prep: _Prepared, pipeline: str, rows: list, report: IngestReport) -> None:
    """A new case that holds every object of earlier cases replaces them in the dataset.

    That is a DICOM series whose slices arrived in two batches, a label that came after its image,
    or a file replaced under its name: the earlier case would otherwise stay in the dataset beside
    the new one (a half volume, an unlabelled copy, the old label). Rows of this case's objects
    with the same bytes move to the new case (quarantined ones too: the grouping they were
    quarantined in, a series with missing slices, is gone); the earlier cases' other rows (older
    bytes under these names) stay as they were, marked ``superseded_by``, as do quarantined rows of
    earlier bytes under these names (``missing-file`` before an object existed, ``truncated`` while it
    was being copied). A case that shares only some objects with the new one (two raters' labels of
    one image) is left alone. ``rows`` are the ledger's rows of this case's objects.
    """
    case, shas, new = prep.case, prep.shas, prep.case_id
    earlier = sorted({r.case_id for r in rows if r.case_id and r.case_id != new and r.superseded_by is None})
    members: dict[str, set[str]] = {}
    if earlier:
        for r in conn.execute(select(ledger.c.case_id, ledger.c.object).where(
                ledger.c.pipeline == pipeline, ledger.c.case_id.in_(earlier))):
            members.setdefault(r.case_id, set()).add(r.object)
    replaced = {c for c, objects in members.items() if objects <= set(case.objects)}
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
            case_id=new, state="duplicate" if r.object in prep.dups else "ingested", reason=None,
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
        report.superseded += changes


def _decide(prep: _Prepared, layout: Layout, db: Database, report: IngestReport) -> None:
    """Under the pipeline's ingest lock: each object not yet in the ledger gets its one state."""
    case, shas, problem, case_id = prep.case, prep.shas, prep.problem, prep.case_id
    pipeline = layout.pipeline
    with db.locked(f"ingest:{pipeline}") as conn:
        held = _rows_of(conn, pipeline, case.objects)  # the case's rows, read once under the lock
        seen = {r.object for r in held if shas.get(r.object) == r.sha256}
        fresh = [obj for obj in case.objects if obj not in seen]
        at = now()
        if problem is not None:
            state, cid = "quarantined", None
            if fresh:
                report.quarantined.append({"case": case_id, "reason": problem.reason, "detail": problem.detail})
        elif not layout.raw.is_committed(case_id):
            raise RuntimeError(f"case {case_id} was accepted but is not committed in the store")
        elif _case_ingested(conn, pipeline, case_id):
            state, cid = "duplicate", case_id
            if fresh:
                report.duplicate.append(case_id)
        else:
            state, cid = "ingested", case_id
            report.ingested.append(case_id)
            _supersede(conn, db, prep, pipeline, held, report)
        rows = []
        for obj in fresh:
            st = "duplicate" if obj in prep.dups else state
            rows.append(dict(
                pipeline=pipeline, object=obj, sha256=shas[obj], size=prep.sizes.get(obj, 0),
                case_id=cid if st != "quarantined" else None, state=st,
                reason=problem.reason if problem and st == "quarantined" else None,
                detail=(problem.detail if problem and st == "quarantined" else
                        f"same bytes as {prep.first[shas[obj]]}" if obj in prep.dups else None), at=at,
            ))
            report.objects[st] = report.objects.get(st, 0) + 1
            if len(rows) == 1000:  # a series of many objects: rows written as they are made, not all held
                conn.execute(insert(ledger), rows)
                rows = []
        if rows:
            conn.execute(insert(ledger), rows)
        report.seen += len(case.objects) - len(fresh)


DEIDENTIFY_OFF = ("data.deidentify is none: DICOM is ingested and quarantined as it arrived, NOT de-identified "
                  "(acknowledged in data.deidentify_acknowledged: {ack!r})")


def begin(data: DataSpec, layout: Layout, db: Database, source: str, deid_key: str | None = None
          ) -> tuple[list[SourceCase], IngestReport]:
    """The cases under ``source`` and an empty report of the run, after the run-wide checks.

    With ``data.deidentify == "none"`` every run logs a warning, lists it in the report's
    ``warnings`` and appends a ``data.deidentify_off`` audit record.
    """
    off = data.deidentify == "none"
    if data.needs_deid_key and not deid_key:
        raise ValueError("a DICOM ingest needs a de-identification key: set VOXELFLOW_DEID_KEY (in a flow run, "
                         "or save it in the Prefect Secret block named by VOXELFLOW_DEID_KEY_BLOCK, "
                         "default voxelflow-deid-key)")
    report = IngestReport()
    if off:
        message = DEIDENTIFY_OFF.format(ack=data.deidentify_acknowledged)
        log.warning(message)
        report.warnings.append(message)
        audit.append(db, "data.deidentify_off", "voxelflow", pipeline=layout.pipeline, layout=data.layout,
                     acknowledged=data.deidentify_acknowledged)
    cases = discover(source, data.layout)
    report.arrived = sum(len(c.objects) for c in cases)
    return cases, report


def ingest_case(case: SourceCase, data: DataSpec, layout: Layout, db: Database, deid_key: str | None = None
                ) -> IngestReport:
    """One case from start to end (read, check, de-identify, write, decide): a report of this case alone.

    For runners that schedule cases themselves (one task per case); :func:`merge` the reports into
    the one :func:`begin` made and :func:`finish` it.
    """
    with db.transaction() as conn:
        known = _known(conn, layout.pipeline, case.objects)
    report = IngestReport()
    _record(_prepare(case, data, layout, max_object_bytes(data.max_voxels), deid_key, known), layout, db, report)
    return report


def merge(report: IngestReport, part: IngestReport) -> None:
    """Add what one case's report counted to the run's report."""
    report.ingested += part.ingested
    report.duplicate += part.duplicate
    report.quarantined += part.quarantined
    for state, n in part.objects.items():
        report.objects[state] = report.objects.get(state, 0) + n
    report.seen += part.seen
    report.superseded += part.superseded


def finish(report: IngestReport, layout: Layout, db: Database) -> IngestReport:
    """The dataset after the run: every labelled case the ledger holds, unlabelled ones apart, and its digest."""
    every = ingested_cases(db, layout.pipeline)
    report.unlabelled = [c for c in every if not has_label(layout.raw, c)]
    report.case_ids = [c for c in every if c not in set(report.unlabelled)]
    report.dataset_digest = dataset_digest(report.case_ids)  # what training and lineage see
    return report


def _record(prep: _Prepared, layout: Layout, db: Database, report: IngestReport) -> None:
    if prep.done:
        report.seen += len(prep.shas)
    else:
        _decide(prep, layout, db, report)


def ingest(
    data: DataSpec,
    layout: Layout,
    db: Database,
    source: str,
    progress: Callable[[int, int], None] | None = None,
    deid_key: str | None = None,
    workers: int | None = None,
) -> IngestReport:
    """Ingest every case under ``source``; each object the ledger has not seen gets exactly one state.

    Reading, hashing, decoding, de-identification and the Zarr write run for ``workers`` cases at
    once (threads; default: the CPU count, at most 4) outside any lock: inflating, hashing, copying
    and compressing release the GIL. The decision (ingest, duplicate or quarantine) and the ledger
    rows happen one case at a time under the pipeline's ingest lock, so two ingests of one source at
    once record each object once and count each case once. What the ledger already held is read
    once, at the start, so the workers never wait on the database.
    """
    from concurrent.futures import ThreadPoolExecutor

    cases, report = begin(data, layout, db, source, deid_key)
    limit = max_object_bytes(data.max_voxels)
    with db.transaction() as conn:
        known = _known(conn, layout.pipeline, [o for c in cases for o in c.objects])
    workers = max(1, workers or min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers, thread_name_prefix="voxelflow-ingest") as pool:
        pending = []
        nxt = 0
        for i in range(len(cases)):
            while nxt < len(cases) and len(pending) < 2 * workers:  # a bounded window: memory stays flat
                case = cases[nxt]
                pending.append(pool.submit(_prepare, case, data, layout, limit, deid_key,
                                           {o: known[o] for o in case.objects if o in known}))
                nxt += 1
            _record(pending.pop(0).result(), layout, db, report)
            if progress:
                progress(i + 1, len(cases))
    return finish(report, layout, db)


def read_ledger(db: Database, pipeline: str | None = None, state: str | None = None) -> list[dict[str, Any]]:
    """Every object ever seen, oldest first, with its state and reason."""
    query = select(ledger).order_by(ledger.c.id)
    if pipeline:
        query = query.where(ledger.c.pipeline == pipeline)
    if state:
        query = query.where(ledger.c.state == state)
    with db.transaction() as conn:
        return [{**r._asdict(), "at": r.at.isoformat() if r.at else None} for r in conn.execute(query)]
