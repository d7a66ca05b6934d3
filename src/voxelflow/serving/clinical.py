"""Received series, routed: labelled ones become training data, unlabelled ones are segmented and sent back.

A series that ``voxelflow receive`` or the DICOMweb watcher put in the spool (:mod:`voxelflow.data.spool`)
takes one of two routes (:func:`route`):

* **ingestion** when ``labels.json`` in the spec's ``data.source`` names its SeriesInstanceUID: the
  series and that label are ingested as any DICOM case is, de-identified before anything is stored;
* **clinical inference** otherwise: the series is checked against ``data.accept`` (modality, body part,
  slices; a series outside it is ``skipped`` with the reason), segmented by ``promote.model_name@champion``
  from its identified instances, read from the spool only and held in memory, and its DICOM Segmentation
  and SR, which reference those original instances, are written beside the spool
  (``spool/PIPELINE/.results/STUDY/SERIES/``, with the NIfTI mask) and sent to
  ``VOXELFLOW_DICOM_DESTINATION`` (:func:`voxelflow.serving.dicom_send.deliver`).

A series is *done* once it was ingested or skipped, or once the destination acknowledged each of its
results (the ``sends`` table says ``sent``). The spool's retention (``VOXELFLOW_SPOOL_RETENTION_H``) then
applies: the series, its results and its mask are deleted from the spool at once (0, the default) or that
many hours later, at a later run (:func:`sweep`). A series whose results were not acknowledged stays, and
the next run sends them again. Everything recorded outside the spool (the predictions and sends tables, the
audit log, the ledger, the outcome this returns) names a series by the hashes of its study and series
UIDs only; its identified bytes never leave the spool.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
from sqlalchemy import select

from voxelflow.core import audit, transient
from voxelflow.core.db import Database, sends
from voxelflow.core.settings import Settings
from voxelflow.core.storage import Layout, Store
from voxelflow.data import dicom, dicom_series
from voxelflow.data import ingest as ingestion
from voxelflow.data.sources import SourceCase, _escapes, _join, _leaves_by_link
from voxelflow.data.spool import Spool
from voxelflow.release import registry
from voxelflow.serving import dicom_send
from voxelflow.serving import predict as batch
from voxelflow.serving.dicom_results import dicom_results
from voxelflow.spec.config import DataSpec

RESULTS, DONE = ".results", ".done"  # under spool/PIPELINE: never listed as a series (Spool.series skips dot names)
INGESTED, PREDICTED, SKIPPED, FAILED = "ingested", "predicted", "skipped", "failed"
_HASH = re.compile(r"^[0-9a-f]{24}$")


@dataclass
class Outcome:
    """What became of one series: its hashes only (``study/series``), the route and the reason."""

    series: str
    route: str  # ingested, predicted, skipped, failed
    reason: str = ""
    case: str | None = None  # ingested: the de-identified case id
    version: str | None = None  # predicted: the model version
    volumes_ml: dict[str, float] = field(default_factory=dict)
    acknowledged: bool = False  # predicted: every result acknowledged by the destination
    deleted: bool = False  # removed from the spool by this run


@dataclass
class ClinicalReport:
    outcomes: list[Outcome] = field(default_factory=list)
    ingest: ingestion.IngestReport | None = None  # the labelled series' ingest (the dataset after it)
    sent: dict[str, Any] | None = None  # the send report's summary (None: no destination configured)
    swept: list[str] = field(default_factory=list)  # series deleted by retention

    def summary(self) -> dict[str, Any]:
        counts = {r: sum(o.route == r for o in self.outcomes) for r in (INGESTED, PREDICTED, SKIPPED, FAILED)}
        return {**counts, "sent": self.sent, "deleted": len(self.swept) + sum(o.deleted for o in self.outcomes)}


# ---------------------------------------------------------------- which series


def series_key(spool: Spool, source: str) -> str | None:
    """The spool key of the series an arrival's ``source`` names; None when it names no series of this spool."""
    prefix = spool.store.url_of(spool.prefix).rstrip("/") + "/"
    if not source.startswith(prefix):
        return None
    parts = source[len(prefix):].strip("/").split("/")
    if len(parts) != 2 or not all(_HASH.match(p) for p in parts):
        return None
    return spool.series_key(*parts)


def _hashes(spool: Spool, key: str) -> str:
    return key[len(spool.prefix) + 1:]  # STUDY_HASH/SERIES_HASH


def _case(spool: Spool, key: str) -> str:
    """The case id of a received series in the predictions and sends tables: ``rx-`` and its series hash."""
    return "rx-" + key.rsplit("/", 1)[-1]


