from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.progress import reporter
from voxelflow.config import DataSpec
from voxelflow.ingest import IngestReport
from voxelflow.pipeline import Context, ingest_stage


@task(name="ingest", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def ingest(data: DataSpec, ctx: Context) -> IngestReport:
    """Decode, check and store new cases as Zarr; every object gets a ledger state."""
    return ingest_stage(data, ctx, progress=reporter("ingest", f"ingesting {data.source}"))
