from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks import artifacts
from tasks.retry import transient_only
from voxelflow.spec.config import EvaluateSpec
from voxelflow.stages.context import Context
from voxelflow.stages.evaluate import Evaluation, evaluate_stage
from voxelflow.stages.train import TrainOutcome


@task(name="evaluate", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE, retry_condition_fn=transient_only)
def evaluate(spec: EvaluateSpec, model_name: str, ctx: Context, outcome: TrainOutcome, test_ids: list[str],
             run_id: str) -> Evaluation:
    """Score the candidate and the champion case by case on the same test cases."""
    result = evaluate_stage(spec, model_name, ctx, outcome, test_ids, run_id)
    rows = [{"model": "candidate", **result.candidate}]
    if result.champion is not None:
        rows.append({"model": f"champion v{result.champion_version}", **result.champion})
    artifacts.table(rows, description=f"test-side scores on {len(test_ids)} cases")
    return result
