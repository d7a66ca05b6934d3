"""The lifecycle's stages as plain functions: each takes its own spec section and the outputs before it.

Prefect tasks wrap these one to one (``tasks/``); :func:`run` chains them with no orchestrator,
which is what the orchestration benchmark compares the flow against.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from voxelflow.core import audit, redact
from voxelflow.core.db import Database, connect
from voxelflow.core.storage import Layout, Store
from voxelflow.data import ingest, preprocess
from voxelflow.learn import devices, evaluate, report, train
from voxelflow.release import policy, registry
from voxelflow.release.promotion import record_decision, settle
from voxelflow.spec.config import (
    DataSpec,
    DeploySpec,
    EvaluateSpec,
    PipelineSpec,
    PreprocessSpec,
    PromoteSpec,
    Settings,
)

Progress = Callable[[int, int], None]
T = TypeVar("T")


@dataclass(frozen=True)
class Context:
    """What every stage needs besides its section: where bytes and state live, which services to use."""

    settings: Settings
    pipeline: str

    @property
    def store(self) -> Store:
        return Store(self.settings.store_url)

    @property
    def db(self) -> Database:
        return connect(self.settings.database)

    @property
    def layout(self) -> Layout:
        return Layout(self.store, self.pipeline)

    @property
    def tracking_uri(self) -> str:
        return self.settings.tracking_uri


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild a stage's result dataclass from its JSON form (a stage run elsewhere wrote it)."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in names})


def ingest_stage(data: DataSpec, ctx: Context, progress: Progress | None = None,
                 require_cases: bool = True) -> ingest.IngestReport:
    source = ctx.settings.expand(data.source)
    key = ctx.settings.deid_key.get_secret_value() if ctx.settings.deid_key else None
    result = ingest.ingest(data, ctx.layout, ctx.db, source, progress=progress, deid_key=key)
    if require_cases and not result.case_ids:
        raise ValueError(f"no usable cases under {source}: {len(result.quarantined)} quarantined")
    audit.append(ctx.db, "data.ingested", "voxelflow", pipeline=ctx.pipeline, **result.summary())
    for q in result.quarantined:
        # case id and reason only: details name source objects, which only the ledger maps to hashes
        audit.append(ctx.db, "data.quarantined", "voxelflow", pipeline=ctx.pipeline, case=q["case"], reason=q["reason"])
    return result


def preprocess_stage(
    spec: PreprocessSpec, ctx: Context, case_ids: list[str], progress: Progress | None = None
) -> preprocess.PreprocessReport:
    """New cases only, shard by shard on a Dask cluster whose workers read and write the store themselves."""
    from voxelflow.data.cluster import dask_client

    layout = ctx.layout
    out = layout.preprocessed(preprocess.transform_digest(spec))
    for cases in (layout.raw, out):  # attempts of crashed or outraced writers, once they are an hour old
        swept = cases.sweep()
        if swept:
            audit.append(ctx.db, "store.swept", "voxelflow", pipeline=ctx.pipeline, prefix=cases.prefix,
                         attempts=len(swept))
    if not set(case_ids) - set(out.committed()):  # nothing new: no cluster needed
        return preprocess.preprocess(spec, layout.raw, case_ids, out, progress=progress)
    with dask_client(spec.cluster, ctx.settings.dask_scheduler, ctx.settings.dask_workers, device=spec.device,
                     adaptive=spec.adaptive) as client:
        report = preprocess.preprocess(spec, layout.raw, case_ids, out, client=client, progress=progress)
    for failure in report.failed:
        audit.append(ctx.db, "data.preprocess_failed", "voxelflow", pipeline=ctx.pipeline, **failure)
    return report


def usable_cases(ingested: ingest.IngestReport, prep: preprocess.PreprocessReport) -> list[str]:
    """The dataset less the cases preprocessing could not handle."""
    failed = {f["case"] for f in prep.failed}
    return [c for c in ingested.case_ids if c not in failed]


@dataclass
class Split:
    train: list[str]
    val: list[str]  # checkpoint selection and early stopping
    test: list[str] = field(default_factory=list)  # the gates and the champion comparison, alone


def split_stage(spec: EvaluateSpec, case_ids: list[str]) -> Split:
    """The three sides by content hash alone: new cases never move an old one across (no seed)."""
    tr, va, te = evaluate.sides(case_ids, spec.test_fraction, spec.val_fraction)
    return Split(tr, va, te)


def n_classes(network: dict[str, dict[str, Any]]) -> int:
    """Classes the network predicts, background included (its ``out_channels``)."""
    args = next(iter(network.values()))
    return int(args.get("out_channels", 2))


def lineage(spec: PipelineSpec, dataset_digest: str) -> dict[str, str]:
    """What ties a model version back to its data and its spec."""
    from voxelflow.core import user_code

    return {"dataset_digest": dataset_digest, "spec_digest": spec.digest(), "pipeline": spec.name,
            "preprocess_digest": preprocess.transform_digest(spec.preprocess), **user_code.lineage(spec)}


def start_run(spec: PipelineSpec, ctx: Context, dataset_digest: str, split: Split | None = None) -> str:
    """Open the MLflow run; the split, when given, is kept in it as ``split.json`` (all three sides)."""
    ensure_tracking(ctx)
    run_id = registry.start_run(ctx.tracking_uri, ctx.settings.artifact_root, spec, lineage(spec, dataset_digest))
    if split is not None:
        ev = spec.evaluate
        registry.log_bytes(ctx.tracking_uri, run_id, "split.json", json.dumps(
            {"rule": evaluate.sides_rule(ev.test_fraction, ev.val_fraction), "test_fraction": ev.test_fraction,
             "val_fraction": ev.val_fraction, "train": split.train, "val": split.val, "test": split.test},
            indent=1).encode())
    return run_id


_tracking_ready: set[str] = set()


def ensure_tracking(ctx: Context) -> None:
    """Let one process at a time create MLflow's schema: two lifecycles starting together on a fresh
    tracking database would otherwise both run MLflow's migrations and one would fail."""
    if ctx.tracking_uri in _tracking_ready:
        return
    with ctx.db.locked("mlflow-schema"):
        registry.client(ctx.tracking_uri).search_experiments(max_results=1)
    _tracking_ready.add(ctx.tracking_uri)


