from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks import artifacts
from voxelflow.stages.context import Context
from voxelflow.stages.steps import StepRecord, run_step
from voxelflow.steps.api import StepInputs


@task(name="step", cache_policy=NO_CACHE)
def user_step(step, ctx: Context, inputs: StepInputs) -> StepRecord:
    """One of the spec's own steps (named by its id in the run graph). Transient errors are retried inside the
    task, up to the step's ``retries``: a step after ``promote`` runs in the release transaction, which Prefect
    rolls back as soon as one attempt fails, even if a retry would then succeed."""
    record = run_step(step, ctx, inputs, logger=get_run_logger())
    rows = [{"metric": k, "value": v} for k, v in record.metrics.items()] or [{"metric": "(none)", "value": None}]
    key = f"step-{ctx.pipeline}-{step.id}".lower().replace("_", "-").replace(".", "-")
    artifacts.table(rows, key=key, description=f"step {step.id}: {record.status}"
                    + (f" ({record.reason})" if record.reason else ""))
    return record


def for_step(step):
    """The step task as this step: its id in the run graph."""
    return user_step.with_options(name=step.id, task_run_name=step.id)
