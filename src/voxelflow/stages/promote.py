"""The promote stage: the candidate registered once, ``champion`` moved by compare-and-set when the gates pass."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from voxelflow.data import ingest
from voxelflow.learn import evaluate
from voxelflow.release import policy, registry
from voxelflow.release.promotion import record_decision, settle
from voxelflow.spec.config import PromoteSpec
from voxelflow.stages.context import Context
from voxelflow.stages.evaluate import Evaluation
from voxelflow.stages.train import TrainOutcome


@dataclass
class Promotion:
    version: str
    promoted: bool
    reasons: list[str]
    champion: str | None
    previous: str | None = None
    model_uri: str = ""
    gates: list[dict[str, Any]] = field(default_factory=list)  # each gate of the policy: gate, passed, detail


def candidate_behaviour(spec: PromoteSpec, ctx: Context, outcome: TrainOutcome,
                        evaluation: Evaluation) -> dict[str, float] | None:
    """Behaviour of the candidate on its first test case, when the gates ask for the checks."""
    if spec.gates.flip_tolerance is None or not evaluation.test_ids:
        return None
    from voxelflow.learn.model import Segmenter

    model = Segmenter(outcome.model_config, ctx.store.read_bytes(outcome.weights_key))
    case = ingest.load_case(ctx.layout.raw, evaluation.test_ids[0])
    return policy.measure_behaviour(model.segment, case["image"], case["affine"])


def score_version(ctx: Context, model_name: str, version: str, evaluation: Evaluation) -> dict[str, dict[str, float]]:
    """Score a registered version case by case on the candidate's test cases (a champion that appeared
    meanwhile, whenever it was registered): metric -> test case -> value."""
    with tempfile.TemporaryDirectory() as tmp:
        model = registry.load_version(ctx.tracking_uri, model_name, version, Path(tmp))
    return evaluate.score_cases(model.segment, ctx.layout.raw, evaluation.test_ids, evaluation.metrics,
                                evaluation.n_classes, evaluation.custom)


def rescored(ctx: Context, model_name: str, version: str, evaluation: Evaluation,
             rescore: Callable[[Context, str, str, Evaluation], dict[str, Any]] | None = None,
             ) -> tuple[dict[str, float], dict[str, Any]]:
    """A champion that appeared meanwhile, scored on the candidate's test cases: (means, per-case scores)."""
    cases = (rescore or score_version)(ctx, model_name, version, evaluation)
    return evaluate.means(cases), cases


def register_stage(
    spec: PromoteSpec, ctx: Context, run_id: str, outcome: TrainOutcome, evaluation: Evaluation,
    tags: dict[str, str], rescore: Callable[[Context, str, str, Evaluation], dict[str, Any]] | None = None,
) -> Promotion:
    """Log and register the candidate (once, even when retried), then move ``champion`` if the gates pass.

    The move is a compare-and-set (:func:`voxelflow.release.promotion.settle`): the model's lock covers only
    reading, comparing and writing the aliases; if ``champion`` is no longer the version the candidate
    was compared with (another lifecycle promoted meanwhile), the candidate is scored against the new
    champion outside the lock and the gates are applied again. A retry that finds the candidate
    already champion takes the move as done.
    """
    uri, name = ctx.tracking_uri, spec.model_name
    version = registry.find_version(uri, name, run_id)
    model_uri = f"models:/{name}/{version}" if version else ""
    if version is None:
        weights = ctx.store.read_bytes(outcome.weights_key)
        model_uri = registry.log_model(uri, run_id, outcome.model_config, weights)
    tags = {**tags, "run_id": run_id, **{f"val_{k}": f"{v:.4f}" for k, v in evaluation.candidate.items()}}
    behaviour = candidate_behaviour(spec, ctx, outcome, evaluation)
    with ctx.db.locked(f"register:{name}"):  # registrations collide on version numbers
        version = registry.register(uri, model_uri, name, run_id, tags)

    def judge(champion: tuple[dict[str, float] | None, dict[str, Any] | None] | None) -> tuple[policy.Decision, bool]:
        champion_scores, champion_cases = champion or (None, None)
        decision = policy.decide(evaluation.candidate, champion_scores, spec.gates, behaviour, tags,
                                 evaluation.directions, evaluation.candidate_cases, champion_cases)
        awaiting = decision.promote and spec.approval == "manual"
        if awaiting:  # the lifecycle pauses for a person's answer (voxelflow.stages.approval.answer_stage)
            decision.promote = False
            decision.reasons.append("approval is manual: it keeps `challenger` until a person answers the paused "
                                    "lifecycle in the Prefect UI (or runs `voxelflow approve MODEL VERSION`)")
        return decision, awaiting

    settled = settle(uri, ctx.db, name, version, evaluation.champion_version,
                     (evaluation.champion, evaluation.champion_cases), judge,
                     lambda other: rescored(ctx, name, other, evaluation, rescore))
    record_decision(ctx.db, uri, name, version, settled, evaluation.candidate)
    decision, champion = settled.decision, registry.alias_version(uri, name)
    return Promotion(version, decision.promote, decision.reasons, champion, settled.previous, model_uri or
                     f"models:/{name}/{version}", decision.rows())