def pending(spool: Spool) -> list[str]:
    """The spool's series that are not done yet."""
    return [k for k in spool.series() if not spool.store.exists(_marker(spool, k))]


# ---------------------------------------------------------------- checks


def check_accept(accept: Any, datasets: list[Any]) -> str | None:
    """Why ``data.accept`` refuses a series (its instances' headers), or None when it accepts it."""
    if accept is None:
        return None
    first = datasets[0]
    modality = str(first.get("Modality", "") or "")
    if accept.modalities and modality.upper() not in {m.upper() for m in accept.modalities}:
        return f"modality {modality or '(none)'} is not in data.accept.modalities ({', '.join(accept.modalities)})"
    part = str(first.get("BodyPartExamined", "") or "")
    if accept.body_parts and part.upper() not in {b.upper() for b in accept.body_parts}:
        return f"body part {part or '(none)'} is not in data.accept.body_parts ({', '.join(accept.body_parts)})"
    slices = sum(int(ds.get("NumberOfFrames", 1) or 1) for ds in datasets)
    if slices < accept.min_slices:
        return f"{slices} slices, fewer than data.accept.min_slices ({accept.min_slices})"
    if accept.max_slices is not None and slices > accept.max_slices:
        return f"{slices} slices, more than data.accept.max_slices ({accept.max_slices})"
    return None


def label_for(data: DataSpec, settings: Settings, series_uid: str) -> str | None:
    """The label ``labels.json`` in ``data.source`` names for a SeriesInstanceUID (its URL), or None."""
    source = settings.expand(data.source)
    fs, root = fsspec.core.url_to_fs(source)
    try:
        labels = dicom_series.labels(fs, _join(root, dicom_series.LABELS_MANIFEST), source)
    except FileNotFoundError:
        return None
    rel = labels.get(series_uid)
    if rel is None:
        return None
    why = _escapes(rel) or (f"{rel!r} is a link to outside the source" if _leaves_by_link(fs, root, _join(root, rel))
                            else None)
    if why:
        raise ValueError(f"{dicom_series.LABELS_MANIFEST}: a label entry {why}")
    proto = source.split("://", 1)[0] + "://" if "://" in source else ""
    path = _join(root, rel)
    return path if not proto or path.startswith(proto) else proto + path


# ---------------------------------------------------------------- the routes


def _headers(spool: Spool, key: str) -> list[Any]:
    """The headers of a series' instances (no pixels), from the spool."""
    import pydicom

    out = []
    for o in spool.objects(key):
        with spool.store.fs.open(spool.store.path(o["key"]), "rb") as fh:
            out.append(pydicom.dcmread(fh, stop_before_pixels=True))
    return out


def _read(spool: Spool, key: str) -> list[dicom.Slice]:
    """Every instance of a series, parsed in memory from the spool (identified: it is never written elsewhere)."""
    return [dicom.parse(spool.store.read_bytes(o["key"]), f"instance {o['version'][:16]}")
            for o in spool.objects(key)]


def ingest_series(data: DataSpec, layout: Layout, db: Database, spool: Spool, key: str, label: str,
                  deid_key: str | None) -> ingestion.IngestReport:
    """Ingest one labelled spool series with its label, de-identified (unless ``data.deidentify`` is none)."""
    if data.deidentify != "none" and not deid_key:
        raise ValueError("a received labelled series is ingested de-identified and needs a de-identification key: "
                         "set VOXELFLOW_DEID_KEY (in a flow run: the Prefect Secret block named by "
                         "VOXELFLOW_DEID_KEY_BLOCK)")
    store = spool.store
    urls = {store.path(o["key"]): store.url_of(o["key"]) for o in spool.objects(key)}
    groups = dicom_series.group(store.fs, sorted(urls), lambda p: urls[p])
    report = ingestion.IngestReport()
    for i, series in enumerate(groups.values()):
        case = SourceCase(f"received{i}", series.keys[0], label, None, tuple(series.keys), series.not_dicom,
                          series.voxels, series.pixel_bytes)
        ingestion.merge(report, ingestion.ingest_case(case, data, layout, db, deid_key))
    report.arrived = len(urls)
    return ingestion.finish(report, layout, db)


def _result_keys(spool: Spool, key: str, model: str, version: str) -> dict[str, str]:
    stem = f"{spool.prefix}/{RESULTS}/{_hashes(spool, key)}/{batch.folder_for(model, version)}"
    return {"mask": stem + batch.MASK_SUFFIX, "seg": stem + batch.SEG_SUFFIX, "sr": stem + batch.SR_SUFFIX}


