"""Training: the spec's MONAI network on the preprocessed store, mixed precision, atomic checkpoints.

Cases keep their own shapes. :class:`StoreCases` holds as many as fit a memory budget (on the
GPU when training runs there, as MONAI's fast-training guide does) and reads the rest from the
store each time they are drawn; ``train.augment`` (random MONAI transforms, patch samplers among
them) runs as each case is drawn, in DataLoader workers or a thread-buffered loader, after the case
is padded to at least the patch size (as nnU-Net does: the image with its own minimum, the label
with background), so a case shallower than the patch trains too. A case that cannot be drawn fails
the training with its id and the transform that raised, and a training that made fewer steps than
it planned is an error, never a shorter training. Every
``val_every`` epochs a sliding-window validation scores the network; the best one's weights
are what training returns, and ``patience`` stops a run that no longer improves.

``train.max_seconds`` is a time budget (Lightning's ``max_time``): at the end of each epoch, training
stops when one more epoch would pass it, an epoch taken as the mean training time of an epoch so far
plus the mean validation time (a validation is due after it, on schedule or because it would be the
last; before any validation, one is taken as long as an epoch). The epoch where it stops is validated if it was not, so the weights returned are the best of
all the training done, and checkpointed; the result says it stopped for time. At least one epoch is
trained; a resumed run goes on with the time its checkpoint had used, and a run stopped for time
does not train on when retried.

A retry resumes from the newest checkpoint: the data order is a pure function of the seed and
the epoch, each case's augmentation one of the seed, the epoch and the case, and the torch RNG
is checkpointed, so a resumed run sees the same batches and ends with the same weights as an
uninterrupted one: bit for bit on the CPU and, with ``train.deterministic``, on CUDA; to float
tolerance on CUDA without it (cuDNN's default algorithms and TF32 convolutions).

The cases and their loaders are in :mod:`voxelflow.learn.cases`, the checkpoints in
:mod:`voxelflow.learn.checkpoints`, the processes of a several-device training in :mod:`voxelflow.learn.ddp`;
the names other modules import from here are re-exported.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from voxelflow.learn import devices
from voxelflow.learn.cases import (  # noqa: F401 - re-exported: imported from here across the project
    ArrayCases,
    DrawError,
    LabelValuesError,
    StepBatches,
    StoreCases,
    ThreadLoader,
    TrainingSet,
    build_augment,
    collate,
    epoch_order,
    label_problems,
    label_values_error,
    make_loader,
    pad_to_patch,
    present_values,
)
from voxelflow.learn.checkpoints import Checkpoints, load_scaler, rng_state, set_rng_state
from voxelflow.learn.ddp import (  # noqa: F401 - re-exported
    SETUP_TIMEOUT_S,
    RankFailed,
    join_group,
    leave_group,
    run_ranks,
    sync_batch_norms,
)
from voxelflow.spec.config import TrainSpec, resolve_monai

log = logging.getLogger(__name__)


def build_network(network: dict[str, dict[str, Any]]):
    (name, kwargs), = network.items()
    return resolve_monai("monai.networks.nets", name, "network")(**kwargs)


def for_training(net, dev, world: int = 1):
    """``net`` on ``dev``, laid out for training there. On a CPU its 5-D weights (3-D convolutions) go
    channels-last (NDHWC), where oneDNN's convolutions train faster than in the default NCDHW: a step of
    the quality benchmark's UNet (16-256 channels, batch norm, 8 patches of 64^3, 2 threads) 0.78 against
    1.12 s, of SegResNet 3.2 against 4.6 s, the demo's small UNet 0.023 against 0.039 s, the same losses
    to 1e-4. Inference is no faster that way (measured alike), so a loaded model keeps the default
    layout, and so do a GPU and a DistributedDataParallel group (``world`` above one), where it is not
    measured (DDP's gradient buckets warn of a stride mismatch on single-channel weights). Weights and
    checkpoints load into either layout; the model's weights are saved contiguous (:func:`state_dict_bytes`)."""
    import torch

    net = net.to(dev)
    return net.to(memory_format=torch.channels_last_3d) if dev.type == "cpu" and world == 1 else net


def build_loss(loss: dict[str, dict[str, Any]]):
    (name, kwargs), = loss.items()
    return resolve_monai("monai.losses", name, "loss")(**kwargs)


def build_optimizer(optimizer: dict[str, dict[str, Any]], params, learning_rate: float):
    """The spec's ``torch.optim`` optimizer; ``lr`` defaults to ``train.learning_rate``."""
    import torch

    (name, kwargs), = optimizer.items()
    return getattr(torch.optim, name)(params, **{"lr": learning_rate, **kwargs})


def build_scheduler(scheduler: dict[str, dict[str, Any]] | None, opt):
    """The spec's LR scheduler (stepped once per epoch), or None."""
    import torch

    if scheduler is None:
        return None
    (name, kwargs), = scheduler.items()
    return getattr(torch.optim.lr_scheduler, name)(opt, **kwargs)


def device_for(prefer: str | None = None):
    import torch

    if prefer:
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_precision(precision: str, device) -> str:
    """``auto``: bf16-mixed on a GPU with native bf16 (fp16-mixed with a GradScaler on one without:
    emulation does not count), fp32 on a CPU, where autocast's bf16 convolutions are emulated
    (measured here: a 3-D UNet step 10x slower than fp32). See :func:`voxelflow.learn.devices.precision`."""
    native = devices.bf16_native() if device.type == "cuda" else False
    return devices.precision(precision, device.type, native)


def autocast_for(precision: str, device):
    import torch

    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class IncompleteTraining(RuntimeError):
    """Training made fewer steps than it planned (and was not stopped by ``patience``)."""


@dataclass
class TrainResult:
    weights: bytes
    history: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    planned_steps: int = 0  # epochs x steps an epoch; fewer steps only when patience stopped the run
    resumed_from: int | None = None
    seconds: float = 0.0
    device: str = "cpu"
    best_epoch: int | None = None  # the validation whose weights these are (None: no validation ran)
    best_metric: float | None = None
    stopped_early: bool = False  # patience stopped it before the last epoch
    determinism: str = ""  # what a resume of it promises (voxelflow.learn.devices.determinism)
    stopped_for_time: bool = False  # train.max_seconds stopped it before the last epoch


@dataclass
class Validation:
    """Sliding-window validation during training on labelled, preprocessed cases."""

    cases: Any
    roi_size: tuple[int, ...]
    n_classes: int = 2
    overlap: float = 0.25
    sw_batch_size: int = 4
    mode: str = "constant"
    every: int = 1
    patience: int | None = None

    def run(self, net, device, precision: str) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """Mean and per-class Dice over the cases, and the first case's image, label and prediction."""
        import torch
        from monai.inferers import SlidingWindowInferer

        from voxelflow.learn.evaluate import dice_per_class
        from voxelflow.learn.labels import argmax_channels

        inferer = SlidingWindowInferer(roi_size=self.roi_size, sw_batch_size=self.sw_batch_size,
                                       overlap=self.overlap, mode=self.mode)
        per_class, sample = [], {}
        was_training = net.training
        net.eval()
        try:
            for i in range(len(self.cases)):
                item = self.cases[i]
                image = torch.as_tensor(item["image"]).float()[None].to(device)
                with torch.no_grad(), autocast_for(precision, device):
                    logits = inferer(image, net)
                pred = argmax_channels(logits[0].float().cpu(), dim=0).numpy()
                label = np.asarray(torch.as_tensor(item["label"]).cpu())[0]
                per_class.append(dice_per_class(pred, label, self.n_classes))
                if i == 0:
                    sample = {"image": np.asarray(torch.as_tensor(item["image"]).cpu())[0], "label": label,
                              "pred": pred}
        finally:
            net.train(was_training)
        classes = np.mean(np.asarray(per_class, dtype=np.float64), axis=0)
        metrics = {"val_epoch_dice": float(np.mean(classes))}
        metrics.update({f"val_epoch_dice_{c}": float(v) for c, v in enumerate(classes, start=1)})
        return metrics, sample


def train(
    spec: TrainSpec,
    cases,
    checkpoints: Checkpoints,
    validation: Validation | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    on_validation: Callable[[int, dict[str, float], dict[str, np.ndarray]], None] | None = None,
    device: str | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> TrainResult:
    """Train ``spec.network`` on ``cases`` (:class:`StoreCases`, :class:`ArrayCases`); returns the weights
    of the best validation (the last epoch's without ``validation``).

    With ``train.devices`` above one, this process is rank 0 of a DistributedDataParallel group
    (NCCL on GPUs, gloo on CPUs) and starts the other ranks itself; each step's batch is split
    between the ranks and their gradients averaged, so the steps are those of one process with the
    whole batch. Rank 0 alone validates, checkpoints, calls back and decides, with ``train.max_seconds``,
    when time is up (``clock``: the seconds it measures, read at the epochs' ends).
    """
    where = devices.placement(spec.devices, devices.visible_gpus(), spec.batch_size, device)
    if spec.deterministic and where.kind == "cuda":
        devices.cublas_workspace()  # before this process's first matmul; the ranks started below inherit it
    log.info("training on %s (train.devices: %s); a resume matches %s", where.describe(), spec.devices,
             devices.determinism(spec.deterministic, where.kind))
    device, world = device or where.device, where.processes  # devices: cpu is the CPU, GPUs or not
    if world == 1:
        return _train(spec, cases, checkpoints, validation, on_epoch, on_validation, device, clock=clock)
    # the other ranks run _train too: it is pickled by name, so it stays a function of this module
    return run_ranks(world, _train, (spec, cases, checkpoints, None, None, None, device),
                     lambda group: _train(spec, cases, checkpoints, validation, on_epoch, on_validation, device,
                                          group, clock))


def _train(spec, cases, checkpoints, validation, on_epoch, on_validation, device, group=None,
           clock: Callable[[], float] = time.perf_counter) -> TrainResult:
    rank, world, port = group or (0, 1, 0)
    if len(cases) == 0:
        raise ValueError("no training cases: ingest data first")
    dev = device_for(device)
    steps = None
    if world > 1:
        dev, steps = join_group(rank, world, port, dev, spec.collective_timeout_s)
    try:
        with devices.deterministic_cuda(spec.deterministic and dev.type == "cuda"):
            return _loop(spec, cases, checkpoints, validation, on_epoch, on_validation, dev, rank, world, steps,
                         clock)
    finally:
        if world > 1:
            leave_group()


def _loop(spec, cases, checkpoints, validation, on_epoch, on_validation, dev, rank: int, world: int,
          steps=None, clock: Callable[[], float] = time.perf_counter) -> TrainResult:
    import torch
    import torch.distributed as dist

    precision = resolve_precision(spec.precision, dev)
    if precision == "fp16-mixed" and dev.type != "cuda":
        raise ValueError(f"precision fp16-mixed needs a CUDA device, and training runs on {dev.type}: "
                         "use bf16-mixed or fp32 there")
    if not spec.augment and spec.batch_size > 1 and len(set(cases.shapes())) > 1:
        raise ValueError(f"the training cases differ in shape ({len(set(cases.shapes()))} shapes) and "
                         "train.augment samples no patches: add RandCropByPosNegLabeld or RandSpatialCropSamplesd, "
                         "fix the size in preprocessing, or use batch_size 1")
    if hasattr(cases, "to") and not (spec.workers > 0 and dev.type == "cuda"):
        cases.to(dev)  # with train.workers the cases stay on the CPU side, where worker processes draw them
    torch.manual_seed(spec.seed)
    model = for_training(build_network(spec.network), dev, world)
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = sync_batch_norms(model, dev.type)
        # every rank has built its network (on the group's timeout) before the steps' short one counts
        dist.barrier(device_ids=[dev.index] if dev.type == "cuda" else None)
        net = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                      process_group=steps)
    loss_fn = build_loss(spec.loss)
    opt = build_optimizer(spec.optimizer, net.parameters(), spec.learning_rate)
    sched = build_scheduler(spec.scheduler, opt)
    use_scaler = precision == "fp16-mixed" and dev.type == "cuda"
    scaler = torch.amp.GradScaler(dev.type, enabled=use_scaler)
    n = len(cases)
    batches_of = StepBatches(n, spec.batch_size, spec.seed, 0, 0, rank, world)
    steps_per_epoch = batches_of.per_epoch
    if steps_per_epoch == 0:
        raise ValueError(f"{n} training cases make no full batch of {spec.batch_size} for {world} processes")

    step, history, resumed, running = 0, [], None, []
    best = {"metric": None, "epoch": None, "step": None, "stale": 0}
    # train.max_seconds: the seconds used before this process (a resume), each epoch's training and validation
    budget = {"used": 0.0, "epochs": [], "validations": [], "stopped": False}
    state = checkpoints.load_latest(dev)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        load_scaler(scaler, state.get("scaler"))
        if sched is not None:
            sched.load_state_dict(state["scheduler"])
        step, resumed = int(state["step"]), int(state["step"])
        history = [dict(h) for h in state["history"]]
        running = [float(v) for v in state.get("running", [])]
        best = dict(state.get("best", best))
        budget.update(state.get("budget", {}))

    def save(at: int) -> None:
        if rank != 0:
            return
        checkpoints.save(at, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                              "scaler": scaler.state_dict(),
                              "scheduler": sched.state_dict() if sched is not None else None,
                              "step": at, "history": history, "running": running, "best": dict(best),
                              "rng": rng_state(dev),
                              **({"budget": {**budget, "used": budget["used"] + clock() - began}}
                                 if spec.max_seconds is not None else {})})

    start, began = time.perf_counter(), clock()
    net.train()
    total = spec.epochs * steps_per_epoch
    dataset = TrainingSet(cases, spec.augment, spec.seed, spec.patch_size)
    loader = make_loader(dataset, StepBatches(n, spec.batch_size, spec.seed, step, total, rank, world), spec.workers,
                         dev)
    if state is not None and "rng" in state:
        set_rng_state(state["rng"], dev)
    batches = iter(loader)
    stopped = validation is not None and validation.patience is not None and best["stale"] >= validation.patience
    timed_out = bool(budget["stopped"])  # a run stopped for time does not train on when retried

    def validate(epoch: int, metrics: dict[str, float]) -> None:
        nonlocal stopped
        at = clock()
        scores, sample = validation.run(model, dev, precision)
        metrics.update(scores)
        if best["metric"] is None or scores["val_epoch_dice"] > best["metric"]:
            best.update(metric=scores["val_epoch_dice"], epoch=epoch, step=step, stale=0)
            checkpoints.save_best(state_dict_bytes(model))
        else:
            best["stale"] += 1
        if on_validation:
            on_validation(epoch, scores, sample)
        stopped = validation.patience is not None and best["stale"] >= validation.patience
        budget["validations"].append(clock() - at)

    def out_of_time() -> bool:
        """Whether one more epoch, and the validation due after it, would pass ``train.max_seconds``."""
        train_s = float(np.mean(budget["epochs"]))
        val_s = 0.0 if validation is None else float(np.mean(budget["validations"] or [train_s]))
        return budget["used"] + clock() - began + train_s + val_s > spec.max_seconds

    samples, step_start, epoch_start = 0, time.perf_counter(), clock()
    for x, y in ([] if stopped or timed_out else batches):
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        with autocast_for(precision, dev):
            loss = loss_fn(net(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        value = loss.detach().float()
        if world > 1:  # the step's loss over the whole batch: the mean of the ranks' equal shares
            dist.all_reduce(value, group=steps)
            value /= world
        running.append(float(value))
        samples += len(x) * world
        step += 1
        if step % steps_per_epoch == 0:
            epoch = step // steps_per_epoch - 1
            seconds = time.perf_counter() - step_start
            metrics = {"train_loss": float(np.mean(running)), "lr": float(opt.param_groups[0]["lr"]),
                       "samples_per_s": samples / seconds if seconds > 0 else 0.0}
            if sched is not None:
                sched.step()
            budget["epochs"].append(clock() - epoch_start)
            validated = validation is not None and ((epoch + 1) % validation.every == 0 or step == total)
            if validated:
                validate(epoch, metrics)
            if rank == 0 and spec.max_seconds is not None and not stopped and step < total and out_of_time():
                timed_out = budget["stopped"] = True
                if validation is not None and not validated:  # the best weights consider the last training
                    validate(epoch, metrics)
            if world > 1:  # rank 0 alone validates (the others wait here, on the group's timeout): whether to stop
                flag = torch.tensor([float(stopped or timed_out)], device=dev)
                dist.broadcast(flag, src=0)
                if rank != 0:
                    stopped = bool(flag.item())
            history.append({"epoch": epoch, **{k: v for k, v in metrics.items() if k != "samples_per_s"}})
            running, samples, step_start = [], 0, time.perf_counter()
            if on_epoch:
                on_epoch(epoch, metrics)
            epoch_start = clock()  # what the callback took counts toward the next epoch
        if step % spec.checkpoint_every_steps == 0 or step == total or stopped or timed_out:
            save(step)
        if stopped or timed_out:
            break
    if step < total and not stopped and not timed_out:
        raise IncompleteTraining(f"training ended after {step} of its {total} planned steps ({spec.epochs} epochs of "
                                 f"{steps_per_epoch}) with no error from its loader: no model comes of it")
    weights = checkpoints.load_best() if best["metric"] is not None else None
    return TrainResult(
        weights=weights if weights is not None else state_dict_bytes(model),
        history=history,
        steps=step,
        planned_steps=total,
        resumed_from=resumed,
        seconds=time.perf_counter() - start,
        device=str(dev),
        best_epoch=best["epoch"],
        best_metric=best["metric"],
        stopped_early=bool(stopped) and not timed_out and step < total,  # time decides first: one reason
        determinism=devices.determinism(spec.deterministic, dev.type),
        stopped_for_time=timed_out and step < total,
    )


def state_dict_bytes(net) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()})


def load_network(network: dict[str, dict[str, Any]], weights: bytes, device: str | None = None):
    """Rebuild a network from its spec and safetensors weights (no pickle)."""
    from safetensors.torch import load

    net = build_network(network)
    net.load_state_dict(load(weights))
    return net.to(device_for(device)).eval()