@dataclass
class TrainOutcome:
    weights_key: str
    model_config: dict[str, Any]
    history: list[dict[str, float]]
    steps: int
    seconds: float
    resumed_from: int | None
    curve_key: str
    best_epoch: int | None = None  # the validation whose weights were kept (None: training did not validate)
    best_metric: float | None = None
    stopped_early: bool = False
    planned_steps: int = 0  # epochs x steps an epoch: steps falls short of it only when patience stopped the run


def model_config(spec: PipelineSpec) -> dict[str, Any]:
    """What the registered model needs besides its weights: network, preprocessing, sliding window."""
    roi = spec.roi_size()
    if roi is None:  # the spec refuses this at load; a dict from elsewhere may not have been checked
        raise ValueError("no sliding window: set evaluate.sliding_window.roi_size")
    window = spec.evaluate.sliding_window
    return {
        "network": spec.train.network,
        "transforms": spec.preprocess.transforms,
        "spatial_size": list(roi),
        "sliding_window": {"roi_size": list(roi), "overlap": window.overlap, "sw_batch_size": window.sw_batch_size,
                           "mode": window.mode},
        "precision": spec.train.precision,
        "postprocess": spec.evaluate.postprocess,
    }


def train_stage(
    spec: PipelineSpec, ctx: Context, train_ids: list[str], run_id: str, val_ids: list[str] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainOutcome:
    """Train on the preprocessed store, validating on ``val_ids`` with the sliding window every
    ``train.val_every`` epochs; checkpoints and the best weights go to the store, so any machine can go on."""
    layout, tspec = ctx.layout, spec.train
    out = layout.preprocessed(preprocess.transform_digest(spec.preprocess))
    where = devices.placement(tspec.devices, devices.visible_gpus(), tspec.batch_size)
    device, budget = devices.cache_placement(tspec.cache_mb * 2**20, where, tspec.workers,
                                             devices.free_gpu_bytes() if where.kind == "cuda" else None)
    mc = registry.client(ctx.tracking_uri)
    mc.set_tag(run_id, "voxelflow.train_placement", where.describe())
    mc.set_tag(run_id, "voxelflow.train_determinism", devices.determinism(tspec.deterministic, where.kind))
    cases = train.StoreCases(out, train_ids, budget, device)
    validation, val_cases = None, None
    if val_ids:
        window = spec.evaluate.sliding_window
        val_cases = train.StoreCases(out, val_ids, max(0, budget - cases.cached_bytes), device)
        validation = train.Validation(
            val_cases, spec.roi_size(), n_classes(tspec.network), window.overlap, window.sw_batch_size, window.mode,
            tspec.val_every, tspec.patience)
    check_labels(ctx, [cases] + ([val_cases] if val_cases is not None else []), n_classes(tspec.network))
    checkpoints = train.Checkpoints(ctx.store, layout.checkpoints(run_id))
    pending: list[tuple[int, dict[str, float]]] = []
    # tracking runs beside training on one thread of its own: metrics go in batches, pictures are drawn
    # and logged there, so a step never waits for MLflow; the first failure is raised at the next call
    tracker = ThreadPoolExecutor(1, thread_name_prefix="voxelflow-tracking")
    sent: list[Future] = []

    def submit(fn: Callable[..., Any], *args: Any) -> None:
        for done in [f for f in sent if f.done()]:
            sent.remove(done)
            done.result()
        sent.append(tracker.submit(fn, *args))

    def log(epoch: int, metrics: dict[str, float]) -> None:
        pending.append((epoch, metrics))
        if len(pending) >= 5 or epoch + 1 == tspec.epochs:  # batched: one request per few epochs
            flush()
        if on_epoch:
            on_epoch(epoch, metrics)

    def flush() -> None:
        if pending:
            submit(registry.log_metric_steps, ctx.tracking_uri, run_id, list(pending))
            pending.clear()

    def draw_overlay(epoch: int, dice: float, sample: dict[str, Any]) -> None:
        png = report.overlay_png(sample["image"], sample["label"], sample["pred"],
                                 title=f"epoch {epoch + 1}  validation dice {dice:.3f}")
        registry.log_bytes(ctx.tracking_uri, run_id, f"validation-epoch-{epoch + 1:04d}.png", png)

    def overlay(epoch: int, scores: dict[str, float], sample: dict[str, Any]) -> None:
        submit(draw_overlay, epoch, scores["val_epoch_dice"], sample)

    curve = layout.report(run_id, "training-curve.png")

    def draw_curve(history: list[dict[str, float]]) -> None:
        png = report.curve_png(history)
        ctx.store.write_bytes(curve, png)
        registry.log_bytes(ctx.tracking_uri, run_id, "training-curve.png", png)

    try:
        with registry.system_metrics(ctx.tracking_uri, run_id):
            result = train.train(tspec, cases, checkpoints, validation, on_epoch=log, on_validation=overlay)
        if result.steps < result.planned_steps and not result.stopped_early:  # train() refuses this too
            raise train.IncompleteTraining(f"training made {result.steps} of its {result.planned_steps} planned "
                                           "steps: no model is kept")
        flush()
        submit(draw_curve, result.history)
        weights = f"{layout.model_files(run_id)}/weights.safetensors"
        ctx.store.write_bytes(weights, result.weights)
    finally:
        tracker.shutdown(wait=True)
    for f in sent:
        f.result()
    summary = {"train_seconds": result.seconds, "train_steps": result.steps,
               "train_steps_planned": result.planned_steps}
    if result.best_epoch is not None:
        summary.update(best_epoch=result.best_epoch, best_val_epoch_dice=result.best_metric,
                       stopped_early=float(result.stopped_early))
    registry.log_metrics(ctx.tracking_uri, run_id, summary)
    checkpoints.clear()  # the weights are kept; the run finished, its checkpoints are no longer needed
    return TrainOutcome(weights, model_config(spec), result.history, result.steps, result.seconds,
                        result.resumed_from, curve, result.best_epoch, result.best_metric, result.stopped_early,
                        result.planned_steps)


def check_labels(ctx: Context, sides: list[train.StoreCases], classes: int) -> None:
    """Refuse (``label-values``) cases whose labels hold values the network cannot predict, before a step is
    trained: the audit log records the cases and their values, and the error names them; nothing is clamped.
    The ledger marks objects at ingestion only, so the cases are refused here, not quarantined there."""
    bad: dict[str, list[int]] = {}
    for side in sides:
        bad.update(train.label_problems(side.label_values(), classes))
    if bad:
        audit.append(ctx.db, "data.refused", "voxelflow", pipeline=ctx.pipeline, stage="train", reason="label-values",
                     out_channels=classes, cases={cid: vals for cid, vals in sorted(bad.items())})
        raise train.label_values_error(bad, classes)


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
        if awaiting:  # the lifecycle pauses for a person's answer (voxelflow.release.approval.answer_stage)
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


@dataclass
class Deployment:
    endpoint: str
    model_version: str
    case: str
    dice: float
    latency_s: float
    # True for the local smoke test: its endpoint served one request and stopped with the stage (`voxelflow
    # serve` is what stays up); False for a target that keeps running (kubernetes)
    temporary: bool = False


def deploy_stage(spec: DeploySpec, model_name: str, ctx: Context, case_id: str) -> Deployment:
    """Serve the champion on loopback and segment one held-out case over HTTP (the smoke test).

    ``target: kubernetes`` applies the rendered manifests to the configured cluster instead, and
    fails plainly when no cluster is configured.
    """
    import time

    if spec.target == "kubernetes":
        from voxelflow.serving import k8s_deploy

        applied = k8s_deploy.apply(k8s_deploy.render_for(ctx.pipeline, model_name, spec))
        version = registry.alias_version(ctx.tracking_uri, model_name) or ""
        audit.append(ctx.db, "service.deployed", "voxelflow", model=model_name, version=version,
                     target="kubernetes", objects=applied)
        return Deployment(f"kubernetes:{spec.kubernetes.namespace}/{ctx.pipeline}-inference", version, case_id,
                          float("nan"), 0.0)

    import httpx

    from voxelflow.serving.serve import NIFTI, KeyStore, ModelHolder, Server, create_app, decode_volume, nifti_gz

    keys = KeyStore(ctx.db)
    case = ingest.load_case(ctx.layout.raw, case_id)
    key = keys.create("lifecycle-smoke-test", ["predict"])
    try:  # the temporary key never outlives the smoke test, whatever fails
        with tempfile.TemporaryDirectory(prefix="voxelflow-serve-") as cache:
            holder = ModelHolder(lambda: registry.load_segmenter(ctx.tracking_uri, model_name, Path(cache)))
            holder.reload()
            app = create_app(holder, keys, db=ctx.db)
            with Server(app, ctx.settings.serve_host, 0) as server:
                audit.append(ctx.db, "service.deployed", "voxelflow", model=model_name,
                             version=holder.version, endpoint=server.url, temporary=True,
                             note="smoke test: the endpoint stops when the deploy stage ends")
                start = time.perf_counter()
                resp = httpx.post(f"{server.url}/v1/segment", content=nifti_gz(case["image"], case["affine"]),
                                  headers={"X-API-Key": key, "Content-Type": NIFTI}, timeout=120)
                latency = time.perf_counter() - start
    finally:
        keys.revoke(key)
    if resp.status_code != 200:
        raise RuntimeError(f"smoke test failed: HTTP {resp.status_code}: {resp.text[:300]}")
    mask, _, _ = decode_volume(resp.content, resp.headers.get("content-type", ""))
    score = evaluate.dice(mask, case["label"], max(2, int(max(mask.max(), case["label"].max())) + 1))
    return Deployment(server.url, resp.headers["X-Model-Version"], case_id, score, latency, temporary=True)


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
                  f"{result.ingest['already_seen']} objects already in the ledger)"),
        ("preprocessed", f"{result.preprocess['processed']} new, {result.preprocess['skipped']} reused, "
                         f"{len(result.preprocess['failed'])} failed"),
        ("training", f"{result.train['steps']} steps in {result.train['seconds']} s"),
        *[(f"test {k}", f"{v:.4f}") for k, v in result.metrics.items()],
        ("model version", f"{name} v{p['version']} ({'promoted to champion' if p['promoted'] else 'not promoted'})"),
        ("gates", "; ".join(p["reasons"])),
        ("MLflow run", f"`{result.run_id}`"),
    ]
    if d:
        stopped = " - temporary smoke-test endpoint, stopped with the stage" if d.get("temporary") else ""
        rows += [("endpoint", f"{d['endpoint']}/v1/segment (v{d['model_version']}){stopped}"),
                 ("HTTP prediction dice", f"{d['dice']:.4f} on {d['case']}")]
    lines = [f"# voxelflow lifecycle: {name}", "", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]
    return "\n".join(lines + steps_markdown(result.steps)) + "\n"


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


