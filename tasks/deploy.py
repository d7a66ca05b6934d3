from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from voxelflow.config import DeploySpec
from voxelflow.pipeline import Context, Deployment, deploy_stage


@task(name="deploy", retries=2, retry_delay_seconds=5, timeout_seconds=900, cache_policy=NO_CACHE)
def deploy(spec: DeploySpec, model_name: str, ctx: Context, case_id: str) -> Deployment:
    """Serve the champion on loopback and segment one held-out case over HTTP (the smoke test)."""
    return deploy_stage(spec, model_name, ctx, case_id)
