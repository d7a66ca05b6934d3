from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.progress import reporter
from tasks.retry import transient_only
from voxelflow.serving import predict as batch
from voxelflow.serving.predict import ModelRef, PredictReport
from voxelflow.stages.context import Context


@task(name="predict", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE,
      retry_condition_fn=transient_only)
def predict_cases(ctx: Context, model: str, dest: str, cases: list[str] | None = None,
                  source: str | None = None) -> PredictReport:
    """Segment the unlabelled cases (``cases``, those under ``source``, or all) that ``model`` has not
    segmented yet into ``dest``. Retried for storage and registry outages only: a retry skips the
    masks already written; a missing model or bad input fails at once."""
    return batch.run(ctx.db, ctx.layout, ctx.tracking_uri, ModelRef.parse(model), dest, cases=cases, source=source,
                     progress=reporter("predict", f"segmenting unlabelled cases with {model}"))

