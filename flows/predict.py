"""Batch inference on arrival: the flow behind the ``predict/on-unlabelled`` deployment.

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
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from tasks.ingest import ingest_arrived
from tasks.predict import predict_cases
from tasks.settings import run_settings
from voxelflow.data.watch import CASES_UNLABELLED, accept_announcement
from voxelflow.pipeline import Context
from voxelflow.serving.predict import ModelRef, default_destination
from voxelflow.spec.config import load_spec


@flow(name="predict", log_prints=False)
def predict(spec: str, cases: list[str] | None = None, source: str | None = None, out: str | None = None,
            model: str | None = None, announcement: dict | None = None) -> dict:
    """Segment the unlabelled cases ``cases`` (default: every one not segmented yet) of the spec's pipeline;
    ``announcement`` is the triggering event (its id, name, resource and payload keys)."""
    loaded = load_spec(spec, sets=[f"data.source={source}"] if source else None)
    ctx = Context(run_settings(loaded.data), loaded.name)
    logger = get_run_logger()
    if announcement is not None:
        accept_announcement(ctx.db, loaded.name, announcement, CASES_UNLABELLED)
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
    create_table_artifact(rows[:1000], key=f"predictions-{slug}",
                          description=f"{ref} (version {report.version or 'not needed'}): {len(report.predicted)} "
                                      f"segmented, {len(report.skipped)} skipped, {len(report.failed)} failed{where}")
    if report.failed:
        raise RuntimeError(f"{len(report.failed)} case(s) could not be segmented (the other masks were written): "
                           + "; ".join(f"{f['case']}: {f['reason']}" for f in report.failed[:3]))
    return report.summary()
