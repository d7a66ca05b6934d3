from __future__ import annotations

import time

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from voxelflow.core.transient import is_transient
from voxelflow.spec.config import DeploySpec
from voxelflow.stages.context import Context
from voxelflow.stages.deploy import Deployment, deploy_stage

ATTEMPTS, FIRST_DELAY_S = 3, 5.0


def transient(exc: BaseException) -> bool:
    """Network, storage and API-server errors are worth another attempt; a deployment that cannot work
    as configured (no cluster, no champion, a failed smoke test) fails at once."""
    return is_transient(exc)


@task(name="deploy", timeout_seconds=900, cache_policy=NO_CACHE)
def deploy(spec: DeploySpec, model_name: str, ctx: Context, case_id: str) -> Deployment:
    """Serve the champion on loopback and segment one held-out case over HTTP (the smoke test).

    Transient errors are retried here rather than by Prefect: the task runs inside the release
    transaction (``flows/release.py``), which Prefect rolls back as soon as one attempt fails, even
    if a retry would then succeed.
    """
    for attempt in range(ATTEMPTS):
        try:
            return deploy_stage(spec, model_name, ctx, case_id)
        except Exception as exc:
            if attempt == ATTEMPTS - 1 or not transient(exc):
                raise
            delay = FIRST_DELAY_S * 2**attempt
            get_run_logger().warning("deploy attempt %d of %d failed (%s: %s); again in %.0f s", attempt + 1,
                                     ATTEMPTS, type(exc).__name__, exc, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")
