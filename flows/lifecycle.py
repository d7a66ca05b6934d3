"""The lifecycle flow: the spec's step graph (``voxelflow.stages``) run with Prefect.

The graph says what runs and in what order (the built-in stages ingest → preprocess → train →
evaluate → promote → deploy, with the spec's own ``steps`` placed among them); this module only
says how each node runs: a stage whose spec section names a ``work_pool`` runs as that pool's
deployment of the stage flow (``flows/stages.py``), the others here as tasks; a step of the
user's runs as a task named by its id, or as the deployment ``step/POOL``. The promotion and what
follows it are one transaction (``flows/release.py``).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict
from typing import Any, Iterator

from prefect import flow

from flows.release import released, settled
from flows.stages import FLOW_NAMES, current_lifecycle_id, placed
from flows.up import begin
from tasks import artifacts
from tasks.deploy import deploy
from tasks.evaluate import evaluate
from tasks.ingest import ingest
from tasks.preprocess import preprocess
from tasks.registry import register_and_promote
from tasks.steps import for_step
from tasks.train import mlflow_run, train
from voxelflow.core.redact import install_log_filter
from voxelflow.data.watch import DATASET_UPDATED
from voxelflow.pipeline import markdown, steps_markdown
from voxelflow.spec.config import PipelineSpec
from voxelflow.spec.contracts import STAGES, as_json
from voxelflow.spec.graph import Node
from voxelflow.stages.execute import GateFailed, Runner, State, execute
from voxelflow.stages.steps import StepRecord
from voxelflow.steps.api import StepInputs

TASKS = {  # each built-in stage's task, called with the references its placed flow takes
    "ingest": lambda spec, ctx, dataset=None: ingest(spec.data, ctx, dataset),
    "preprocess": lambda spec, ctx, case_ids: preprocess(spec.preprocess, ctx, case_ids),
    "train": lambda spec, ctx, train_ids, run_id, val_ids: train(spec, ctx, train_ids, run_id, val_ids),
    "evaluate": lambda spec, ctx, outcome, test_ids, run_id: evaluate(spec.evaluate, spec.promote.model_name, ctx,
                                                                      outcome, test_ids, run_id),
    "promote": lambda spec, ctx, run_id, outcome, evaluation, tags: register_and_promote(
        spec.promote, ctx, run_id, outcome, evaluation, tags),
    "deploy": lambda spec, ctx, case_id: deploy(spec.deploy, spec.promote.model_name, ctx, case_id),
}


class FlowRunner(Runner):
    """Each node as a Prefect task, or as a flow run on its work pool."""

    def stage(self, stage_id: str, args: dict[str, Any]) -> Any:
        spec, ctx = self.spec, self.ctx
        pool = getattr(spec, STAGES[stage_id].section).work_pool
        return placed(FLOW_NAMES.get(stage_id, stage_id), pool, ctx, spec, self.lifecycle_id,
                      lambda: TASKS[stage_id](spec, ctx, **args), **{k: as_json(v) for k, v in args.items()})

    def step(self, node: Node, inputs: StepInputs) -> StepRecord:
        return placed("step", node.pool, self.ctx, self.spec, self.lifecycle_id,
                      lambda: for_step(node.step)(node.step, self.ctx, inputs),
                      step_id=node.id, inputs=inputs.model_dump(mode="json"))

    def open_run(self, dataset_digest: str, split: Any) -> str:
        return mlflow_run(self.spec, self.ctx, dataset_digest, split)

    def approve(self, state: State) -> Any:
        return settled(self.spec, self.ctx, state.promotion, state.evaluation, state.outcome, state.run_id or "",
                       state.tags)

    def candidates_table(self, rows: list[dict[str, Any]]) -> None:
        key = "candidates-" + "".join(c if c.isalnum() else "-" for c in self.spec.name.lower())
        artifacts.table(rows, key=key, description="every candidate: overrides, validation scores, steps, "
                        "time, chosen or why not")

    @contextlib.contextmanager
    def release(self, state: State) -> Iterator[None]:
        with released(self.ctx, self.spec.promote.model_name, state.promotion):
            yield


@flow(name="lifecycle", log_prints=True)
def lifecycle(
    spec: PipelineSpec | str = "deployments/specs/demo.yaml",
    overlays: list[str] | None = None,
    sets: list[str] | None = None,
    announcement: dict | None = None,
    spec_digest: str | None = None,
    resume: bool = False,
    fresh: bool = False,
    dataset: str | None = None,
) -> dict:
    """Run the whole life of a model.

    ``spec`` is the pipeline spec itself or the path of its YAML file; ``overlays`` (files) and ``sets``
    (``key.path=value``) are merged over a spec file, as ``voxelflow run`` does. ``spec_digest`` (set by
    ``voxelflow up``) refuses a spec file edited since the deployment was made. Steps whose inputs are those of a
    result recorded by an earlier lifecycle reuse it unless ``fresh``; ``resume`` continues the pipeline's latest
    failed lifecycle from its failed step (training from its newest checkpoint). ``dataset`` (a dataset digest,
    what a ``voxelflow.dataset.updated`` trigger passes) starts from the dataset that ingest recorded instead of
    ingesting the source again, while the ledger still holds that dataset.
    """
    with artifacts.flushing():
        install_log_filter()  # no log line of this run shows a password from a URL
        # the triggering event (lifecycle/<pipeline>) is refused unless it carries data references only
        spec, ctx = begin(spec, spec_digest, DATASET_UPDATED, announcement, overlays=overlays, sets=sets)
        key = "lifecycle-" + "".join(c if c.isalnum() else "-" for c in spec.name.lower())
        runner = FlowRunner(spec, ctx, current_lifecycle_id(), fresh=fresh, resume=resume, dataset=dataset)
        try:
            result = execute(spec, runner)
        except GateFailed as exc:
            lines = [f"# voxelflow lifecycle: {spec.name}", "", f"**Stopped by gate `{exc.step_id}`:** {exc.reason}"]
            artifacts.markdown("\n".join(lines + steps_markdown(exc.records)) + "\n", key=key,
                               description=f"stopped by gate {exc.step_id}")
            raise
        finally:
            runner.close()
        artifacts.markdown(markdown(result, spec.name), key=key, description="dataset digest, metrics, model version, endpoint")
        d = result.deployment
        if d:
            where = f"{d['endpoint']}, a temporary smoke-test endpoint" if d["temporary"] else d["endpoint"]
            print(f"HTTP prediction dice {d['dice']:.4f} (model v{d['model_version']}, {where})")
        return asdict(result)
