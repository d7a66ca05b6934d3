from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.progress import reporter
from tasks.retry import transient_only
from voxelflow.data.preprocess import PreprocessReport
from voxelflow.spec.config import PreprocessSpec
from voxelflow.stages.context import Context
from voxelflow.stages.preprocess import preprocess_stage


@task(name="preprocess", retries=2, retry_delay_seconds=5, timeout_seconds=3600, cache_policy=NO_CACHE,
      retry_condition_fn=transient_only)
def preprocess(spec: PreprocessSpec, ctx: Context, case_ids: list[str]) -> PreprocessReport:
    """Apply the spec's transforms to new cases, shard by shard, on a Dask cluster."""
    return preprocess_stage(spec, ctx, case_ids, progress=reporter("preprocess", "preprocessing shards"))
