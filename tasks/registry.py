from __future__ import annotations

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from voxelflow.config import PromoteSpec
from voxelflow.pipeline import Context, Evaluation, Promotion, TrainOutcome, register_stage


@task(name="register-and-promote", retries=3, retry_delay_seconds=2, cache_policy=NO_CACHE)
def register_and_promote(spec: PromoteSpec, ctx: Context, run_id: str, outcome: TrainOutcome,
                         evaluation: Evaluation, tags: dict[str, str]) -> Promotion:
    """Register the candidate in MLflow and move the champion alias when the policy passes; each
    gate's result is kept as a table artifact (and as tags on the version)."""
    promotion = register_stage(spec, ctx, run_id, outcome, evaluation, tags)
    verdict = "promoted to champion" if promotion.promoted else "not promoted"
    create_table_artifact(promotion.gates, key=f"gates-{spec.model_name.lower().replace('.', '-').replace('_', '-')}",
                          description=f"{spec.model_name} version {promotion.version}: {verdict}")
    return promotion


@task(name="rollback", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def rollback_champion(ctx: Context, model_name: str, actor: str, reason: str) -> dict[str, str]:
    """Move ``champion`` back to ``previous`` (recorded in the audit log); fails when there is none."""
    from voxelflow import registry

    restored, replaced = registry.rollback(ctx.tracking_uri, ctx.db, model_name, actor, reason)
    return {"model": model_name, "champion": restored, "replaced": replaced}
