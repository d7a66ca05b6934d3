"""Batch inference: segment the unlabelled cases that arrived, with a registered model version.

Ingestion stores unlabelled cases (no label file) like any other, but never trains or evaluates
on them. :func:`predict` segments them with a model from the MLflow registry (``NAME@ALIAS`` or
``NAME/VERSION``; the :class:`~voxelflow.learn.model.Segmenter` does the model's own preprocessing,
sliding-window inference and the inversion back to the input's grid) and writes, under a
destination (any fsspec URL), one folder per model version::

    DEST/<model>-v<version>/<case id>.nii.gz   the mask: uint8, the input's grid and affine
    DEST/<model>-v<version>/<case id>.seg.dcm  DICOM input only: the mask as a DICOM Segmentation
    DEST/<model>-v<version>/<case id>.sr.dcm   DICOM input only: its volumes as a DICOM SR (TID 1500)
    DEST/<model>-v<version>/volumes.csv        one row per mask: each label's volume in mL

Each mask gets one row in the database table ``predictions`` (case, model, version, the mask's URL,
its sha256, the volumes, when). A rerun skips the cases whose mask by the same version is recorded
there and still exists, so repeated arrival events and retries do no work twice. Names of source
files never reach the destination: masks are named by case id (a content hash), as in the store;
``voxelflow ledger`` maps source objects to case ids.

A case ingested from DICOM was stored de-identified; its Segmentation and SR reference the original
instances instead (what the PACS holds): the ledger names the source objects of the case, which are
read again (headers only, each checked against the hash the ledger recorded) to build them
(:mod:`voxelflow.serving.dicom_results`). Both carry the source's patient and study attributes.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
from sqlalchemy import insert, select, update

from voxelflow.core import audit, transient
from voxelflow.core.db import Database, ledger, now, predictions
from voxelflow.core.storage import Layout, Store
from voxelflow.data.ingest import has_label, ingested_cases, load_case
from voxelflow.release import registry
from voxelflow.serving.dicom_results import DicomResultError, dicom_results

TABLE = "volumes.csv"
MASK_SUFFIX = ".nii.gz"
SEG_SUFFIX, SR_SUFFIX = ".seg.dcm", ".sr.dcm"  # beside the mask, for DICOM input
NIFTI = (".nii", ".nii.gz")
HEADER_BYTES = 16 << 20  # what is kept of a source instance to read its header (its pixels are not needed)
Progress = Callable[[int, int], None]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # as promote.model_name
_ALIAS = re.compile(r"^[A-Za-z0-9_-]+$")


# ---------------------------------------------------------------- which model


@dataclass(frozen=True)
class ModelRef:
    """A registered model: ``NAME`` (its champion), ``NAME@ALIAS`` or ``NAME/VERSION``."""

    name: str
    alias: str | None = registry.CHAMPION
    version: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        text = text.strip()
        name, alias, version = text, registry.CHAMPION, None
        if "@" in text:
            name, alias = text.split("@", 1)
        elif "/" in text:
            name, version = text.split("/", 1)
            alias = None
        if not _NAME.match(name) or (alias is not None and not _ALIAS.match(alias)) or \
                (version is not None and not version.isdigit()):
            raise ValueError(f"model {text!r}: expected NAME, NAME@ALIAS or NAME/VERSION (e.g. demo-spheres@champion)")
        return cls(name, alias, version)

    def __str__(self) -> str:
        return f"{self.name}/{self.version}" if self.version else f"{self.name}@{self.alias}"

    def resolve(self, tracking_uri: str) -> str:
        """The version this reference names now; :class:`LookupError` when there is none."""
        if self.version is None:
            version = registry.alias_version(tracking_uri, self.name, self.alias or registry.CHAMPION)
            if version is None:
                raise LookupError(f"model {self.name!r} has no {self.alias!r} alias yet: run the lifecycle first "
                                  "(or name a version: --model NAME/VERSION)")
            return version
        mc = registry.client(tracking_uri)
        try:
            registry.retrying("read version", lambda: mc.get_model_version(self.name, self.version))
        except Exception as exc:  # noqa: BLE001 - classified here
            if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
                raise LookupError(f"model {self.name!r} has no version {self.version}") from None
            raise
        return self.version


# ---------------------------------------------------------------- which cases


@dataclass
class Selection:
    unlabelled: list[str]  # what batch inference segments
    labelled: list[str] = field(default_factory=list)  # asked for (or under the source) but labelled: left alone


def source_prefix(source: str) -> str:
    """How the ledger spells objects under ``source`` (as :func:`voxelflow.data.ingest.discover` names them)."""
    _, root = fsspec.core.url_to_fs(source)
    proto = source.split("://", 1)[0] + "://" if "://" in source else ""
    return f"{proto}{root.rstrip('/')}/"


def cases_under(db: Database, pipeline: str, source: str) -> list[str]:
    """Cases with an object under ``source`` that the ledger accounts for as ingested or duplicate."""
    prefix = source_prefix(source)
    with db.transaction() as conn:
        rows = conn.execute(select(ledger.c.object, ledger.c.case_id).where(
            ledger.c.pipeline == pipeline, ledger.c.state.in_(("ingested", "duplicate")),
            ledger.c.case_id.is_not(None))).all()
    return sorted({r.case_id for r in rows if r.object.startswith(prefix)})


def select_cases(db: Database, layout: Layout, cases: list[str] | None = None,
                 source: str | None = None) -> Selection:
    """The unlabelled ingested cases of the pipeline: all of them, those of ``cases``, or those under ``source``.

    A case id in ``cases`` that the pipeline never ingested is an error (nothing is predicted).
    """
    every = set(ingested_cases(db, layout.pipeline))
    if cases is not None:
        unknown = sorted(set(cases) - every)
        if unknown:
            raise ValueError(f"{len(unknown)} case(s) are not ingested cases of pipeline {layout.pipeline!r}: "
                             + ", ".join(unknown[:3]) + (" ..." if len(unknown) > 3 else ""))
        wanted = sorted(set(cases))
    elif source is not None:
        wanted = [c for c in cases_under(db, layout.pipeline, source) if c in every]
    else:
        wanted = sorted(every)
    labelled = {c for c in wanted if has_label(layout.raw, c)}
    return Selection([c for c in wanted if c not in labelled], sorted(labelled))


def check_destination(dest: str, source: str | None) -> None:
    """Refuse a destination inside the source: the masks would arrive as new cases."""
    if source is None:
        return
    out, src = Store(dest).url.rstrip("/"), Store(source).url.rstrip("/")
    if out == src or out.startswith(src + "/"):
        raise ValueError(f"the destination {dest!r} lies inside the source {source!r}: its masks would be "
                         "ingested as new cases; write them elsewhere")


# ---------------------------------------------------------------- the original DICOM instances


def source_objects(db: Database, pipeline: str, case: str, source: str | None = None) -> dict[str, list[str]]:
    """sha256 -> the objects (under ``source`` first) the ledger holds for ``case``: its source, as it arrived."""
    prefix = source_prefix(source) if source else ""
    with db.transaction() as conn:
        rows = conn.execute(select(ledger.c.object, ledger.c.sha256).where(
            ledger.c.pipeline == pipeline, ledger.c.case_id == case,
            ledger.c.state.in_(("ingested", "duplicate"))).order_by(ledger.c.id)).all()
    out: dict[str, list[str]] = {}
    for r in sorted(rows, key=lambda r: not r.object.startswith(prefix)):
        out.setdefault(r.sha256, []).append(r.object)
    return out


def _header(url: str) -> tuple[Any, str]:
    """(the header of the DICOM object at ``url``, the sha256 of all its bytes), its pixels streamed by."""
    import pydicom

    h, head = hashlib.sha256(), bytearray()
    with fsspec.open(url, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
            if len(head) < HEADER_BYTES:
                head += block[:HEADER_BYTES - len(head)]
    return pydicom.dcmread(io.BytesIO(bytes(head)), stop_before_pixels=True), h.hexdigest()


def source_instances(db: Database, pipeline: str, case: str, source: str | None = None) -> list[Any] | None:
    """The original DICOM instances of ``case`` (headers), read again where they arrived; None for a NIfTI case.

    Each must still hold the bytes the ledger recorded (another object under its name is not what was
    segmented): otherwise, or when none of its copies can be read, :class:`DicomResultError`.
    """
    objects = source_objects(db, pipeline, case, source)
    if not objects or all(o.lower().endswith(NIFTI) for copies in objects.values() for o in copies):
        return None
    found = []
    for sha, copies in objects.items():
        for url in copies:
            try:
                ds, got = _header(url)
            except FileNotFoundError:
                continue
            except Exception as exc:  # noqa: BLE001 - classified: storage trouble raises, the rest is this case's
                if is_transient(exc):
                    raise
                raise DicomResultError(f"source object {sha[:16]} no longer reads as DICOM "
                                       f"({type(exc).__name__})") from None
            if got == sha:
                found.append(ds)
                break
        else:
            raise DicomResultError(f"source object {sha[:16]} is no longer where it arrived (or holds other bytes "
                                   "now): DICOM results reference the original instances")
    return found


# ---------------------------------------------------------------- masks and volumes


def label_values(config: dict[str, Any]) -> list[int]:
    """The foreground labels the model can give: 1 .. out_channels - 1 of its network spec."""
    for kwargs in (config.get("network") or {}).values():
        if isinstance(kwargs, dict) and kwargs.get("out_channels"):
            return list(range(1, int(kwargs["out_channels"])))
    return []


def voxel_ml(spacing: Any) -> float:
    return float(np.prod(np.asarray(spacing, dtype=np.float64))) / 1000.0


def label_volumes(mask: np.ndarray, spacing: Any, labels: list[int]) -> dict[str, float]:
    """Each label's volume in mL (voxels × the voxel's volume from the spacing in mm); absent labels give 0."""
    values, counts = np.unique(mask, return_counts=True)
    found = {int(v): int(c) for v, c in zip(values, counts) if v != 0}
    per = voxel_ml(spacing)
    return {str(label): round(found.get(label, 0) * per, 3) for label in sorted(set(labels) | set(found))}


def mask_nifti(mask: np.ndarray, affine: np.ndarray) -> bytes:
    """A gzipped NIfTI-1 label image on the input's grid (qform and sform = ``affine``); the same mask
    always gives the same bytes (gzip without a timestamp), so its sha256 identifies it."""
    import nibabel as nib

    affine = np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(np.asarray(mask, dtype=np.uint8), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    img.header.set_intent("label")
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


def folder_for(model: str, version: str) -> str:
    return f"{model}-v{version}"


# ---------------------------------------------------------------- batch inference


@dataclass
class PredictReport:
    model: str
    version: str | None  # None: nothing to predict, the registry was not asked
    folder: str  # URL of the folder holding this version's masks and table
    predicted: list[dict[str, Any]] = field(default_factory=list)  # written by this run: case, mask, sha256, volumes
    skipped: list[str] = field(default_factory=list)  # already predicted by this version (mask still there)
    failed: list[dict[str, str]] = field(default_factory=list)  # case, reason: not written, the rest went on
    labelled: list[str] = field(default_factory=list)  # selected but labelled: not predicted
    table: str | None = None  # URL of volumes.csv
    rows: list[dict[str, Any]] = field(default_factory=list)  # the table: every mask of this version in the folder

    def summary(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version, "folder": self.folder,
                "predicted": len(self.predicted), "skipped": len(self.skipped), "failed": len(self.failed),
                "labelled": len(self.labelled), "table": self.table}


def _recorded(conn, pipeline: str, model: str, version: str, outputs: list[str]) -> dict[str, dict[str, Any]]:
    """The recorded masks among ``outputs``: URL -> its details (``seg`` and ``sr`` URLs for DICOM input)."""
    if not outputs:
        return {}
    rows = conn.execute(select(predictions.c.output, predictions.c.volumes).where(
        predictions.c.pipeline == pipeline, predictions.c.model == model, predictions.c.version == version,
        predictions.c.output.in_(outputs))).all()
    return {r.output: json.loads(r.volumes) for r in rows}


def _present(dest: Store, key: str, details: dict[str, Any] | None) -> bool:
    """Whether a recorded mask and the DICOM results recorded with it are all still there."""
    if details is None or not dest.exists(key):
        return False
    stem = key[:-len(MASK_SUFFIX)]
    return all(dest.exists(stem + suffix) for name, suffix in (("seg", SEG_SUFFIX), ("sr", SR_SUFFIX))
               if details.get(name))


def is_transient(exc: BaseException) -> bool:
    """Storage and network trouble: raised (a retry skips what is done); anything else is this case's own."""
    return transient.is_transient(exc)


