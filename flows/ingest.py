"""Ingestion started by arriving data: the flow behind the ``ingest-arrived/<pipeline>`` deployments.

``voxelflow watch`` emits ``voxelflow.data.arrived`` for each settled batch; the deployment's trigger
runs this flow with the deployment's own spec (a parameter fixed when the deployment was made),
the event's source and the event as ``announcement``, which is refused when it concerns another
pipeline or its payload carries more than data references (:func:`voxelflow.data.watch.accept_announcement`).
It ingests, leaves a table artifact of every object's fate (hashes and case ids only, never file
names), and, when the dataset grew by ``triggers.dataset_updated.min_new_cases`` cases since it was last announced,
emits ``voxelflow.dataset.updated``, which triggers the ``lifecycle/<pipeline>`` deployment. When it
stored unlabelled cases not announced before it emits ``voxelflow.cases.unlabelled`` (their case
ids), which triggers ``predict/<pipeline>`` (flows/predict.py). Both are sent, and confirmed,
before they are recorded as announced, with ids derived from what they announce: a run that fails
in between is rerun and announces the same event again, which Prefect runs once.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.announce import send
from flows.up import begin
from tasks import artifacts
from tasks.ingest import ingest_arrived
from voxelflow.data.ingest import read_ledger
from voxelflow.data.watch import (
    CASES_UNLABELLED,
    DATA_ARRIVED,
    DATASET_UPDATED,
    dataset_update,
    unlabelled_update,
)
from voxelflow.pipeline import Context


@flow(name="ingest-arrived", log_prints=False)
def ingest(spec: str, source: str | None = None, objects: list[str] | None = None,
           announcement: dict | None = None, spec_digest: str | None = None) -> dict:
    """Ingest ``source`` (default: the spec's ``data.source``) under the spec's pipeline; ``announcement``
    is the triggering event (its id, name, resource and payload keys), checked before anything is read."""
    with artifacts.flushing():
        loaded, ctx = begin(spec, spec_digest, DATA_ARRIVED, announcement,
                            sets=[f"data.source={source}"] if source else None)
        logger = get_run_logger()
        if source and _received(ctx, loaded.name, source):  # predict-arrived routes it (flows/predict.py)
            logger.info("a received DICOM series: routed by predict-arrived, not ingested here")
            return {"routed": "predict-arrived"}
        report = ingest_arrived(loaded.data, ctx)
        wanted = set(objects or [])
        rows = [{"sha256": r["sha256"][:16], "state": r["state"], "case": r["case_id"] or "", "reason": r["reason"] or ""}
                for r in read_ledger(ctx.db, loaded.name) if not wanted or r["object"] in wanted]
        artifacts.table(rows[-1000:], key=f"arrivals-{loaded.name.lower().replace('_', '-').replace('.', '-')}",
                        description=f"fate of each arrived object ({len(rows)}; hashes and case ids only)")
        summary = report.summary()
        for cid in report.ingested:
            logger.info("ingested %s", cid)
        for q in report.quarantined:  # the case name may be a file name: the reason only
            logger.warning("quarantined a case: %s", q["reason"])

        def unlabelled(event_id, cases: list[str]) -> None:  # predict/<pipeline> segments them
            send(CASES_UNLABELLED, loaded.name, {"source": loaded.data.source, "cases": cases, "count": len(cases)},
                 event_id)
            logger.info("%d new unlabelled cases, announced for batch inference (event %s)", len(cases), event_id)

        new = announce_dataset(ctx, loaded, report)
        fresh = unlabelled_update(ctx.db, loaded.name, report.unlabelled, unlabelled)
        return {**summary, "announced": new, "unlabelled_announced": len(fresh)}


def announce_dataset(ctx: Context, loaded, report) -> int:
    """Emit voxelflow.dataset.updated when the ingest's dataset (``report``) holds the spec's
    ``triggers.dataset_updated.min_new_cases`` cases not in the last announced one (sent before it is recorded
    as announced); the number of new cases announced, 0 when none."""
    logger = get_run_logger()

    def updated(event_id, new: int) -> None:
        send(DATASET_UPDATED, loaded.name, {"source": loaded.data.source, "new_cases": new,
                                            "cases": len(report.case_ids), "dataset_digest": report.dataset_digest},
             event_id)
        logger.info("dataset %s: %d new cases, announced (event %s)", report.dataset_digest, new, event_id)

    return dataset_update(ctx.db, loaded.name, report.case_ids, loaded.triggers.min_new_cases(), updated) or 0


def _received(ctx: Context, pipeline: str, source: str) -> bool:
    """Whether ``source`` is a series that voxelflow receive or a DICOMweb watch put in the spool."""
    from voxelflow.serving import clinical

    return clinical.series_key(clinical.spool_of(ctx.settings, pipeline), source) is not None
