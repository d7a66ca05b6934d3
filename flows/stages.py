"""Each stage as its own flow, so that a spec can place it on the work pool that fits it.

``train.work_pool: gpu`` makes the lifecycle call the deployment ``train/gpu`` with
:func:`run_deployment`: a linked subflow in the UI that receives references only (the spec,
case ids, run ids, the store's URL) and leaves its result as JSON in the store, where the
lifecycle reads it back. Without ``work_pool`` the stage's task runs in the lifecycle's process.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Callable, TypeVar

from prefect import flow
from prefect.deployments import run_deployment
from prefect.runtime import flow_run

from tasks import artifacts
from tasks.deploy import deploy
from tasks.evaluate import evaluate
from tasks.ingest import ingest
from tasks.preprocess import preprocess
from tasks.registry import register_and_promote
from tasks.settings import run_settings
from tasks.train import train
from voxelflow.core import addresses
from voxelflow.pipeline import Context, Evaluation, TrainOutcome, from_dict
from voxelflow.spec.config import PipelineSpec, Settings
from voxelflow.spec.contracts import STAGES
from voxelflow.stages.references import REFERENCES
from voxelflow.stages.steps import StepRecord

T = TypeVar("T")

FLOW_NAMES = {"promote": "register-and-promote"}  # the stage flows' names, where they differ from the stage id
# what each stage flow leaves in the store: the reference its stage gives; a user's step leaves its StepRecord
RESULTS: dict[str, type] = {FLOW_NAMES.get(stage_id, stage_id): REFERENCES[stage.gives]
                            for stage_id, stage in STAGES.items()} | {"step": StepRecord}


def peers_of(ctx: Context) -> dict[str, str]:
    """Digests of the database and the MLflow this process uses, for a placed stage to compare."""
    return addresses.peers(ctx.settings.database, ctx.tracking_uri)


def context_for(spec: PipelineSpec, store: str, peers: dict[str, str]) -> Context:
    """This worker's context; its store, database and MLflow must be the lifecycle's, or ledger, audit
    and registry split in two: refused before anything starts, naming what differs (never its address)."""
    ctx = Context(run_settings(spec.data), spec.name)
    if ctx.store.url != store:
        raise RuntimeError(
            f"this worker's store is {ctx.store.url!r} but the lifecycle's is {store!r}: give every work pool the "
            "same VOXELFLOW_STORE and VOXELFLOW_DATABASE_URL"
        )
    differ = addresses.differences(peers_of(ctx), peers)
    if differ:
        raise RuntimeError(f"this worker's {' and '.join(differ)} differ from the lifecycle's: give every work pool "
                           "the same VOXELFLOW_STORE, VOXELFLOW_DATABASE_URL and VOXELFLOW_MLFLOW_TRACKING_URI")
    return ctx


def placed(stage: str, pool: str | None, ctx: Context, spec: PipelineSpec, lifecycle_id: str,
           here: Callable[[], T], **refs: Any) -> T:
    """Run a stage here, or as the deployment ``STAGE/POOL`` and read its result back from the store
    (a user's step: ``step/POOL``, its output under ``step-<id>``)."""
    if pool is None:
        return here()
    output = f"step-{refs['step_id']}" if stage == "step" else stage
    run = run_deployment(
        f"{stage}/{pool}",
        parameters={"spec": spec.model_dump(mode="json", by_alias=True), "lifecycle_id": lifecycle_id, "store": ctx.store.url,
                    "peers": peers_of(ctx), **refs},
        as_subflow=True,
        timeout=None,
        poll_interval=1,  # Prefect's default (5 s) leaves the lifecycle idle up to 5 s after each placed stage
    )
    if run.state is None or not run.state.is_completed():
        state = run.state.name if run.state else "unknown"
        raise RuntimeError(f"stage {stage} on work pool {pool!r} ended {state} (flow run {run.id})")
    return from_dict(RESULTS[stage], ctx.store.read_json(ctx.layout.stage_output(lifecycle_id, output)))


def _keep(ctx: Context, lifecycle_id: str, stage: str, result: Any) -> None:
    ctx.store.write_json(ctx.layout.stage_output(lifecycle_id, stage), asdict(result))


@flow(name="ingest")
def ingest_flow(spec: PipelineSpec, lifecycle_id: str, store: str, peers: dict[str, str],
                dataset: str | None = None) -> None:
    """Ingest the spec's source, or take the recorded ``dataset`` (placed: ``data.work_pool``)."""
    with artifacts.flushing():
        ctx = context_for(spec, store, peers)
        _keep(ctx, lifecycle_id, "ingest", ingest(spec.data, ctx, dataset))


@flow(name="preprocess")
def preprocess_flow(spec: PipelineSpec, lifecycle_id: str, store: str, peers: dict[str, str],
                    case_ids: list[str]) -> None:
    """Preprocess new cases on a Dask cluster (placed: ``preprocess.work_pool``)."""
    with artifacts.flushing():
        ctx = context_for(spec, store, peers)
        _keep(ctx, lifecycle_id, "preprocess", preprocess(spec.preprocess, ctx, case_ids))


@flow(name="train")
def train_flow(spec: PipelineSpec, lifecycle_id: str, store: str, peers: dict[str, str], train_ids: list[str],
               run_id: str, val_ids: list[str] | None = None) -> None:
    """Train the candidate (placed: ``train.work_pool``, e.g. a GPU pool)."""
    with artifacts.flushing():
        ctx = context_for(spec, store, peers)
        _keep(ctx, lifecycle_id, "train", train(spec, ctx, train_ids, run_id, val_ids))


@flow(name="evaluate")
def evaluate_flow(spec: PipelineSpec, lifecycle_id: str, store: str, peers: dict[str, str], outcome: dict,
                  test_ids: list[str], run_id: str) -> None:
    """Score candidate and champion on the test cases (placed: ``evaluate.work_pool``)."""
    with artifacts.flushing():
        ctx = context_for(spec, store, peers)
        result = evaluate(spec.evaluate, spec.promote.model_name, ctx, from_dict(TrainOutcome, outcome), test_ids, run_id)
        _keep(ctx, lifecycle_id, "evaluate", result)


@flow(name="register-and-promote")
def promote_flow(spec: PipelineSpec, lifecycle_id: str, store: str, peers: dict[str, str], run_id: str,
                 outcome: dict, evaluation: dict, tags: dict[str, str]) -> None:
    """Register the candidate and apply the gates (placed: ``promote.work_pool``)."""
    with artifacts.flushing():
        ctx = context_for(spec, store, peers)
        result = register_and_promote(spec.promote, ctx, run_id, from_dict(TrainOutcome, outcome),
                                      from_dict(Evaluation, evaluation), tags)
        _keep(ctx, lifecycle_id, "register-and-promote", result)


@flow(name="deploy")
def deploy_flow(spec: PipelineSpec, lifecycle_id: str, store: str, peers: dict[str, str], case_id: str) -> None:
    """Serve the champion and smoke-test it (placed: ``deploy.work_pool``)."""
    with artifacts.flushing():
        ctx = context_for(spec, store, peers)
        _keep(ctx, lifecycle_id, "deploy", deploy(spec.deploy, spec.promote.model_name, ctx, case_id))


@flow(name="step")
def step_flow(spec: PipelineSpec, lifecycle_id: str, store: str, peers: dict[str, str], step_id: str,
              inputs: dict) -> None:
    """One of the spec's own steps (placed: its ``work_pool``), with the context it would have had in the lifecycle."""
    with artifacts.flushing():
        from tasks.steps import for_step
        from voxelflow.steps.api import StepInputs

        ctx = context_for(spec, store, peers)
        step = next((s for s in spec.steps if s.id == step_id), None)
        if step is None:
            raise ValueError(f"the spec has no step {step_id!r}")
        _keep(ctx, lifecycle_id, f"step-{step_id}", for_step(step)(step, ctx, StepInputs.model_validate(inputs)))


@flow(name="rollback")
def rollback_flow(model_name: str, reason: str = "", actor: str = "prefect") -> dict[str, str]:
    """Move a model's ``champion`` back to ``previous``; a service watching the alias swaps back."""
    from flows.announce import notify_champion
    from tasks.registry import rollback_champion

    done = rollback_champion(Context(Settings(), model_name), model_name, actor, reason)
    notify_champion(model_name, done["champion"])  # services swap back at once
    return done


def current_lifecycle_id() -> str:
    """The lifecycle's flow run id (or a fresh id outside a flow run): names its stage outputs in the store."""
    import uuid

    return str(flow_run.get_id() or uuid.uuid4())
