"""The lifecycle with no orchestrator (:func:`run`), and the stages' public names.

Each stage is a plain function in its own module of :mod:`voxelflow.stages` (``ingest_stage``,
``preprocess_stage``, ``train_stage``, ...); Prefect tasks wrap them one to one (``tasks/``). :func:`run`
walks the spec's graph with no orchestrator, which is what the orchestration benchmark compares the flow against.
"""

from __future__ import annotations

from voxelflow.spec.config import PipelineSpec, Settings
from voxelflow.stages.context import Context, Progress, from_dict
from voxelflow.stages.deploy import Deployment, deploy_stage
from voxelflow.stages.evaluate import Evaluation, evaluate_stage
from voxelflow.stages.execute import Runner, execute
from voxelflow.stages.ingest import ingest_stage
from voxelflow.stages.preprocess import preprocess_stage, usable_cases
from voxelflow.stages.promote import Promotion, candidate_behaviour, register_stage, rescored, score_version
from voxelflow.stages.split import Split, split_stage
from voxelflow.stages.summary import LifecycleResult, markdown, steps_markdown, summarise
from voxelflow.stages.tracking import closing_run, ensure_tracking, lineage, start_run
from voxelflow.stages.train import TrainOutcome, check_labels, model_config, n_classes, train_stage

__all__ = [
    "Context", "Deployment", "Evaluation", "LifecycleResult", "Progress", "Promotion", "Split", "TrainOutcome",
    "candidate_behaviour", "check_labels", "closing_run", "deploy_stage", "ensure_tracking", "evaluate_stage",
    "from_dict", "ingest_stage", "lineage", "markdown", "model_config", "n_classes", "preprocess_stage",
    "register_stage", "rescored", "run", "score_version", "split_stage", "start_run", "steps_markdown", "summarise",
    "train_stage", "usable_cases",
]


def run(spec: PipelineSpec, settings: Settings, fresh: bool = False, resume: bool = False,
        dataset: str | None = None) -> LifecycleResult:
    """The whole lifecycle with no orchestrator: the spec's graph (:mod:`voxelflow.stages`) run here, the
    baseline the flow is measured against. Results recorded by earlier lifecycles with the same inputs are
    reused (:mod:`voxelflow.stages.reuse`) unless ``fresh``; ``resume`` continues the latest failed lifecycle;
    ``dataset`` (a digest) starts from the dataset an ingest recorded, while the ledger still holds it."""
    runner = Runner(spec, Context(settings, spec.name), fresh=fresh, resume=resume, dataset=dataset)
    try:
        return execute(spec, runner)
    finally:
        runner.close()
