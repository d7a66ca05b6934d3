"""Ingestion started by arriving data: the flow behind the ``ingest-arrived/on-arrival`` deployment.

``voxelflow watch`` emits ``voxelflow.data.arrived`` for each settled batch; the deployment's trigger
runs this flow with the event's spec and source. It ingests, leaves a table artifact of every
object's fate (hashes and case ids only, never file names), and, when the dataset grew by
``data.retrain_after`` cases since it was last announced, emits ``voxelflow.dataset.updated``, which
triggers the ``lifecycle/on-update`` deployment. When it stored new unlabelled cases it emits
``voxelflow.cases.unlabelled`` (their case ids), which triggers ``predict/on-unlabelled`` (flows/predict.py).
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.events import emit_event

from tasks.ingest import ingest_arrived
from tasks.settings import run_settings
from voxelflow.config import load_spec
from voxelflow.ingest import read_ledger
from voxelflow.pipeline import Context
from voxelflow.watch import dataset_update


@flow(name="ingest-arrived", log_prints=False)
def ingest(spec: str, source: str | None = None, objects: list[str] | None = None) -> dict:
    """Ingest ``source`` (default: the spec's ``data.source``) under the spec's pipeline."""
    loaded = load_spec(spec, sets=[f"data.source={source}"] if source else None)
    ctx = Context(run_settings(loaded.data), loaded.name)
    logger = get_run_logger()
    report = ingest_arrived(loaded.data, ctx)
    wanted = set(objects or [])
    rows = [{"sha256": r["sha256"][:16], "state": r["state"], "case": r["case_id"] or "", "reason": r["reason"] or ""}
            for r in read_ledger(ctx.db, loaded.name) if not wanted or r["object"] in wanted]
    create_table_artifact(rows[-1000:], key=f"arrivals-{loaded.name.lower().replace('_', '-').replace('.', '-')}",
                          description=f"fate of each arrived object ({len(rows)}; hashes and case ids only)")
    summary = report.summary()
    for cid in report.ingested:
        logger.info("ingested %s", cid)
    for q in report.quarantined:  # the case name may be a file name: the reason only
        logger.warning("quarantined a case: %s", q["reason"])
    new = dataset_update(ctx.db, loaded.name, report.case_ids, loaded.data.retrain_after)
    if new:
        emit_event(event="voxelflow.dataset.updated",
                   resource={"prefect.resource.id": f"voxelflow.dataset.{loaded.name}"},
                   payload={"spec": spec, "source": loaded.data.source, "new_cases": new,
                            "cases": len(report.case_ids),
                            "dataset_digest": report.dataset_digest})
        logger.info("dataset %s: %d new cases, announced", report.dataset_digest, new)
    unlabelled = set(report.unlabelled)
    fresh = [cid for cid in report.ingested if cid in unlabelled]  # new unlabelled cases: predict/on-unlabelled
    if fresh:
        emit_event(event="voxelflow.cases.unlabelled",
                   resource={"prefect.resource.id": f"voxelflow.dataset.{loaded.name}"},
                   payload={"spec": spec, "cases": fresh, "count": len(fresh)})
        logger.info("%d new unlabelled cases, announced for batch inference", len(fresh))
    return {**summary, "announced": new or 0, "unlabelled_announced": len(fresh)}
