"""Run a spec's graph: the same walk with no orchestrator (:class:`Runner`) and in the Prefect lifecycle
flow (a subclass that runs each node as a task or as a flow run on a work pool).

Chain nodes run one after the other; a branch (a ``needs`` step and what is chained after it) runs
beside them on a thread and is waited for before the lifecycle ends (branches after ``promote``:
before the release transaction closes). A gate that does not pass ends the lifecycle with
:class:`GateFailed` before any later node starts; an error in a branch fails the lifecycle with its
own message.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Iterator

from voxelflow.core import audit
from voxelflow.release import registry
from voxelflow.spec.conditions import MissingOutput
from voxelflow.spec.contracts import STAGES
from voxelflow.spec.graph import Graph, Node, build
from voxelflow.stages import candidates, deploy, evaluate, ingest, preprocess, promote, reuse, summary, tracking, train
from voxelflow.stages.context import Context
from voxelflow.stages.split import Split, split_stage
from voxelflow.stages.steps import StepRecord, run_step
from voxelflow.steps.api import CandidateRef, StepInputs

log = logging.getLogger(__name__)


class GateFailed(ValueError):
    """A gate step did not pass: the lifecycle stops there (not transient: a retry would not change it)."""

    def __init__(self, step_id: str, reason: str) -> None:
        super().__init__(f"gate {step_id} did not pass: {reason or 'no reason given'}")
        self.step_id, self.reason = step_id, reason
        self.records: dict[str, dict[str, Any]] = {}  # every step's record when the lifecycle stopped


@dataclass
class State:
    """What the lifecycle has made so far: the stages' references, the outputs a `when` reads, the steps' records."""

    ingested: Any = None
    prep: Any = None
    split: Any = None
    run_id: str | None = None
    outcome: Any = None
    evaluation: Any = None
    promotion: Any = None
    deployment: Any = None
    tags: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    records: dict[str, StepRecord] = field(default_factory=dict)
    unlogged: dict[str, float] = field(default_factory=dict)  # step metrics from before the MLflow run opened
    stop: threading.Event = field(default_factory=threading.Event)  # the lifecycle failed: start nothing more
    spec: Any = None  # with candidates: the challenger's spec (its preprocessing, its lineage)
    sweep: Any = None  # with candidates: their preprocessing, runs and choice (voxelflow.stages.candidates)
    at: str = ""  # the chain node running now: where the lifecycle failed, if it does
    trained: Any = None  # a recorded training for these inputs (voxelflow.stages.reuse.Found): reused
    champion_before: str | None = None  # the champion when promote started
    registered_before: bool = False  # the candidate was registered by an earlier lifecycle
    dataset: str | None = None  # the digest of a dataset an ingest recorded: the lifecycle's ingest takes it


# each stage is called through its module's attribute, so that what replaces it there (a timer) is what runs
STAGE_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "ingest": lambda spec, ctx, dataset=None: ingest.ingest_stage(spec.data, ctx, dataset=dataset),
    "preprocess": lambda spec, ctx, case_ids: preprocess.preprocess_stage(spec.preprocess, ctx, case_ids),
    "train": lambda spec, ctx, train_ids, run_id, val_ids: train.train_stage(spec, ctx, train_ids, run_id, val_ids),
    "evaluate": lambda spec, ctx, outcome, test_ids, run_id: evaluate.evaluate_stage(
        spec.evaluate, spec.promote.model_name, ctx, outcome, test_ids, run_id),
    "promote": lambda spec, ctx, run_id, outcome, evaluation, tags: promote.register_stage(
        spec.promote, ctx, run_id, outcome, evaluation, tags),
    "deploy": lambda spec, ctx, case_id: deploy.deploy_stage(spec.deploy, spec.promote.model_name, ctx, case_id),
}


def stage_args(stage_id: str, state: State, spec: Any) -> dict[str, Any]:
    """The references a built-in stage is called with (the same names as its placed flow's parameters)."""
    if stage_id == "ingest":
        return {"dataset": state.dataset} if state.dataset else {}
    if stage_id == "preprocess":
        return {"case_ids": state.ingested.case_ids}
    if stage_id == "train":
        return {"train_ids": state.split.train, "run_id": state.run_id, "val_ids": state.split.val}
    if stage_id == "evaluate":
        return {"outcome": state.outcome, "test_ids": state.split.test, "run_id": state.run_id}
    if stage_id == "promote":
        return {"run_id": state.run_id, "outcome": state.outcome, "evaluation": with_step_metrics(state, spec),
                "tags": state.tags}
    if stage_id == "deploy":
        return {"case_id": state.split.val[0]}
    raise KeyError(stage_id)


def with_step_metrics(state: State, spec: Any) -> Any:
    """The evaluation the gates judge: the candidate's test scores, and the metrics of the steps before promote
    that ``promote.gates.absolute`` names (``qc.outliers``), with their declared directions."""
    ev = state.evaluation
    extra = {m: v for m, v in _step_metrics(state).items() if m in spec.promote.gates.absolute}
    if not extra:
        return ev
    return replace(ev, candidate={**ev.candidate, **extra}, directions={**ev.directions, **spec.step_directions()})


def _step_metrics(state: State) -> dict[str, float]:
    return {f"{sid}.{k}": v for sid, rec in state.records.items() if rec.status != "skipped"
            for k, v in rec.metrics.items()}


class Runner:
    """How each node runs; this one runs everything here, with no orchestrator."""

    def __init__(self, spec: Any, ctx: Context, lifecycle_id: str = "", fresh: bool = False,
                 resume: bool = False, dataset: str | None = None) -> None:
        self.spec, self.ctx, self.lifecycle_id = spec, ctx, lifecycle_id
        self.dataset = dataset  # the digest of a dataset an ingest recorded: the lifecycle starts from it
        # recorded results of this pipeline: reused by key (none with fresh); resume: its latest failed lifecycle
        self.memo = reuse.Memo(ctx, spec, lifecycle_id, fresh=fresh, resume=resume)
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="voxelflow-branch")

    def stage(self, stage_id: str, args: dict[str, Any]) -> Any:
        return STAGE_FUNCTIONS[stage_id](self.spec, self.ctx, **args)

    def step(self, node: Node, inputs: StepInputs) -> StepRecord:
        return run_step(node.step, self.ctx, inputs)

    def open_run(self, dataset_digest: str, split: Split) -> str:
        return tracking.start_run(self.spec, self.ctx, dataset_digest, split)

    def approve(self, state: State) -> Any:
        """A promotion awaiting a person's answer (the flow pauses for it); with no orchestrator it stays so."""
        return state.promotion

    @contextlib.contextmanager
    def release(self, state: State) -> Iterator[None]:
        """What follows the promotion succeeds with it or puts ``champion`` and ``previous`` back."""
        try:
            yield
        except BaseException as exc:
            p = state.promotion
            if p is not None and p.promoted:
                from voxelflow.core import audit

                registry.revert_promotion(self.ctx.tracking_uri, self.ctx.db, self.spec.promote.model_name, p.version,
                                          "voxelflow", f"the release failed: {type(exc).__name__}: {exc}"[:2000],
                                          audit.Sink(self.ctx.db, self.ctx.tracking_uri))
            raise

    def candidates_table(self, rows: list[dict[str, Any]]) -> None:
        """Show the candidates' table (the flow: a table artifact); with no orchestrator it is in the MLflow run."""

    def beside(self, fn: Callable[[], Any]) -> Future:
        ctx = contextvars.copy_context()  # a flow's run context goes with the branch
        return self._pool.submit(ctx.run, fn)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def inputs_for(node: Node, state: State, spec: Any, graph: Graph, lifecycle_id: str) -> StepInputs:
    candidate = None
    if state.outcome is not None:
        candidate = CandidateRef(weights_key=state.outcome.weights_key, config=state.outcome.model_config)
    from voxelflow.data.preprocess import transform_digest

    return StepInputs(
        pipeline=spec.name, step_id=node.id, model_name=spec.promote.model_name, lifecycle_id=lifecycle_id or None,
        outputs={k: dict(v) for k, v in state.outputs.items() if k in graph.ancestors[node.id]},
        case_ids=list(state.ingested.case_ids) if state.ingested is not None else [],
        test_ids=list(state.split.test) if state.split is not None else [],
        preprocess_digest=transform_digest((state.spec or spec).preprocess) if state.prep is not None else None,
        run_id=state.run_id, candidate=candidate,
        model_version=state.promotion.version if state.promotion is not None else None)


