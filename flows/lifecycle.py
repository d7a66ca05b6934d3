"""The lifecycle flow: ingest → preprocess → train → evaluate → register and promote → deploy."""

from __future__ import annotations

from dataclasses import asdict

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from tasks.deploy import deploy
from tasks.evaluate import evaluate
from tasks.ingest import ingest
from tasks.preprocess import preprocess
from tasks.registry import register_and_promote
from tasks.train import mlflow_run, train
from voxelflow.config import PipelineSpec, Settings, load_spec
from voxelflow.pipeline import Context, lineage, markdown, split_stage, summarise


@flow(name="lifecycle", log_prints=True)
def lifecycle(
    spec: PipelineSpec | str = "deployments/specs/demo.yaml",
    overlays: list[str] | None = None,
) -> dict:
    """Run the whole life of a model. ``spec`` is the pipeline spec itself or the path of its YAML file."""
    if isinstance(spec, str):
        spec = load_spec(spec, overlays)
    elif overlays:
        raise ValueError("overlays apply to a spec file: pass the spec as a path")
    ctx = Context(Settings(), spec.name)

    ingested = ingest(spec.data, ctx)
    prep = preprocess(spec.preprocess, ctx, ingested.case_ids)
    parts = split_stage(spec.evaluate, ingested.case_ids, spec.train.seed)  # pure and instant: no task
    run_id = mlflow_run(spec, ctx, ingested.dataset_digest)
    outcome = train(spec.train, spec.preprocess, ctx, prep.store, parts.train, run_id)
    evaluation = evaluate(spec.evaluate, spec.promote.model_name, ctx, outcome, parts.val, run_id)
    tags = lineage(spec, ingested.dataset_digest)
    promotion = register_and_promote(spec.promote, ctx, run_id, outcome, evaluation, tags)
    deployment = None
    if promotion.champion is not None:
        deployment = deploy(spec.deploy, spec.promote.model_name, ctx, parts.val[0])

    result = summarise(ingested, prep, outcome, evaluation, promotion, deployment, run_id)
    key = "lifecycle-" + "".join(c if c.isalnum() else "-" for c in spec.name.lower())
    create_markdown_artifact(markdown(result, spec.name), key=key, description="dataset digest, metrics, model version, endpoint")
    if deployment:
        print(f"HTTP prediction dice {deployment.dice:.4f} (model v{deployment.model_version}, {deployment.endpoint})")
    return asdict(result)
