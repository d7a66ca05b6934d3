"""The lifecycle's result (:class:`LifecycleResult`) and its closing report in markdown."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from voxelflow.data import ingest, preprocess
from voxelflow.stages.deploy import Deployment
from voxelflow.stages.evaluate import Evaluation
from voxelflow.stages.promote import Promotion
from voxelflow.stages.train import TrainOutcome


@dataclass
class LifecycleResult:
    dataset_digest: str
    run_id: str
    ingest: dict[str, Any]
    preprocess: dict[str, Any]
    train: dict[str, Any]
    metrics: dict[str, float]
    champion_metrics: dict[str, float] | None
    promotion: dict[str, Any]
    deployment: dict[str, Any] | None
    pictures: list[str] = field(default_factory=list)
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)  # the spec's own steps: id -> record
    candidates: list[dict[str, Any]] = field(default_factory=list)  # a row per candidate: overrides, scores, choice
    parent_run: str = ""  # with candidates: the lifecycle's MLflow run; run_id is the challenger's, a child of it
    reused: list[str] = field(default_factory=list)  # steps whose recorded results of an earlier lifecycle were used
    champion_before: str | None = None  # the champion when promote started
    registered_before: bool = False  # the candidate's version was registered by an earlier lifecycle


def summarise(
    ingested: ingest.IngestReport, prep: preprocess.PreprocessReport, outcome: TrainOutcome, evaluation: Evaluation,
    promotion: Promotion, deployment: Deployment | None, run_id: str,
) -> LifecycleResult:
    return LifecycleResult(
        dataset_digest=ingested.dataset_digest,
        run_id=run_id,
        ingest=ingested.summary(),
        preprocess=asdict(prep),
        train={"steps": outcome.steps, "seconds": round(outcome.seconds, 2),
               "final_loss": outcome.history[-1]["train_loss"] if outcome.history else None},
        metrics=evaluation.candidate,
        champion_metrics=evaluation.champion,
        promotion=asdict(promotion),
        deployment=asdict(deployment) if deployment else None,
        pictures=[outcome.curve_key, evaluation.overlay_key],
    )


def markdown(result: LifecycleResult, name: str) -> str:
    """The lifecycle's closing report (a Prefect markdown artifact, and the CLI's summary)."""
    p, d = result.promotion, result.deployment
    rows = [
        ("dataset digest", f"`{result.dataset_digest}`"),
        ("cases", f"{result.ingest['cases']} ({result.ingest['ingested']} new, {result.ingest['duplicate']} "
                  f"duplicate, {result.ingest['quarantined']} quarantined; "
                  f"{result.ingest['already_seen']} objects already in the ledger)"
                  if not result.ingest.get("recorded") else
                  f"{result.ingest['cases']} (the dataset the triggering ingest recorded; the source not read again)"),
        ("preprocessed", f"{result.preprocess['processed']} new, {result.preprocess['skipped']} reused, "
                         f"{len(result.preprocess['failed'])} failed"),
        ("training", f"{result.train['steps']} steps in {result.train['seconds']} s"),
        *[(f"test {k}", f"{v:.4f}") for k, v in result.metrics.items()],
        ("model version", f"{name} v{p['version']} ({_decision(result)})"),
        ("gates", "; ".join(p["reasons"])),
        ("MLflow run", f"`{result.run_id}`"),
    ]
    if d:
        stopped = " - temporary smoke-test endpoint, stopped with the stage" if d.get("temporary") else ""
        rows += [("endpoint", f"{d['endpoint']}/v1/segment (v{d['model_version']}){stopped}"),
                 ("HTTP prediction dice", f"{d['dice']:.4f} on {d['case']}")]
    if result.reused:
        rows.insert(0, ("reused", f"{', '.join(result.reused)}: recorded results of an earlier lifecycle with the "
                                  "same inputs (`--fresh` computes them again)"))
    lines = [f"# voxelflow lifecycle: {name}", "", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]
    from voxelflow.stages.candidates import markdown as candidates_markdown

    return "\n".join(lines + steps_markdown(result.steps) + candidates_markdown(result.candidates)) + "\n"


def _decision(result: LifecycleResult) -> str:
    p, before = result.promotion, result.champion_before
    if result.registered_before and before == p["version"] == p["champion"]:
        return "already registered and champion: nothing new registered, the champion unchanged"
    said = "promoted to champion" if p["promoted"] else "not promoted"
    if result.registered_before:
        said += "; already registered by an earlier lifecycle, nothing new registered"
    return said


def steps_markdown(steps: dict[str, dict[str, Any]]) -> list[str]:
    """The spec's own steps as a table: status, reason, metrics, seconds (no lines without steps)."""
    if not steps:
        return []
    rows = ["", "| step | status | reason | metrics | seconds |", "|---|---|---|---|---|"]
    for sid, rec in steps.items():
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in rec.get("metrics", {}).items())
        reason = str(rec.get("reason", "")).replace("|", "\\|").replace("\n", " ")[:300]
        gate = " (gate)" if rec.get("gate") else ""
        rows.append(f"| {sid}{gate} | {rec['status']} | {reason} | {metrics} | {rec.get('seconds', 0)} |")
    return rows
