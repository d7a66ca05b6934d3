from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.progress import reporter
from tasks.retry import transient_only
from voxelflow.data.ingest import IngestReport
from voxelflow.spec.config import DataSpec
from voxelflow.stages.context import Context
from voxelflow.stages.ingest import ingest_stage


@task(name="ingest", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE, retry_condition_fn=transient_only)
def ingest(data: DataSpec, ctx: Context, dataset: str | None = None) -> IngestReport:
    """Decode, check and store new cases as Zarr; every object gets a ledger state. With ``dataset`` (the
    digest a triggering ingest announced), the dataset it recorded, while the ledger still holds that one."""
    return _said(ingest_stage(data, ctx, progress=reporter("ingest", f"ingesting {data.source}"), dataset=dataset))


@task(name="ingest-arrived", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE,
      retry_condition_fn=transient_only)
def ingest_arrived(data: DataSpec, ctx: Context) -> IngestReport:
    """Ingest what arrived; an ingest that found nothing new is fine."""
    return _said(ingest_stage(data, ctx, progress=reporter("ingest", "ingesting arrived data"), require_cases=False))


def _said(report: IngestReport) -> IngestReport:
    """The run's warnings (de-identification off, ...) in the task's log, at every run."""
    for message in report.warnings:
        get_run_logger().warning(message)
    return report

