"""The train stage: the network trained on the preprocessed store, validated, tracked in MLflow; what the
registered model needs besides its weights."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from voxelflow.core import audit
from voxelflow.data import preprocess
from voxelflow.learn import devices, report, train
from voxelflow.release import registry
from voxelflow.spec.config import PipelineSpec
from voxelflow.stages.context import Context


def n_classes(network: dict[str, dict[str, Any]]) -> int:
    """Classes the network predicts, background included (its ``out_channels``)."""
    args = next(iter(network.values()))
    return int(args.get("out_channels", 2))


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
    planned_steps: int = 0  # epochs x steps an epoch: steps falls short of it only when patience or time stopped it
    stopped_for_time: bool = False  # train.max_seconds ended it before the last epoch (not patience)


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
        "labels": {str(k): v.model_dump(mode="json", exclude_none=True) for k, v in sorted(spec.labels.items())},
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
        if result.steps < result.planned_steps and not (result.stopped_early or result.stopped_for_time):
            # train() refuses this too
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
    if tspec.max_seconds is not None:
        summary["stopped_for_time"] = float(result.stopped_for_time)
    registry.log_metrics(ctx.tracking_uri, run_id, summary)
    checkpoints.clear()  # the weights are kept; the run finished, its checkpoints are no longer needed
    return TrainOutcome(weights, model_config(spec), result.history, result.steps, result.seconds,
                        result.resumed_from, curve, result.best_epoch, result.best_metric, result.stopped_early,
                        result.planned_steps, result.stopped_for_time)


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
