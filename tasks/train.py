from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.progress import reporter
from voxelflow.config import PipelineSpec, PreprocessSpec, TrainSpec
from voxelflow.pipeline import Context, Split, TrainOutcome, start_run, train_stage


@task(name="start-mlflow-run", retries=3, retry_delay_seconds=2, cache_policy=NO_CACHE)
def mlflow_run(spec: PipelineSpec, ctx: Context, dataset_digest: str, split: Split | None = None) -> str:
    """Open the MLflow run that carries params, metrics, pictures, lineage tags and the split."""
    return start_run(spec, ctx, dataset_digest, split)


@task(name="train", retries=2, retry_delay_seconds=5, timeout_seconds=6 * 3600, cache_policy=NO_CACHE)
def train(spec: TrainSpec, pre: PreprocessSpec, ctx: Context, train_ids: list[str], run_id: str) -> TrainOutcome:
    """Train the spec's network; a retry resumes from the newest checkpoint."""
    logger = get_run_logger()
    report = reporter("train", f"training {next(iter(spec.network))} for {spec.epochs} epochs")

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        report(epoch + 1, spec.epochs)
        logger.info("epoch %d/%d train_loss %.4f", epoch + 1, spec.epochs, metrics["train_loss"])

    return train_stage(spec, pre, ctx, train_ids, run_id, on_epoch=on_epoch)