def predict(
    db: Database,
    layout: Layout,
    cases: list[str],
    model: str,
    version: str,
    load: Callable[[], Any],
    dest: Store,
    progress: Progress | None = None,
    source: str | None = None,
) -> PredictReport:
    """Segment ``cases`` (ingested case ids) with ``load()``'s segmenter, registered as ``model`` ``version``.

    ``load`` is called once, and only when some case has no mask by this version yet. A case that
    fails on its own (not a storage error) is reported in ``failed`` and the others go on; storage
    errors raise (a rerun skips what was written). Masks are written and recorded under the lock
    ``predict:MODEL:VERSION``, so two runs at once (a repeated event) record each mask once. A case
    ingested from DICOM also gets its Segmentation and SR (``seg`` and ``sr`` in its ``predicted``
    entry; None for NIfTI input), from its original instances (under ``source`` first, as the ledger
    names them).
    """
    folder = folder_for(model, version)
    report = PredictReport(model, version, dest.url_of(folder))
    keys = {case: f"{folder}/{case}{MASK_SUFFIX}" for case in cases}
    urls = {case: dest.url_of(key) for case, key in keys.items()}
    with db.transaction() as conn:
        recorded = _recorded(conn, layout.pipeline, model, version, list(urls.values()))
    segmenter = None
    for i, case in enumerate(cases):
        if _present(dest, keys[case], recorded.get(urls[case])):
            report.skipped.append(case)
        else:
            try:
                if segmenter is None:
                    segmenter = load()
                item = load_case(layout.raw, case)
                spacing = item["attrs"].get("spacing") or np.sqrt((item["affine"][:3, :3] ** 2).sum(0)).tolist()
                originals = source_instances(db, layout.pipeline, case, source)  # before the work: it may fail
                mask = segmenter.segment(item["image"], item["affine"])
                classes = label_values(segmenter.config)
                volumes = label_volumes(mask, spacing, classes)
                blob = mask_nifti(mask, item["affine"])
                extra = {} if originals is None else _dicom_blobs(
                    dicom_results(originals, mask, segmenter.config.get("labels"), max(classes, default=0) + 1,
                                  volumes, model, version), keys[case], dest)
            except Exception as exc:  # noqa: BLE001 - classified: storage errors raise, the rest is this case's
                if is_transient(exc) or segmenter is None:
                    raise
                report.failed.append({"case": case, "reason": f"{type(exc).__name__}: {exc}"[:500]})
            else:
                sha = hashlib.sha256(blob).hexdigest()
                results = {name: url for name, (_, url, _) in extra.items()}
                details = json.dumps({"voxel_ml": voxel_ml(spacing), "volumes_ml": volumes,
                                      "shape": list(mask.shape), **results}, sort_keys=True)
                if _write(db, layout.pipeline, case, model, version, dest, keys[case], urls[case], blob, sha, details,
                          [(key, data) for key, _, data in extra.values()]):
                    report.predicted.append({"case": case, "mask": urls[case], "sha256": sha, "volumes_ml": volumes,
                                             "seg": results.get("seg"), "sr": results.get("sr")})
                else:
                    report.skipped.append(case)  # another run wrote it meanwhile
        if progress:
            progress(i + 1, len(cases))
    report.rows = table_rows(db, model, version, report.folder)
    if report.rows:
        report.table = dest.url_of(f"{folder}/{TABLE}")
        dest.write_bytes(f"{folder}/{TABLE}", to_csv(report.rows))
    if report.predicted or report.failed:
        audit.append(db, "data.predicted", "voxelflow", pipeline=layout.pipeline, model=model, version=version,
                     predicted=len(report.predicted), skipped=len(report.skipped), failed=len(report.failed),
                     cases=[p["case"] for p in report.predicted][:1000])
    return report