def segment_series(db: Database, data: DataSpec, spool: Spool, key: str, slices: list[dicom.Slice], model: str,
                   version: str, load: Callable[[], Any]) -> dict[str, Any]:
    """Segment one series (unless this version did: its results are still there) and write its mask, SEG and
    SR into the spool's results; the ``predicted`` entry :func:`~voxelflow.serving.dicom_send.deliver` sends."""
    store, case = spool.store, _case(spool, key)
    keys = _result_keys(spool, key, model, version)
    url = store.url_of(keys["mask"])
    entry = {"case": case, "mask": url, "seg": store.url_of(keys["seg"]), "sr": store.url_of(keys["sr"])}
    with db.transaction() as conn:
        recorded = batch._recorded(conn, spool.pipeline, model, version, [url]).get(url)
    if batch._present(store, keys["mask"], recorded):
        return {**entry, "sha256": None, "volumes_ml": recorded["volumes_ml"], "new": False}
    image = dicom.stack(slices, data.max_voxels)
    segmenter = load()
    mask = segmenter.segment(image.array, image.affine)
    classes = batch.label_values(segmenter.config)
    volumes = batch.label_volumes(mask, image.spacing, classes)
    results = dicom_results([s.dataset for s in slices], mask, segmenter.config.get("labels"),
                            max(classes, default=0) + 1, volumes, model, version)
    blob = batch.mask_nifti(mask, image.affine)
    sha = hashlib.sha256(blob).hexdigest()
    details = json.dumps({"voxel_ml": batch.voxel_ml(image.spacing), "volumes_ml": volumes,
                          "shape": list(mask.shape), "seg": entry["seg"], "sr": entry["sr"]}, sort_keys=True)
    new = batch._write(db, spool.pipeline, case, model, version, store, keys["mask"], url, blob, sha, details,
                       [(keys["seg"], results.seg), (keys["sr"], results.sr)])
    return {**entry, "sha256": sha, "volumes_ml": volumes, "new": new}


def acknowledged(db: Database, settings: Settings, pipeline: str, case: str, model: str, version: str) -> bool:
    """Whether the configured destination acknowledged every result of ``case`` by this version."""
    if not settings.dicom_destination:
        return False
    dest = str(dicom_send.Destination.parse(settings.dicom_destination))
    with db.transaction() as conn:
        states = {r.kind: r.state for r in conn.execute(select(sends.c.kind, sends.c.state).where(
            sends.c.pipeline == pipeline, sends.c.case_id == case, sends.c.model == model,
            sends.c.version == version, sends.c.destination == dest))}
    return all(states.get(kind) == dicom_send.SENT for kind in dicom_send.KINDS)


# ---------------------------------------------------------------- retention


def _marker(spool: Spool, key: str) -> str:
    return f"{spool.prefix}/{DONE}/{_hashes(spool, key)}.json"


def done(db: Database, spool: Spool, key: str, route: str, retention_h: float, at: float | None = None) -> bool:
    """Mark a series done; with no retention it is deleted at once (returns whether it was)."""
    spool.store.write_json(_marker(spool, key), {"at": time.time() if at is None else at, "route": route})
    if retention_h > 0:
        return False
    _delete(db, spool, key, route)
    return True


def _delete(db: Database, spool: Spool, key: str, route: str) -> None:
    spool.store.remove(key)
    spool.store.remove(f"{spool.prefix}/{RESULTS}/{_hashes(spool, key)}")
    spool.store.remove(_marker(spool, key))
    study = key.rsplit("/", 2)[-2]
    for folder in (f"{spool.prefix}/{study}", f"{spool.prefix}/{RESULTS}/{study}", f"{spool.prefix}/{DONE}/{study}"):
        if spool.store.local and not spool.store.list(folder):  # an empty study folder: gone too
            spool.store.remove(folder)
    audit.append(db, "spool.deleted", "voxelflow", pipeline=spool.pipeline, series=_hashes(spool, key), route=route)


def sweep(db: Database, spool: Spool, retention_h: float, at: float | None = None) -> list[str]:
    """Delete the done series whose retention has passed; returns their hashes (``study/series``)."""
    at = time.time() if at is None else at
    gone = []
    for study in spool.store.list(f"{spool.prefix}/{DONE}"):
        for name in spool.store.list(f"{spool.prefix}/{DONE}/{study}"):
            key = spool.series_key(study, name.removesuffix(".json"))
            try:
                mark = spool.store.read_json(_marker(spool, key))
            except (FileNotFoundError, ValueError):
                continue
            if at - float(mark.get("at", at)) >= retention_h * 3600:
                _delete(db, spool, key, str(mark.get("route", "")))
                gone.append(_hashes(spool, key))
    return gone


