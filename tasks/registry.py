from __future__ import annotations

import sys

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.transactions import Transaction, get_transaction

from tasks import artifacts
from tasks.retry import transient_only
from voxelflow.spec.config import PromoteSpec
from voxelflow.stages.approval import Answer, answer_stage, awaiting
from voxelflow.stages.context import Context
from voxelflow.stages.evaluate import Evaluation
from voxelflow.stages.promote import Promotion, register_stage
from voxelflow.stages.train import TrainOutcome


@task(name="register-and-promote", retries=3, retry_delay_seconds=2, cache_policy=NO_CACHE,
      retry_condition_fn=transient_only)
def register_and_promote(spec: PromoteSpec, ctx: Context, run_id: str, outcome: TrainOutcome,
                         evaluation: Evaluation, tags: dict[str, str]) -> Promotion:
    """Register the candidate in MLflow and move the champion alias when the policy passes; each
    gate's result is kept as a table artifact (and as tags on the version)."""
    promotion = register_stage(spec, ctx, run_id, outcome, evaluation, tags)
    verdict = ("promoted to champion" if promotion.promoted else "waiting for approval" if awaiting(spec, promotion)
               else "not promoted")
    artifacts.table(promotion.gates, key=f"gates-{spec.model_name.lower().replace('.', '-').replace('_', '-')}",
                    description=f"{spec.model_name} version {promotion.version}: {verdict}")
    return promotion


@task(name="rollback", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE, retry_condition_fn=transient_only)
def rollback_champion(ctx: Context, model_name: str, actor: str, reason: str,
                      operation: str | None = None) -> dict[str, str]:
    """Move ``champion`` back to ``previous`` (recorded in the audit log); fails when there is none.

    Every attempt carries one operation id (given, or the flow run's), so a retry completes the
    rollback its first attempt started instead of rolling back a second time."""
    from prefect.runtime import flow_run, task_run

    from voxelflow.core import audit
    from voxelflow.release import registry

    op = operation or f"{flow_run.get_id() or task_run.get_id()}:{model_name}"
    restored, replaced = registry.rollback(ctx.tracking_uri, ctx.db, model_name, actor,
                                           audit.Sink(ctx.db, ctx.tracking_uri), reason, operation=op)
    return {"model": model_name, "champion": restored, "replaced": replaced, "operation": op}


@task(name="approval-answer", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE,
      retry_condition_fn=transient_only)
def answer_candidate(spec: PromoteSpec, ctx: Context, promotion: Promotion, evaluation: Evaluation,
                     outcome: TrainOutcome, run_id: str, tags: dict[str, str], answer: Answer) -> Promotion:
    """Act on a person's answer: approve moves ``champion`` by compare-and-set (the gates applied again
    if it moved meanwhile); reject leaves it. Both are tagged on the version and audited."""
    return answer_stage(spec, ctx, promotion, evaluation, outcome, run_id, tags, answer)


@task(name="champion-moved", cache_policy=NO_CACHE)
def champion_moved(ctx: Context, model_name: str, version: str) -> str:
    """Hold this lifecycle's move of ``champion`` to ``version`` open in the release transaction: if
    what follows it (deployment) fails, the transaction rolls back and :func:`restore_aliases` runs."""
    get_transaction().set("promoted", {"tracking_uri": ctx.tracking_uri, "database": ctx.settings.database,
                                       "model": model_name, "version": version})
    return version


@champion_moved.on_rollback
def restore_aliases(txn: Transaction) -> None:
    """Put ``champion`` and ``previous`` back as they were before the promotion (unless something else
    moved ``champion`` since), and record it in the audit log with the failure that caused it."""
    from voxelflow.core import audit
    from voxelflow.core.db import connect
    from voxelflow.release import registry

    moved = txn.get("promoted")
    # the failure: set by the release when it raised there; a failing task (deploy) rolls the
    # transaction back while its exception is being handled, before the flow sees it
    raised = sys.exc_info()[1]
    failure = txn.get("failure", None) or (f"{type(raised).__name__}: {raised}"[:2000] if raised
                                           else "the release failed after the promotion")
    db = connect(moved["database"])
    restored = registry.revert_promotion(moved["tracking_uri"], db, moved["model"], moved["version"], "voxelflow",
                                         f"deployment failed: {failure}", audit.Sink(db, moved["tracking_uri"]))
    verdict = "restored" if restored else "left as they are: champion moved again meanwhile"
    txn.logger.warning("%s version %s: aliases %s", moved["model"], moved["version"], verdict)
