"""The lifecycle flow: ingest → preprocess → train → evaluate → register and promote (→ a person's approval) → deploy.

A stage whose spec section names a ``work_pool`` runs as that pool's deployment of the stage
flow (``flows/stages.py``); the others run here as tasks.
"""

from __future__ import annotations

from dataclasses import asdict

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.release import release
from flows.stages import current_lifecycle_id, placed
from tasks.evaluate import evaluate
from tasks.ingest import ingest
from tasks.preprocess import preprocess
from tasks.settings import run_settings
from tasks.train import mlflow_run, train
from voxelflow.config import PipelineSpec, load_spec
from voxelflow.pipeline import Context, closing_run, lineage, markdown, split_stage, summarise, usable_cases
from voxelflow.redact import install_log_filter
from voxelflow.watch import DATASET_UPDATED, accept_announcement


@flow(name="lifecycle", log_prints=True)
def lifecycle(
    spec: PipelineSpec | str = "deployments/specs/demo.yaml",
    overlays: list[str] | None = None,
    sets: list[str] | None = None,
    announcement: dict | None = None,
) -> dict:
    """Run the whole life of a model.

    ``spec`` is the pipeline spec itself or the path of its YAML file; ``overlays`` (files) and ``sets``
    (``key.path=value``) are merged over a spec file, as ``voxelflow run`` does.
    """
    install_log_filter()  # no log line of this run shows a password from a URL
    if isinstance(spec, str):
        spec = load_spec(spec, overlays, sets)
    elif overlays or sets:
        raise ValueError("overlays and sets apply to a spec file: pass the spec as a path")
    ctx = Context(run_settings(spec.data), spec.name)
    if announcement is not None:  # the triggering event (lifecycle/on-update): refused unless data references only
        accept_announcement(ctx.db, spec.name, announcement, DATASET_UPDATED)
    lid = current_lifecycle_id()

    ingested = placed("ingest", spec.data.work_pool, ctx, spec, lid, lambda: ingest(spec.data, ctx))
    prep = placed("preprocess", spec.preprocess.work_pool, ctx, spec, lid,
                  lambda: preprocess(spec.preprocess, ctx, ingested.case_ids), case_ids=ingested.case_ids)
    parts = split_stage(spec.evaluate, usable_cases(ingested, prep))  # pure and instant: no task
    run_id = mlflow_run(spec, ctx, ingested.dataset_digest, parts)
    with closing_run(ctx, run_id):  # the MLflow run ends FINISHED only if everything below completes
        outcome = placed("train", spec.train.work_pool, ctx, spec, lid,
                         lambda: train(spec, ctx, parts.train, run_id, parts.val),
                         train_ids=parts.train, run_id=run_id, val_ids=parts.val)
        evaluation = placed("evaluate", spec.evaluate.work_pool, ctx, spec, lid,
                            lambda: evaluate(spec.evaluate, spec.promote.model_name, ctx, outcome, parts.test, run_id),
                            outcome=asdict(outcome), test_ids=parts.test, run_id=run_id)
        tags = lineage(spec, ingested.dataset_digest)
        # register and promote (pausing for a person when promote.approval is manual), then deploy: one
        # transaction, so a failed deployment puts champion and previous back (flows/release.py)
        promotion, deployment = release(spec, ctx, lid, run_id, outcome, evaluation, tags, parts.val[0])

        result = summarise(ingested, prep, outcome, evaluation, promotion, deployment, run_id)
        key = "lifecycle-" + "".join(c if c.isalnum() else "-" for c in spec.name.lower())
        create_markdown_artifact(markdown(result, spec.name), key=key, description="dataset digest, metrics, model version, endpoint")
        if deployment:
            where = f"{deployment.endpoint}, a temporary smoke-test endpoint" if deployment.temporary else deployment.endpoint
            print(f"HTTP prediction dice {deployment.dice:.4f} (model v{deployment.model_version}, {where})")
        return asdict(result)
