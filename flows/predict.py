"""Batch inference on arrival: the flow behind the ``predict/<pipeline>`` deployments.

When an ingest stores new unlabelled cases, ``flows/ingest.py`` emits ``voxelflow.cases.unlabelled``
(payload: the source and the new case ids); the deployment's trigger runs this flow with them, the
deployment's own spec and the event as ``announcement`` (refused, and audited, when it concerns another
pipeline or its payload carries more than data references). It
segments each with the registered model (default: the spec's ``promote.model_name@champion``),
writes the masks as NIfTI next to a table of per-label volumes in mL (:mod:`voxelflow.serving.predict`),
records which version produced each mask, and leaves a progress artifact and a table artifact
(case ids and volumes only, never file names). Without ``cases`` it segments every unlabelled case
of the pipeline that the model's version has not segmented yet; with ``source`` it ingests that
source first and segments the unlabelled cases found there (what ``voxelflow predict`` does).

``arrived`` (deployment ``predict-arrived/<pipeline>``) is the flow for series ``voxelflow receive`` or a
DICOMweb watch put in the spool: one of its own, on ``voxelflow.data.arrived``, because those series are
routed before anything is ingested (labelled: ingestion; unlabelled: clinical inference from the spool,
results back to the PACS), where ``predict`` works on cases an ingest stored.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.up import begin
from tasks import artifacts
from tasks.ingest import ingest_arrived
from tasks.predict import predict_cases
from tasks.retry import transient_only
from voxelflow.data.watch import CASES_UNLABELLED
from voxelflow.pipeline import Context
from voxelflow.serving.predict import ModelRef, default_destination


@flow(name="predict", log_prints=False)
def predict(spec: str, cases: list[str] | None = None, source: str | None = None, out: str | None = None,
            model: str | None = None, announcement: dict | None = None, spec_digest: str | None = None) -> dict:
    """Segment the unlabelled cases ``cases`` (default: every one not segmented yet) of the spec's pipeline;
    ``announcement`` is the triggering event (its id, name, resource and payload keys)."""
    with artifacts.flushing():
        loaded, ctx = begin(spec, spec_digest, CASES_UNLABELLED, announcement,
                            sets=[f"data.source={source}"] if source else None)
        logger = get_run_logger()
        ref = str(ModelRef.parse(model or loaded.promote.model_name))  # a bad reference fails before any work
        dest = ctx.settings.expand(out) if out else default_destination(ctx.settings.store_url, loaded.name)
        if source:
            ingest_arrived(loaded.data, ctx)
        report = predict_cases(ctx, ref, dest, cases=cases, source=ctx.settings.expand(source) if source else None)
        for p in report.predicted:
            logger.info("segmented %s: %s", p["case"], p["sha256"][:16])
        if report.labelled:
            logger.info("%d labelled case(s) left alone: batch inference segments unlabelled cases", len(report.labelled))
        rows = [{"case": p["case"], "status": "predicted", "mask": p["mask"].rsplit("/", 1)[-1],
                 "volumes_ml": ", ".join(f"{k}: {v}" for k, v in p["volumes_ml"].items()), "reason": ""}
                for p in report.predicted]
        rows += [{"case": f["case"], "status": "failed", "mask": "", "volumes_ml": "", "reason": f["reason"]}
                 for f in report.failed]
        rows += [{"case": c, "status": "skipped", "mask": "", "volumes_ml": "",
                  "reason": f"already segmented by version {report.version}"} for c in report.skipped]
        slug = loaded.name.lower().replace("_", "-").replace(".", "-")
        where = f" into {report.folder}" + (f" (table {report.table})" if report.table else "")
        artifacts.table(rows[:1000], key=f"predictions-{slug}",
                        description=f"{ref} (version {report.version or 'not needed'}): {len(report.predicted)} "
                                    f"segmented, {len(report.skipped)} skipped, {len(report.failed)} failed{where}")
        if report.failed:
            raise RuntimeError(f"{len(report.failed)} case(s) could not be segmented (the other masks were written): "
                               + "; ".join(f"{f['case']}: {f['reason']}" for f in report.failed[:3]))
        return report.summary()


@flow(name="predict-arrived", log_prints=False)
def arrived(spec: str, source: str | None = None, announcement: dict | None = None,
            spec_digest: str | None = None) -> dict:
    """Route what ``voxelflow receive`` or the DICOMweb watcher put in the spool (``source``: the series the
    triggering ``voxelflow.data.arrived`` names; without it, every series of the pipeline's spool not done yet):
    a labelled series is ingested de-identified (and, when the dataset grew enough, the lifecycle announced),
    an unlabelled one segmented by the champion and its SEG and SR sent to VOXELFLOW_DICOM_DESTINATION
    (:mod:`voxelflow.serving.clinical`). An arrival from anywhere else is ``voxelflow watch``'s, left to
    ``ingest-arrived``. Logs, artifacts and the result name series by hashes only."""
    with artifacts.flushing():
        from flows.ingest import announce_dataset
        from voxelflow.data.watch import DATA_ARRIVED
        from voxelflow.serving import clinical

        loaded, ctx = begin(spec, spec_digest, DATA_ARRIVED, announcement,
                            data=lambda d: d.model_copy(update={"layout": "dicom"}))
        logger = get_run_logger()
        spool = clinical.spool_of(ctx.settings, loaded.name)
        if source is not None:
            key = clinical.series_key(spool, source)
            if key is None:
                logger.info("not a series of the spool: left to ingest-arrived")
                return {"routed": 0}
            keys = [key]
        else:
            keys = clinical.pending(spool)
        unlabelled = loaded.triggers.unlabelled
        report = route_series(ctx, loaded.data, spool, str(ModelRef.parse(loaded.promote.model_name)), keys,
                              bool(unlabelled and unlabelled.predict))
        for o in report.outcomes:
            logger.info("series %s: %s%s%s", o.series, o.route, f" ({o.reason})" if o.reason else "",
                        ", results acknowledged" if o.acknowledged else "")
        if report.sent is not None:
            logger.info("sent to %s: %d sent, %d pending, %d refused", report.sent["destination"], report.sent["sent"],
                        report.sent["pending"], report.sent["refused"])
        rows = [{"series": o.series, "route": o.route, "version": o.version or "", "case": o.case or "",
                 "volumes_ml": ", ".join(f"{k}: {v}" for k, v in o.volumes_ml.items()),
                 "acknowledged": o.acknowledged, "deleted": o.deleted, "reason": o.reason} for o in report.outcomes]
        slug = loaded.name.lower().replace("_", "-").replace(".", "-")
        artifacts.table(rows[:1000], key=f"received-{slug}",
                        description=f"received series of {loaded.name} (hashes only): {report.summary()}")
        summary = report.summary()
        if report.ingest is not None:
            summary["announced"] = announce_dataset(ctx, loaded, report.ingest)
        failed = [o for o in report.outcomes if o.route == clinical.FAILED]
        if failed:
            raise RuntimeError(f"{len(failed)} received series could not be routed (they stay in the spool): "
                               + "; ".join(f"{o.series}: {o.reason}" for o in failed[:3]))
        return summary


@task(name="route-series", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE,
      retry_condition_fn=transient_only)
def route_series(ctx: Context, data, spool, model: str, keys: list[str], predict: bool):
    """Route each series (retried for storage, registry and network outages only: a retry skips what is done)."""
    from voxelflow.serving import clinical

    return clinical.route(ctx.db, ctx.settings, ctx.layout, spool, data, ModelRef.parse(model), keys, predict)