def _dicom_blobs(results, key: str, dest: Store) -> dict[str, tuple[str, str, bytes]]:
    """``seg`` and ``sr`` -> (key, URL, bytes): where a mask's DICOM results go, beside it."""
    stem = key[:-len(MASK_SUFFIX)]
    return {name: (stem + suffix, dest.url_of(stem + suffix), data)
            for name, suffix, data in (("seg", SEG_SUFFIX, results.seg), ("sr", SR_SUFFIX, results.sr))}


def _write(db: Database, pipeline: str, case: str, model: str, version: str, dest: Store, key: str, url: str,
           blob: bytes, sha: str, details: str, beside: Sequence[tuple[str, bytes]] = ()) -> bool:
    """Write one mask (and ``beside`` it, its DICOM results) and its row, unless another run did first;
    returns whether this one did."""
    with db.locked(f"predict:{model}:{version}") as conn:
        done = _recorded(conn, pipeline, model, version, [url])
        if _present(dest, key, done.get(url)):
            return False
        for other, data in beside:  # before the mask and its row: a row means everything is there
            dest.write_bytes(other, data)
        dest.write_bytes(key, blob)
        values = {"sha256": sha, "volumes": details, "at": now()}
        if done:  # recorded, but the mask was removed since: written again
            conn.execute(update(predictions).where(
                predictions.c.pipeline == pipeline, predictions.c.case_id == case, predictions.c.model == model,
                predictions.c.version == version, predictions.c.output == url).values(**values))
        else:
            conn.execute(insert(predictions).values(pipeline=pipeline, case_id=case, model=model, version=version,
                                                    output=url, **values))
    return True