def execute(spec: Any, runner: Runner) -> summary.LifecycleResult:
    """Run the graph of ``spec`` with ``runner``; the lifecycle's result, its steps' records included."""
    graph = build(spec)
    ctx, state = runner.ctx, State(dataset=runner.dataset)
    branches: list[tuple[Node, Future]] = []
    try:
        with contextlib.ExitStack() as stack:
            each = {n.id for n in candidates.per_candidate(graph)} if spec.candidates is not None else set()
            for node in graph.nodes:
                _raise_failed(branches)
                state.at = node.id
                if node.id in each:  # run for each candidate, with training
                    continue
                if node.id == "train" and spec.candidates is not None:
                    candidates.train_all(spec, state, graph, runner, stack,
                                         lambda n, st, sp, rn: _user(n, st, graph, sp, rn))
                    continue
                if node.branch:
                    branches.append((node, runner.beside(lambda n=node: _after(n, branches, state, graph, spec,
                                                                                 runner))))
                    continue
                _run(node, state, graph, spec, runner, stack)
            _wait(branches, lambda n: graph.after_promote(n.id))
        _wait(branches, lambda n: True)
    except GateFailed as exc:
        _settle(state, branches)
        exc.records = {sid: asdict(rec) for sid, rec in state.records.items()}
        _stopped(ctx, spec, state, exc)
        _failed(runner, exc.step_id, exc)
        raise
    except BaseException as exc:
        _settle(state, branches)
        _failed(runner, state.at, exc)
        raise
    runner.memo.finished()
    result = summary.summarise(state.ingested, state.prep, state.outcome, state.evaluation, state.promotion,
                               state.deployment, state.run_id or "")
    result.steps = {sid: asdict(rec) for sid, rec in state.records.items()}
    result.reused, result.champion_before = list(dict.fromkeys(runner.memo.reused)), state.champion_before
    result.registered_before = state.registered_before
    if state.sweep is not None:
        result.candidates, result.parent_run = state.sweep.rows(), state.sweep.parent_run
        result.pictures.append(state.sweep.curves_key)
    return result