# ---------------------------------------------------------------- one run


def route(db: Database, settings: Settings, layout: Layout, spool: Spool, data: DataSpec, model: Any,
          keys: list[str], predict: bool = True, device: str | None = None) -> ClinicalReport:
    """Route each spool series of ``keys`` (default of the caller: :func:`pending`), send what was segmented,
    then apply the retention. ``model`` is a :class:`~voxelflow.serving.predict.ModelRef`; ``predict`` false
    (triggers.unlabelled.predict off) records unlabelled series as skipped. A series that fails on its own is
    ``failed`` and stays; storage and registry outages raise (a rerun does what is left)."""
    report, deid_key = ClinicalReport(), settings.deid_key.get_secret_value() if settings.deid_key else None
    version: str | None = None
    segmenter: list[Any] = []
    retention = settings.spool_retention_h
    predicted: list[tuple[Outcome, dict[str, Any]]] = []

    def load():
        if not segmenter:
            with tempfile.TemporaryDirectory(prefix="voxelflow-clinical-") as tmp:
                segmenter.append(registry.load_version(settings.tracking_uri, model.name, version, Path(tmp), device))
        return segmenter[0]

    for key in keys:
        out = Outcome(_hashes(spool, key), FAILED)
        report.outcomes.append(out)
        try:
            if not spool.objects(key):
                out.reason = "the series is no longer in the spool"
                continue
            headers = _headers(spool, key)
            label = label_for(data, settings, str(headers[0].get("SeriesInstanceUID", "")))
            if label is not None:
                ingested = ingest_series(data, layout, db, spool, key, label, deid_key)
                report.ingest = ingested
                if ingested.quarantined:
                    out.reason = f"quarantined: {ingested.quarantined[0]['reason']}"[:300]
                    out.route = SKIPPED
                else:
                    out.route, out.case = INGESTED, (ingested.ingested or [None])[0]
                out.deleted = done(db, spool, key, out.route, retention)
                continue
            why = check_accept(data.accept, headers) or (
                None if predict else "triggers.unlabelled.predict is off")
            if why:
                out.route, out.reason = SKIPPED, why
                audit.append(db, "clinical.skipped", "voxelflow", pipeline=spool.pipeline, series=out.series,
                             reason=why)
                out.deleted = done(db, spool, key, SKIPPED, retention)
                continue
            if version is None:
                version = model.resolve(settings.tracking_uri)
            slices = _read(spool, key)
            entry = segment_series(db, data, spool, key, slices, model.name, version, load)
            out.route, out.version, out.volumes_ml = PREDICTED, version, entry["volumes_ml"]
            predicted.append((out, entry))
        except Exception as exc:  # noqa: BLE001 - classified: outages raise, the rest is this series' own
            if transient.is_transient(exc) or isinstance(exc, LookupError):
                raise
            out.reason = f"{type(exc).__name__}: {exc}"[:300]
    if predicted:
        audit.append(db, "clinical.predicted", "voxelflow", pipeline=spool.pipeline, model=model.name,
                     version=version, series=[o.series for o, _ in predicted][:1000])
    sent = dicom_send.deliver(db, settings, spool.pipeline, batch.PredictReport(
        model.name, version, spool.store.url_of(f"{spool.prefix}/{RESULTS}"), predicted=[e for _, e in predicted]))
    report.sent = sent.summary() if sent is not None else None
    for out, entry in predicted:
        out.acknowledged = acknowledged(db, settings, spool.pipeline, entry["case"], model.name, version)
        if out.acknowledged:
            out.deleted = done(db, spool, spool.series_key(*out.series.split("/")), "sent", retention)
    for out in report.outcomes:
        if out.route == FAILED:
            audit.append(db, "clinical.failed", "voxelflow", pipeline=spool.pipeline, series=out.series,
                         reason=out.reason)
    report.swept = sweep(db, spool, retention) if retention > 0 else []
    return report


def spool_of(settings: Settings, pipeline: str) -> Spool:
    """The pipeline's spool, for reading and deleting series (staging is the receiver's and the watcher's)."""
    store = Store(settings.store_url)
    return Spool(store, pipeline, None if store.local else settings.root / "spool-incoming")
