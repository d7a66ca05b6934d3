"""What each built-in stage is: its spec section, the references it reads and gives, and its outputs.

References are JSON-able records of what a stage made (ids, digests, store keys, scores; never
arrays), each a dataclass of its stage's module, named by :data:`voxelflow.stages.references.REFERENCES`
(the spec sits below the stages: the graph is checked at load, before any stage is imported). They
cross process boundaries (a stage placed on a work pool leaves its result as JSON in the store) and
are validated back into their type with pydantic (:func:`voxelflow.stages.context.from_dict`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any, Callable

Value = float | int | bool | str | None

BUILTIN = ("ingest", "preprocess", "train", "evaluate", "promote", "deploy")


@dataclass(frozen=True)
class Stage:
    id: str
    section: str  # the spec section the stage reads
    reads: tuple[str, ...]  # the references it needs, made by the stages before it
    gives: str  # the reference it makes
    outputs: dict[str, str]  # name -> description: what a `when` may read as <id>.<name>
    values: Callable[[Any], dict[str, Value]]  # the outputs of a result


def _finite(x: Any) -> Value:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _ingest(r: Any) -> dict[str, Value]:
    labelled = set(r.case_ids)
    return {"new_cases": sum(1 for c in r.ingested if c in labelled), "cases": len(r.case_ids),
            "quarantined": len(r.quarantined), "duplicate": len(r.duplicate), "unlabelled": len(r.unlabelled),
            "arrived": r.arrived}


def _preprocess(r: Any) -> dict[str, Value]:
    return {"processed": r.processed, "reused": r.skipped, "failed": len(r.failed), "shards": r.shards}


def _train(r: Any) -> dict[str, Value]:
    return {"steps": r.steps, "seconds": round(r.seconds, 3), "best_metric": _finite(r.best_metric),
            "best_epoch": r.best_epoch, "stopped_early": bool(r.stopped_early),
            "stopped_for_time": bool(r.stopped_for_time), "resumed": r.resumed_from is not None,
            "final_loss": _finite(r.history[-1]["train_loss"]) if r.history else None}


def _evaluate(r: Any) -> dict[str, Value]:
    out: dict[str, Value] = {k: _finite(v) for k, v in r.candidate.items()}
    out.update({f"champion_{k}": _finite(v) for k, v in (r.champion or {}).items()})
    out["has_champion"] = r.champion_version is not None
    return out


def _promote(r: Any) -> dict[str, Value]:
    return {"promoted": bool(r.promoted), "version": r.version, "champion": r.champion,
            "reasons": "; ".join(r.reasons)}


def _deploy(r: Any) -> dict[str, Value]:
    return {"dice": _finite(r.dice), "latency_s": round(r.latency_s, 4), "model_version": r.model_version,
            "temporary": bool(r.temporary), "endpoint": r.endpoint}


STAGES: dict[str, Stage] = {
    "ingest": Stage("ingest", "data", (), "dataset", {
        "new_cases": "labelled cases this run added to the dataset",
        "cases": "labelled cases in the dataset (what preprocessing and training use)",
        "quarantined": "objects this run quarantined",
        "duplicate": "cases this run found to be duplicates of stored ones",
        "unlabelled": "stored cases without a label (never trained or scored on)",
        "arrived": "objects found under the source",
    }, _ingest),
    "preprocess": Stage("preprocess", "preprocess", ("dataset",), "preprocessed", {
        "processed": "cases preprocessed by this run",
        "reused": "cases already preprocessed with the same transforms (reused)",
        "failed": "cases preprocessing could not handle (left out of the split)",
        "shards": "shards the work was cut into",
    }, _preprocess),
    "train": Stage("train", "train", ("preprocessed", "split", "run"), "candidate", {
        "steps": "optimizer steps made",
        "seconds": "training time in seconds",
        "best_metric": "best validation dice (null without validation)",
        "best_epoch": "epoch of the kept weights (null without validation)",
        "stopped_early": "whether patience stopped training before the last epoch",
        "stopped_for_time": "whether train.max_seconds stopped training before the last epoch",
        "resumed": "whether training resumed from a checkpoint",
        "final_loss": "training loss of the last epoch",
    }, _train),
    "evaluate": Stage("evaluate", "evaluate", ("candidate", "split", "run"), "evaluation", {
        "<metric>": "each metric evaluation computes (dice, dice_1, hausdorff95, a custom metric): the candidate's "
                    "mean over the test cases",
        "champion_<metric>": "the same for the champion (absent without one)",
        "has_champion": "whether a champion was scored",
    }, _evaluate),
    "promote": Stage("promote", "promote", ("candidate", "evaluation", "run"), "promotion", {
        "promoted": "whether the candidate became champion",
        "version": "the registered model version of the candidate",
        "champion": "the champion version after the decision",
        "reasons": "the gates' reasons for the decision, joined by '; '",
    }, _promote),
    "deploy": Stage("deploy", "deploy", ("promotion",), "deployment", {
        "dice": "dice of the smoke test's prediction over HTTP",
        "latency_s": "seconds of the smoke test's request",
        "model_version": "the version the endpoint served",
        "temporary": "whether the endpoint was the smoke test's own (stopped with the stage)",
        "endpoint": "where the model was deployed (a URL, or kubernetes:NAMESPACE/NAME)",
    }, _deploy),
}


def outputs_of(stage_id: str, spec: Any) -> set[str]:
    """The outputs of a built-in stage for this spec (evaluation's depend on its metrics and classes)."""
    names = set(STAGES[stage_id].outputs)
    if stage_id == "evaluate":
        metrics = spec.computed_metrics()
        names = {"has_champion", *metrics, *(f"champion_{m}" for m in metrics)}
    return names


def as_json(value: Any) -> Any:
    return asdict(value) if is_dataclass(value) and not isinstance(value, type) else value