def _failed(runner: Runner, step: str, exc: BaseException) -> None:
    """The lifecycle's row says where it failed (what ``--resume`` continues from); never hides its error."""
    try:
        runner.memo.failed(step, exc)
    except Exception as err:  # noqa: BLE001 - the lifecycle's own error is the one raised
        log.warning("could not record where the lifecycle failed: %s", err)


def _settle(state: State, branches: list[tuple[Node, Future]]) -> None:
    """The lifecycle failed: branches not started yet stop, the running ones are waited for (their own errors are
    logged; the lifecycle's is the one raised)."""
    state.stop.set()
    for node, fut in branches:
        try:
            fut.result()
        except BaseException as exc:  # noqa: BLE001 - the lifecycle already fails with its own error
            log.warning("step %s: %s", node.id, exc)


def _after(node: Node, branches: list[tuple[Node, Future]], state: State, graph: Graph, spec: Any,
           runner: Runner) -> None:
    """A branch node: wait for what it depends on (other branch nodes), then run it."""
    for dep in node.deps:
        for other, fut in list(branches):
            if other.id == dep:
                fut.result()
    while not all(d in state.records or d in state.outputs for d in node.deps):
        if state.stop.wait(0.05):  # a chain node it needs has not finished, and now never will
            raise RuntimeError(f"step {node.id} did not start: the lifecycle stopped before what it needs finished")
    if state.stop.is_set():
        raise RuntimeError(f"step {node.id} did not start: the lifecycle stopped")
    _run(node, state, graph, spec, runner, None)


def _wait(branches: list[tuple[Node, Future]], which: Callable[[Node], bool]) -> None:
    first: BaseException | None = None
    for node, fut in branches:
        if which(node):
            try:
                fut.result()
            except BaseException as exc:  # noqa: BLE001 - every branch is waited for, the first error raised
                first = first or exc
    if first is not None:
        raise first


def _raise_failed(branches: list[tuple[Node, Future]]) -> None:
    for _, fut in branches:
        if fut.done() and fut.exception() is not None:
            raise fut.exception()  # type: ignore[misc]


def _run(node: Node, state: State, graph: Graph, spec: Any, runner: Runner, stack: contextlib.ExitStack | None) -> None:
    if node.builtin:
        _stage(node.id, state, spec, runner, stack)
    else:
        _user(node, state, graph, spec, runner)