def table_rows(db: Database, model: str, version: str, folder_url: str) -> list[dict[str, Any]]:
    """Every recorded mask of ``model`` ``version`` in ``folder_url``: the volumes table, by case."""
    with db.transaction() as conn:
        rows = conn.execute(select(predictions).where(
            predictions.c.model == model, predictions.c.version == version).order_by(predictions.c.case_id)).all()
    out: dict[str, dict[str, Any]] = {}
    prefix = folder_url.rstrip("/") + "/"
    for r in rows:
        if not r.output.startswith(prefix):
            continue
        details = json.loads(r.volumes)
        out[r.output] = {"case": r.case_id, "mask": r.output[len(prefix):], "model": r.model, "version": r.version,
                         "sha256": r.sha256, "voxel_ml": details["voxel_ml"],
                         **{f"label_{k}_ml": v for k, v in details["volumes_ml"].items()},
                         "predicted_at": r.at.isoformat() if r.at else ""}
    return list(out.values())


def to_csv(rows: list[dict[str, Any]]) -> bytes:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="0", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def default_destination(store_url: str, pipeline: str) -> str:
    """Where the ``predict`` flow writes when not told: ``predictions/<pipeline>`` in the store."""
    return Store(store_url).url_of(f"predictions/{pipeline}")


def run(
    db: Database,
    layout: Layout,
    tracking_uri: str,
    model: ModelRef,
    dest: str,
    cases: list[str] | None = None,
    source: str | None = None,
    progress: Progress | None = None,
    device: str | None = None,
) -> PredictReport:
    """Choose the unlabelled cases (all, ``cases``, or those under ``source``), resolve the model and
    predict what this version has not predicted yet into ``dest``."""
    check_destination(dest, source)
    out = Store(dest)
    chosen = select_cases(db, layout, cases, source)
    if not chosen.unlabelled:
        return PredictReport(model.name, None, out.url, labelled=chosen.labelled)
    version = model.resolve(tracking_uri)

    def load():
        with tempfile.TemporaryDirectory(prefix="voxelflow-predict-") as tmp:  # the segmenter holds its weights
            return registry.load_version(tracking_uri, model.name, version, Path(tmp), device)

    report = predict(db, layout, chosen.unlabelled, model.name, version, load, out, progress, source)
    report.labelled = chosen.labelled
    return report
