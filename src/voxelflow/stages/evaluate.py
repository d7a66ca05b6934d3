"""The evaluate stage: the candidate and the champion scored case by case on the test side."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from voxelflow.data import ingest
from voxelflow.learn import evaluate, report
from voxelflow.release import registry
from voxelflow.spec.config import EvaluateSpec
from voxelflow.stages.context import Context
from voxelflow.stages.train import TrainOutcome, n_classes


@dataclass
class Evaluation:
    candidate: dict[str, float]  # means over the test cases: the absolute gates
    champion: dict[str, float] | None
    champion_version: str | None
    overlay_key: str
    test_ids: list[str] = field(default_factory=list)  # the test side: what a later champion is scored on too
    metrics: list[str] = field(default_factory=list)
    n_classes: int = 2
    custom: dict[str, dict[str, Any]] = field(default_factory=dict)  # evaluate.custom_metrics, as plain data
    directions: dict[str, bool] = field(default_factory=dict)  # metric -> higher is better
    candidate_cases: dict[str, dict[str, float]] = field(default_factory=dict)  # metric -> test case -> value
    champion_cases: dict[str, dict[str, float]] | None = None  # the relative gate pairs these with the candidate's


def evaluate_stage(
    spec: EvaluateSpec, model_name: str, ctx: Context, outcome: TrainOutcome, test_ids: list[str], run_id: str
) -> Evaluation:
    """Score the candidate and the current champion case by case on the same test cases (the test side
    alone: the validation cases chose the checkpoint and are never scored here)."""
    from voxelflow.learn.model import Segmenter

    candidate = Segmenter(outcome.model_config, ctx.store.read_bytes(outcome.weights_key))
    raw = ctx.layout.raw
    classes = n_classes(outcome.model_config["network"])
    custom = {k: v.model_dump() for k, v in spec.custom_metrics.items()}
    first: list[Any] = []  # the first held-out case's mask, kept for the overlay instead of segmenting it again

    def segment(image: Any, affine: Any) -> Any:
        pred = candidate.segment(image, affine)
        if not first:
            first.append(pred)
        return pred

    if not test_ids:
        raise ValueError("no test cases to evaluate on: the test side (evaluate.test_fraction) is empty")
    cases = evaluate.score_cases(segment, raw, test_ids, spec.metrics, classes, custom)
    scores = evaluate.means(cases)
    registry.log_metrics(ctx.tracking_uri, run_id, {f"test_{k}": v for k, v in scores.items()})
    champion_scores, champion_cases = None, None
    champion_version = registry.alias_version(ctx.tracking_uri, model_name)
    if champion_version is not None:  # any champion, registered before the test side existed or after
        with tempfile.TemporaryDirectory() as tmp:
            champ, _ = registry.load_segmenter(ctx.tracking_uri, model_name, Path(tmp))
        champion_cases = evaluate.score_cases(champ.segment, raw, test_ids, spec.metrics, classes, custom)
        champion_scores = evaluate.means(champion_cases)
        registry.log_metrics(ctx.tracking_uri, run_id, {f"champion_test_{k}": v for k, v in champion_scores.items()})
    registry.log_bytes(ctx.tracking_uri, run_id, "test-scores.json", json.dumps(
        {"candidate": cases, "champion": champion_cases, "champion_version": champion_version}, indent=1).encode())
    case = ingest.load_case(raw, test_ids[0])
    pred = first[0]  # score_cases() segments the cases in the order given
    png = report.overlay_png(case["image"], case.get("label"), pred,
                             title=f"{test_ids[0]}  dice {evaluate.dice(pred, case['label'], classes):.3f}")
    key = ctx.layout.report(run_id, "overlay.png")
    ctx.store.write_bytes(key, png)
    registry.log_bytes(ctx.tracking_uri, run_id, "overlay.png", png)
    return Evaluation(scores, champion_scores, champion_version, key, list(test_ids), list(spec.metrics), classes,
                      custom, spec.directions(), cases, champion_cases)
