from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.progress import reporter
from tasks.retry import transient_only
from voxelflow.spec.config import PipelineSpec
from voxelflow.stages.context import Context
from voxelflow.stages.split import Split
from voxelflow.stages.tracking import start_run
from voxelflow.stages.train import TrainOutcome, train_stage


@task(name="start-mlflow-run", retries=3, retry_delay_seconds=2, cache_policy=NO_CACHE,
      retry_condition_fn=transient_only)
def mlflow_run(spec: PipelineSpec, ctx: Context, dataset_digest: str, split: Split | None = None) -> str:
    """Open the MLflow run that carries params, metrics, pictures, lineage tags and the split, tagged with
    this flow run's id so that the run and the flow run find each other."""
    from prefect.runtime import flow_run

    from voxelflow.release import registry

    run_id = start_run(spec, ctx, dataset_digest, split)
    if flow_run.get_id():
        registry.client(ctx.tracking_uri).set_tag(run_id, "prefect.flow_run_id", str(flow_run.get_id()))
    return run_id


@task(name="train", retries=2, retry_delay_seconds=5, timeout_seconds=6 * 3600, cache_policy=NO_CACHE,
      retry_condition_fn=transient_only)
def train(spec: PipelineSpec, ctx: Context, train_ids: list[str], run_id: str,
          val_ids: list[str] | None = None) -> TrainOutcome:
    """Train the spec's network, validating on ``val_ids``; a retry resumes from the newest checkpoint."""
    logger = get_run_logger()
    epochs = spec.train.epochs
    report = reporter("train", f"training {next(iter(spec.train.network))} for {epochs} epochs")

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        report(epoch + 1, epochs)
        extra = f" validation dice {metrics['val_epoch_dice']:.4f}" if "val_epoch_dice" in metrics else ""
        logger.info("epoch %d/%d train_loss %.4f%s", epoch + 1, epochs, metrics["train_loss"], extra)

    outcome = train_stage(spec, ctx, train_ids, run_id, val_ids, on_epoch=on_epoch)
    if outcome.stopped_early or outcome.stopped_for_time:  # it ended before the last epoch, and the step is done
        report(epochs, epochs)
    return outcome