def _stage(sid: str, state: State, spec: Any, runner: Runner, stack: contextlib.ExitStack | None) -> None:
    ctx = runner.ctx
    if sid == "deploy" and state.promotion.champion is None:
        state.records[sid] = StepRecord(sid, "skipped", "no champion to deploy")
        return
    memo = runner.memo
    if sid == "promote":
        state.champion_before = registry.alias_version(ctx.tracking_uri, spec.promote.model_name)
        state.registered_before = registry.find_version(ctx.tracking_uri, spec.promote.model_name,
                                                        state.run_id) is not None
    found = state.trained if sid == "train" else None
    # with candidates, preprocessing is looked up per distinct preprocessing (voxelflow.stages.candidates)
    if found is None and (sid == "evaluate" or (sid == "preprocess" and spec.candidates is None)):
        found = memo.stage(sid, spec, state)
    if found is not None:
        result = found.result
        log.info("%s: reused the recorded result of an earlier lifecycle with the same inputs", sid)
    elif sid == "preprocess" and spec.candidates is not None:  # once per distinct preprocessing of the candidates
        result = candidates.preprocess_all(spec, state, runner)
    else:
        result = runner.stage(sid, stage_args(sid, state, spec))
        if sid in reuse.REUSABLE:
            memo.keep(sid, spec, state, result)
    if sid == "ingest":
        state.ingested = result
    elif sid == "preprocess":
        state.prep = result
        state.split = split_stage(spec.evaluate, preprocess.usable_cases(state.ingested, result))
        # with candidates each candidate's training is looked up by its own spec (voxelflow.stages.candidates)
        state.trained = memo.stage("train", spec, state) if spec.candidates is None else None
        assert stack is not None
        state.run_id = _open_run(runner, state, stack)
        if state.unlogged:
            registry.log_metrics(ctx.tracking_uri, state.run_id, dict(state.unlogged))
            state.unlogged.clear()
    elif sid == "train":
        state.outcome = result
    elif sid == "evaluate":
        state.evaluation = result
        state.tags = tracking.lineage(state.spec or spec, state.ingested.dataset_digest)
    elif sid == "promote":
        state.promotion = result
        state.promotion = runner.approve(state)
        assert stack is not None
        stack.enter_context(runner.release(state))
    elif sid == "deploy":
        state.deployment = result
    state.outputs[sid] = STAGES[sid].values(state.promotion if sid == "promote" else result)


def _open_run(runner: Runner, state: State, stack: contextlib.ExitStack) -> str:
    """The lifecycle's MLflow run: the recorded training's (reused), the failed lifecycle's being resumed (its
    checkpoints are there), else a new one; a run not finished is ended with how this lifecycle ends."""
    ctx, memo = runner.ctx, runner.memo
    run_id = state.trained.run_id if state.trained is not None else None
    if run_id is None and runner.spec.candidates is None:
        run_id = memo.resume_run()
    if run_id is None:
        run_id = runner.open_run(state.ingested.dataset_digest, state.split)
        stack.enter_context(tracking.closing_run(ctx, run_id))
    elif registry.client(ctx.tracking_uri).get_run(run_id).info.status != "FINISHED":
        registry.client(ctx.tracking_uri).update_run(run_id, status="RUNNING")
        stack.enter_context(tracking.closing_run(ctx, run_id))
    memo.opened(run_id)
    return run_id


def _user(node: Node, state: State, graph: Graph, spec: Any, runner: Runner) -> None:
    step = node.step
    skipped = [d for d in (step.needs or []) if d in state.records and state.records[d].status == "skipped"]
    reason = f"needs {', '.join(skipped)}, which did not run" if skipped else ""
    if not reason and node.condition is not None:
        try:
            if not node.condition.evaluate(state.outputs):
                reason = f"when {node.condition.text!r} is false"
        except MissingOutput as exc:
            reason = f"when {node.condition.text!r}: {exc.step}.{exc.output} is not available"
    if reason:
        state.records[node.id] = StepRecord(node.id, "skipped", reason, gate=node.gate)
        log.info("step %s skipped: %s", node.id, reason)
        return
    inputs = inputs_for(node, state, spec, graph, runner.lifecycle_id)
    # the steps before promote are reused by key; those after it always run, on the registry as it is now
    # with candidates the steps are not reused (each candidate's training is, by its own spec)
    each = state.sweep is not None or spec.candidates is not None
    memo = runner.memo if not each and not graph.after_promote(node.id) else None
    record = memo.step(node.step, inputs) if memo is not None else None
    if record is None:
        record = runner.step(node, inputs)
        if memo is not None and record.status != "failed":  # a gate that did not pass is asked again
            memo.keep_step(node.step, inputs, record)
    state.records[node.id] = record
    state.outputs[node.id] = {"passed": record.status == "passed", **record.metrics}
    if record.metrics and state.run_id is None:
        state.unlogged.update({f"{node.id}.{k}": v for k, v in record.metrics.items()})
    if record.status == "warning":
        log.warning("step %s did not pass (not a gate, the lifecycle goes on): %s", node.id, record.reason)
        audit.append(runner.ctx.db, "step.warning", "voxelflow", pipeline=spec.name, step=node.id,
                     reason=record.reason[:2000])
    elif record.status == "failed":
        raise GateFailed(node.id, record.reason)


def _stopped(ctx: Context, spec: Any, state: State, exc: GateFailed) -> None:
    """A gate stopped the lifecycle: its reason in the audit log and on the MLflow run (when one is open)."""
    audit.append(ctx.db, "step.gate_failed", "voxelflow", pipeline=spec.name, step=exc.step_id,
                 reason=exc.reason[:2000], run_id=state.run_id or "")
    if state.run_id:
        registry.client(ctx.tracking_uri).set_tag(state.run_id, "voxelflow.gate_failed",
                                                  f"{exc.step_id}: {exc.reason}"[:5000])
