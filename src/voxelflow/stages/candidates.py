"""The spec's candidates run: preprocessing once per distinct preprocessing, each candidate trained (up to
``candidates.max_parallel`` at once) in an MLflow child run of the lifecycle's run, scored on the validation
cases, the user's steps between ``train`` and ``evaluate`` run for it; the best by ``select.metric`` becomes
the challenger, which alone goes on to evaluation on the test cases, the gates and the champion comparison.

A candidate whose training an earlier lifecycle recorded for the same inputs (its spec's train section, its
preprocessing, the split, the code: :mod:`voxelflow.stages.reuse`) reuses it and its child run, unless the
lifecycle is ``fresh``; it is scored on the validation cases again. A candidate that fails is recorded with its
reason and the others go on; when every one fails, the lifecycle fails. The table of every candidate and a picture of their validation curves are logged to the lifecycle's run.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

from voxelflow.core import redact
from voxelflow.data.preprocess import PreprocessReport, transform_digest
from voxelflow.learn import evaluate
from voxelflow.release import registry
from voxelflow.spec.candidates import Candidate, higher_is_better
from voxelflow.spec.contracts import STAGES
from voxelflow.spec.graph import Graph, Node, build
from voxelflow.stages import tracking
from voxelflow.stages.context import from_dict
from voxelflow.stages.train import TrainOutcome, n_classes

log = logging.getLogger(__name__)


@dataclass
class CandidateRun:
    """What became of one candidate."""

    index: int
    overrides: dict[str, Any]
    label: str
    preprocess_digest: str
    run_id: str = ""
    status: str = "pending"  # trained | failed
    reason: str = ""
    validation: dict[str, float] = field(default_factory=dict)  # metric -> mean over the validation cases
    steps: dict[str, str] = field(default_factory=dict)  # own step between train and evaluate -> its status
    train_steps: int = 0
    seconds: float = 0.0
    chosen: bool = False
    why: str = ""
    outcome: TrainOutcome | None = None
    reused: bool = False  # its training is an earlier lifecycle's, recorded for the same inputs (and its run)

    def row(self, metric: str) -> dict[str, Any]:
        """The candidate as a row of the table (JSON-able, one level)."""
        value = self.validation.get(metric)
        return {"candidate": self.index, "overrides": self.label, "status": self.status,
                f"validation {metric}": None if value is None or not math.isfinite(value) else round(value, 4),
                "validation": ", ".join(f"{k} {v:.4g}" for k, v in self.validation.items()),
                "steps": ", ".join(f"{k} {v}" for k, v in self.steps.items()), "train steps": self.train_steps,
                "seconds": round(self.seconds, 2), "reused": self.reused, "chosen": self.chosen, "why": self.why,
                "preprocessing": self.preprocess_digest, "run": self.run_id}


@dataclass
class Sweep:
    """The candidates of one lifecycle: their preprocessing, their runs, the choice."""

    parent_run: str = ""
    metric: str = ""
    preprocessed: dict[str, dict[str, Any]] = field(default_factory=dict)  # digest -> its preprocessing report
    runs: list[CandidateRun] = field(default_factory=list)
    curves_key: str = ""

    def rows(self) -> list[dict[str, Any]]:
        return [r.row(self.metric) for r in self.runs]


def for_candidate(runner: Any, spec: Any, name: str) -> Any:
    """The runner with the candidate's spec: what it runs is the candidate's (a placed stage leaves its result
    under the lifecycle's id and the candidate's name, apart from the other candidates')."""
    other = copy.copy(runner)
    other.spec = spec
    other.lifecycle_id = f"{runner.lifecycle_id}-{name}" if runner.lifecycle_id else name
    return other


def preprocess_all(spec: Any, state: Any, runner: Any) -> PreprocessReport:
    """Each distinct preprocessing of the candidates run once (and the spec's own when its steps before ``train``
    read it); one report of them all: a case that failed in any is left out of the split, so that every
    candidate trains and is scored on the same cases."""
    graph = build(spec)
    specs: dict[str, Any] = {}
    if any(not n.builtin and "train" not in graph.ancestors[n.id] and "preprocess" in graph.ancestors[n.id]
           for n in graph.nodes):
        specs[transform_digest(spec.preprocess)] = spec
    for c in spec.candidate_specs():
        specs.setdefault(transform_digest(c.spec.preprocess), c.spec)
    sweep = state.sweep = Sweep(metric=spec.candidates.select.metric)
    memo = runner.memo  # a preprocessing recorded for these inputs is reused, as without candidates
    reports = []
    for digest, pspec in specs.items():
        found = memo.stage("preprocess", pspec, state)
        if found is not None:
            report = found.result
        else:
            report = for_candidate(runner, pspec, f"preprocess-{digest}").stage(
                "preprocess", {"case_ids": state.ingested.case_ids})
            memo.keep("preprocess", pspec, state, report)
        sweep.preprocessed[digest] = asdict(report)
        reports.append(report)
    failed = {f["case"]: f for r in reports for f in r.failed}
    first = reports[0]
    return replace(first, processed=sum(r.processed for r in reports), skipped=sum(r.skipped for r in reports),
                   shards=sum(r.shards for r in reports), bytes_written=sum(r.bytes_written for r in reports),
                   failed=list(failed.values()))


def per_candidate(graph: Graph) -> list[Node]:
    """The user's steps that run once per candidate: in the lifecycle's chain after ``train``, before ``evaluate``."""
    return [n for n in graph.nodes if not n.builtin and n.branch == 0 and "train" in graph.ancestors[n.id]
            and "evaluate" not in graph.ancestors[n.id]]


def train_all(spec: Any, state: Any, graph: Graph, runner: Any, stack: contextlib.ExitStack,
              run_step: Callable[[Node, Any, Any, Any], None]) -> None:
    """Train every candidate, choose the challenger and make it the lifecycle's candidate (``state.outcome``,
    ``state.run_id`` its child run, ``state.spec`` its spec); ``run_step(node, state, spec, runner)`` runs one of
    the user's steps for a candidate."""
    section, ctx = spec.candidates, runner.ctx
    memo = runner.memo  # recorded trainings are reused per candidate, by the same keys
    sweep: Sweep = state.sweep
    sweep.parent_run = state.run_id
    nodes = per_candidate(graph)
    found = spec.candidate_specs()
    sweep.runs = [CandidateRun(c.index, c.overrides, c.label, transform_digest(c.spec.preprocess)) for c in found]
    states: dict[int, Any] = {}

    def one(c: Candidate, run: CandidateRun) -> None:
        if state.stop.is_set():
            run.status, run.reason = "failed", "the lifecycle stopped before it started"
            return
        crunner = for_candidate(runner, c.spec, f"candidate-{c.index}")
        started = time.monotonic()
        # the candidate's inputs as reuse keys them: its spec and its own preprocessing's report
        keyed = replace(state, spec=c.spec, prep=from_dict(PreprocessReport, sweep.preprocessed[run.preprocess_digest]))
        try:
            found = memo.stage("train", c.spec, keyed)
            if found is not None and found.run_id:  # trained by an earlier lifecycle: its child run and weights
                run.run_id, outcome, run.reused = found.run_id, found.result, True
            else:
                run.run_id = crunner.open_run(state.ingested.dataset_digest, None)
                tracking.mark_candidate(ctx, run.run_id, sweep.parent_run, c.index, c.overrides)
                outcome = crunner.stage("train", {"train_ids": state.split.train, "run_id": run.run_id,
                                                  "val_ids": state.split.val})
                memo.keep("train", c.spec, replace(keyed, run_id=run.run_id), outcome)
            run.outcome, run.train_steps = outcome, outcome.steps
            run.validation = score_validation(c.spec, ctx, outcome, state.split.val)
            if not run.reused:
                registry.log_metrics(ctx.tracking_uri, run.run_id, {f"val_{k}": v for k, v in run.validation.items()})
            mine = replace(state, run_id=run.run_id, outcome=outcome, spec=c.spec, records=dict(state.records),
                           outputs={**{k: dict(v) for k, v in state.outputs.items()},
                                    "train": STAGES["train"].values(outcome)})
            states[c.index] = mine
            for node in nodes:
                try:
                    run_step(node, mine, c.spec, crunner)
                finally:
                    if node.id in mine.records:
                        run.steps[node.id] = mine.records[node.id].status
            run.status = "trained"
        except Exception as exc:  # noqa: BLE001 - a failed candidate is recorded; the others go on
            redact.scrub(exc)
            run.status, run.reason = "failed", f"{type(exc).__name__}: {exc}"[:1000]
            log.warning("candidate %d (%s) failed: %s", c.index, c.label, run.reason)
            if run.run_id:
                _end(ctx, run.run_id, "FAILED")
        finally:
            run.seconds = time.monotonic() - started

    with ThreadPoolExecutor(min(section.max_parallel, len(found)), thread_name_prefix="voxelflow-candidate") as pool:
        futures = [pool.submit(contextvars.copy_context().run, one, c, r) for c, r in zip(found, sweep.runs)]
        for f in futures:
            f.result()
    chosen = choose(sweep.runs, sweep.metric, higher_is_better(spec, sweep.metric))
    for run in sweep.runs:
        if run.status == "trained" and not run.chosen:
            _end(ctx, run.run_id, "FINISHED")
    publish(spec, ctx, sweep, runner)
    if chosen is None:
        raise RuntimeError("every candidate failed: " + "; ".join(f"candidate {r.index} ({r.label}): "
                                                                  f"{r.reason or r.why}" for r in sweep.runs))
    stack.enter_context(tracking.closing_run(ctx, chosen.run_id))  # the challenger's run ends with the lifecycle
    mine = states[chosen.index]
    state.outcome, state.run_id, state.spec = chosen.outcome, chosen.run_id, mine.spec
    state.records.update({n.id: mine.records[n.id] for n in nodes if n.id in mine.records})
    state.outputs.update({k: v for k, v in mine.outputs.items() if k == "train" or k in {n.id for n in nodes}})


def score_validation(spec: Any, ctx: Any, outcome: TrainOutcome, val_ids: list[str]) -> dict[str, float]:
    """The candidate's means over the validation cases, scored as evaluation scores the test cases."""
    from voxelflow.learn.model import Segmenter

    if not val_ids:
        raise ValueError("no validation cases to compare the candidates on (evaluate.val_fraction)")
    model = Segmenter(outcome.model_config, ctx.store.read_bytes(outcome.weights_key))
    custom = {k: v.model_dump() for k, v in spec.evaluate.custom_metrics.items()}
    cases = evaluate.score_cases(model.segment, ctx.layout.raw, val_ids, spec.evaluate.metrics,
                                 n_classes(outcome.model_config["network"]), custom)
    return evaluate.means(cases)


def choose(runs: list[CandidateRun], metric: str, higher: bool) -> CandidateRun | None:
    """The best trained candidate by ``metric`` (the first of equals); each run says why it was chosen or not."""
    def value(r: CandidateRun) -> float | None:
        v = r.validation.get(metric)
        return v if v is not None and math.isfinite(v) else None

    eligible = [r for r in runs if r.status == "trained" and value(r) is not None]
    for r in runs:
        if r.status == "failed":
            r.why = f"failed: {r.reason}"
        elif value(r) is None:
            r.why = f"no finite validation {metric}"
    if not eligible:
        return None
    best = max(eligible, key=lambda r: (value(r) if higher else -value(r), -r.index))  # type: ignore[operator]
    best.chosen = True
    best.why = f"best validation {metric} {value(best):.4f} ({'higher' if higher else 'lower'} is better)"
    for r in eligible:
        if r is not best:
            r.why = f"validation {metric} {value(r):.4f}, candidate {best.index} has {value(best):.4f}"
    return best


def publish(spec: Any, ctx: Any, sweep: Sweep, runner: Any) -> None:
    """The table of every candidate (``candidates.json``, ``candidates.md``) and their validation curves
    (``candidate-curves.png``) on the lifecycle's run; the runner shows the table too (the flow: an artifact)."""
    rows = sweep.rows()
    uri, parent = ctx.tracking_uri, sweep.parent_run
    registry.log_bytes(uri, parent, "candidates.json", json.dumps(rows, indent=1).encode())
    registry.log_bytes(uri, parent, "candidates.md", "\n".join(markdown(rows)).encode())
    png = curves_png({f"{r.index}: {r.label}": r.outcome.history for r in sweep.runs if r.outcome is not None},
                     sweep.metric)
    sweep.curves_key = ctx.layout.report(parent, "candidate-curves.png")
    ctx.store.write_bytes(sweep.curves_key, png)
    registry.log_bytes(uri, parent, "candidate-curves.png", png)
    runner.candidates_table(rows)


def markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The candidates as a markdown table (no lines without candidates)."""
    if not rows:
        return []
    cols = ["candidate", "overrides", "status", "validation", "steps", "train steps", "seconds", "chosen", "why"]
    out = ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        cells = [str(row[c]).replace("|", "\\|").replace("\n", " ")[:300] for c in cols]
        cells[7] = "yes" if row["chosen"] else ""
        out.append("| " + " | ".join(cells) + " |")
    return out


def curves_png(histories: dict[str, list[dict[str, float]]], metric: str) -> bytes:
    """The candidates' validation dice by epoch, one line each (their training loss where none validated)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 3.8))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    key = "val_epoch_dice" if any("val_epoch_dice" in h for hs in histories.values() for h in hs) else "train_loss"
    for name, history in histories.items():
        points = [(h["epoch"] + 1, h[key]) for h in history if key in h]
        if points:
            ax.plot(*zip(*points), marker=".", label=name[:60])
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation dice" if key == "val_epoch_dice" else key)
    ax.set_title(f"candidates (the challenger chosen by validation {metric})")
    ax.grid(alpha=0.3)
    if histories:
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return buf.getvalue()


def _end(ctx: Any, run_id: str, status: str) -> None:
    try:
        registry.end_run(ctx.tracking_uri, run_id, status)
    except Exception as exc:  # noqa: BLE001 - the candidate's outcome stands; its run's status is secondary
        log.warning("could not mark MLflow run %s %s: %s", run_id, status, redact.redact_exc(exc))