def run(spec: PipelineSpec, settings: Settings) -> LifecycleResult:
    """The whole lifecycle with no orchestrator: the spec's graph (:mod:`voxelflow.stages`) run here, the
    baseline the flow is measured against."""
    from voxelflow.stages.execute import Runner, execute

    runner = Runner(spec, Context(settings, spec.name))
    try:
        return execute(spec, runner)
    finally:
        runner.close()


@contextlib.contextmanager
def closing_run(ctx: Context, run_id: str) -> Iterator[None]:
    """End the lifecycle's MLflow run with how the lifecycle ended: ``FINISHED`` only when the block completes,
    ``FAILED`` when it raises (``KILLED`` when interrupted or cancelled); the error leaves with its credentials
    masked. A failure to record the status is logged and never hides the lifecycle's own error."""
    status = "FAILED"
    try:
        yield
        status = "FINISHED"
    except Exception as exc:
        redact.scrub(exc)
        raise
    except BaseException:
        status = "KILLED"
        raise
    finally:
        try:
            registry.end_run(ctx.tracking_uri, run_id, status)
        except Exception as exc:  # noqa: BLE001 - the lifecycle's outcome stands; the run's status is secondary
            logging.getLogger(__name__).warning("could not mark MLflow run %s %s: %s", run_id, status,
                                                redact.redact_exc(exc))
