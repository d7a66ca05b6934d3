from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from voxelflow.config import PromoteSpec
from voxelflow.pipeline import Context, Evaluation, Promotion, TrainOutcome, register_stage


@task(name="register-and-promote", retries=3, retry_delay_seconds=2, cache_policy=NO_CACHE)
def register_and_promote(spec: PromoteSpec, ctx: Context, run_id: str, outcome: TrainOutcome,
                         evaluation: Evaluation, tags: dict[str, str]) -> Promotion:
    """Register the candidate in MLflow and move the champion alias when the gates pass."""
    return register_stage(spec, ctx, run_id, outcome, evaluation, tags)
