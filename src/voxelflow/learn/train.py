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

A retry resumes from the newest checkpoint: the data order is a pure function of the seed and
the epoch, each case's augmentation one of the seed, the epoch and the case, and the torch RNG
is checkpointed, so a resumed run sees the same batches and ends with the same weights as an
uninterrupted one: bit for bit on the CPU and, with ``train.deterministic``, on CUDA; to float
tolerance on CUDA without it (cuDNN's default algorithms and TF32 convolutions).
"""

from __future__ import annotations

import io
import logging
import os
import queue
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import numpy as np

from voxelflow.core.storage import Store
from voxelflow.learn import devices
from voxelflow.spec.config import TrainSpec, resolve_monai

log = logging.getLogger(__name__)


def build_network(network: dict[str, dict[str, Any]]):
    (name, kwargs), = network.items()
    return resolve_monai("monai.networks.nets", name, "network")(**kwargs)


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


class DrawError(ValueError):
    """A training case could not be drawn: the message names the case and the transform that raised."""


class IncompleteTraining(RuntimeError):
    """Training made fewer steps than it planned (and was not stopped by ``patience``)."""


class LabelValuesError(ValueError):
    """Label values outside ``0..out_channels-1`` (reason ``label-values``); ``cases`` maps case to values."""

    def __init__(self, message: str, cases: dict[str, list[int]] | None = None) -> None:
        super().__init__(message)
        self.cases = dict(cases or {})


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
    stopped_early: bool = False
    determinism: str = ""  # what a resume of it promises (voxelflow.learn.devices.determinism)


@dataclass(frozen=True)
class Checkpoints:
    """Checkpoints under a store prefix: ``step-00000050.pt``; each written atomically, the last two kept."""

    store: Store
    prefix: str
    keep: int = 2

    def save_best(self, weights: bytes) -> None:
        self.store.write_bytes(f"{self.prefix}/best.safetensors", weights)

    def load_best(self) -> bytes | None:
        key = f"{self.prefix}/best.safetensors"
        return self.store.read_bytes(key) if self.store.exists(key) else None

    def steps(self) -> list[str]:
        return [n for n in self.store.list(self.prefix) if n.startswith("step-") and n.endswith(".pt")]

    def save(self, step: int, state: dict[str, Any]) -> str:
        import torch

        buf = io.BytesIO()
        torch.save(state, buf)
        key = f"{self.prefix}/step-{step:08d}.pt"
        self.store.write_bytes(key, buf.getvalue())
        for old in self.steps()[:-self.keep]:
            self.store.remove(f"{self.prefix}/{old}")
        return key

    def load_latest(self, device) -> dict[str, Any] | None:
        """The newest checkpoint that loads; a torn or corrupt newest one falls back to the one before."""
        import torch

        for name in reversed(self.steps()):
            try:
                return torch.load(io.BytesIO(self.store.read_bytes(f"{self.prefix}/{name}")), map_location=device,
                                  weights_only=True)
            except Exception:  # noqa: BLE001 - unreadable checkpoint: try the previous one
                continue
        return None

    def clear(self) -> None:
        self.store.remove(self.prefix)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


class ArrayCases:
    """Cases already in memory: ``images`` (N, C, *spatial) and ``labels`` (N, 1, *spatial)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[i], "label": self.labels[i]}

    def shapes(self) -> list[tuple[int, ...]]:
        return [tuple(self.images.shape[1:])] * len(self)


class StoreCases:
    """Preprocessed cases read from a :class:`~voxelflow.core.storage.CaseStore`, each in its own shape.

    The first cases whose arrays fit ``cache_bytes`` are read once (in parallel) and held, as
    torch tensors on ``device``; the others are read from the store on every access, so a data
    set larger than memory streams instead of failing.
    """

    def __init__(self, store, case_ids: list[str], cache_bytes: int = 0, device: str = "cpu") -> None:
        from concurrent.futures import ThreadPoolExecutor

        from voxelflow.data.preprocess import open_case

        self.store, self.ids = store, list(case_ids)
        self._shapes, sizes = [], []
        for cid in self.ids:
            ds = open_case(store, cid)
            if "label" not in ds:
                raise ValueError(f"case {cid} has no label: training and validation need labelled cases")
            self._shapes.append(tuple(ds["image"].shape))
            sizes.append(ds["image"].nbytes + ds["label"].nbytes)
        chosen, used = [], 0
        for i, size in enumerate(sizes):
            if used + size <= cache_bytes:
                chosen.append(i)
                used += size
        self.cached_bytes, self.budget = used, cache_bytes
        self.device = device
        with ThreadPoolExecutor(4) as pool:  # Zarr reads release the GIL
            loaded = pool.map(self._read, chosen)
            self._cache = {i: self._tensors(item) for i, item in zip(chosen, loaded)}

    def __reduce__(self):  # another training process reads its own copy from the store
        return (StoreCases, (self.store, self.ids, self.budget, "cpu"))

    def to(self, device) -> None:
        """Move the cached cases to ``device`` (a rank's own GPU)."""
        self.device = str(device)
        self._cache = {i: {k: v.to(device) for k, v in item.items()} for i, item in self._cache.items()}

    def _read(self, i: int) -> dict[str, Any]:
        from voxelflow.data.preprocess import load_case_arrays

        case = load_case_arrays(self.store, self.ids[i])
        return {"image": case["image"], "label": case["label"]}

    def _tensors(self, item: dict[str, Any]) -> dict[str, Any]:
        import torch

        return {k: torch.as_tensor(v).to(self.device) for k, v in item.items()}

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self._cache[i] if i in self._cache else self._read(i)

    @property
    def cached(self) -> int:
        return len(self._cache)

    def case_id(self, i: int) -> str:
        return self.ids[i]

    def label_values(self) -> dict[str, list[int]]:
        """The values each case's label holds (cached labels from memory, the others read from the store)."""
        from voxelflow.data.preprocess import open_case

        def values(i: int) -> list[int]:
            label = self._cache[i]["label"] if i in self._cache else open_case(self.store, self.ids[i])["label"].values
            return present_values(label)

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(4) as pool:
            return dict(zip(self.ids, pool.map(values, range(len(self.ids)))))

    def shapes(self) -> list[tuple[int, ...]]:
        return list(self._shapes)


def present_values(label: Any) -> list[int]:
    """The distinct values of a label array or tensor, ascending."""
    import torch

    if isinstance(label, torch.Tensor):
        return [int(v) for v in torch.unique(label).tolist()]
    label = np.asarray(label)
    if label.dtype == np.uint8:  # what preprocessing stores: a histogram is much faster than a sort
        return [int(v) for v in np.flatnonzero(np.bincount(label.ravel(), minlength=1))]
    return [int(v) for v in np.unique(label)]


def label_problems(values: dict[str, list[int]], n_classes: int) -> dict[str, list[int]]:
    """Each case whose label holds values outside ``0..n_classes-1``, with those values."""
    bad = {cid: [v for v in vals if not 0 <= v < n_classes] for cid, vals in values.items()}
    return {cid: vals for cid, vals in bad.items() if vals}


def label_values_error(bad: dict[str, list[int]], n_classes: int) -> LabelValuesError:
    listed = "; ".join(f"{cid}: {vals}" for cid, vals in sorted(bad.items()))
    return LabelValuesError(
        f"label-values: {len(bad)} case(s) hold label values outside 0..{n_classes - 1} (the network's "
        f"out_channels is {n_classes}): {listed}. Fix these labels, or set out_channels to the number of "
        "classes; values are never clamped", bad)


def pad_to_patch(item: dict[str, Any], size: tuple[int, ...]) -> dict[str, Any]:
    """Pad ``image`` and ``label`` (channel first) to at least ``size`` on every side, centred: the image
    with its own minimum, the label with 0 (background). A case as large as the patch comes back as it was."""
    import torch

    shape = tuple(item["image"].shape[1:])
    need = [max(0, int(p) - s) for p, s in zip(size, shape)]
    if not any(need):
        return item
    pads: list[int] = []
    for n in reversed(need):  # torch's pad takes the last dimension first
        pads += [n // 2, n - n // 2]
    out = dict(item)
    for key in ("image", "label"):
        if key in item:
            t = torch.as_tensor(item[key])
            value = float(t.amin()) if key == "image" else 0.0
            out[key] = torch.nn.functional.pad(t, pads, mode="constant", value=value)
    return out


def build_augment(augment: list[dict[str, dict[str, Any]]]):
    """The spec's random transforms as one MONAI ``Compose`` (None when there are none)."""
    from voxelflow.data.preprocess import build_transforms

    return build_transforms(augment) if augment else None


class TrainingSet:
    """Draws ``(epoch, index)``: the case, padded to at least ``patch_size``, augmented with a random
    state that is a pure function of the seed, the epoch and the case, so any worker, and any rerun,
    draws the same patches. A failure raises :class:`DrawError` naming the case and the transform."""

    def __init__(self, cases, augment: list[dict[str, dict[str, Any]]], seed: int,
                 patch_size: tuple[int, ...] | None = None) -> None:
        self.cases, self.seed, self.patch_size = cases, seed, patch_size
        self.transform = build_augment(augment)

    def __len__(self) -> int:
        return len(self.cases)

    def set_random_state(self, seed: int | None = None, state: Any = None) -> TrainingSet:
        """MONAI's loaders seed what they find by walking a data set's attributes (into the store's file
        system, and round its cycles); here every draw is seeded by its key, so there is nothing to set."""
        return self

    def case_id(self, i: int) -> str:
        return self.cases.case_id(i) if hasattr(self.cases, "case_id") else f"#{i}"

    def __getitem__(self, key: tuple[int, int]) -> list[dict[str, Any]]:
        import torch

        epoch, i = key
        try:
            item = self.cases[i]
        except Exception as exc:
            exc.add_note(f"while reading training case {self.case_id(i)}")
            raise
        device = getattr(self.cases, "device", None)  # streamed cases join the cached ones on their device
        item = {k: torch.as_tensor(v, device=device) for k, v in item.items()}
        if self.patch_size is not None:
            item = self._step(partial(pad_to_patch, size=self.patch_size), item, i, "padding to the patch size")
        if self.transform is None:
            return [item]
        self.transform.set_random_state(seed=int(np.random.default_rng([self.seed, epoch, i]).integers(2**31)))
        out: Any = item
        for k, t in enumerate(self.transform.transforms):  # one at a time, to name the one that raises
            out = self._step(partial(self.transform, start=k, end=k + 1), out, i, type(t).__name__)
        return out if isinstance(out, list) else [out]

    def _step(self, fn: Callable[[Any], Any], data: Any, i: int, what: str) -> Any:
        try:
            return fn(data)
        except Exception as exc:
            cause: BaseException = exc
            while cause.__cause__ is not None:  # MONAI wraps the transform's error in "applying transform ..."
                cause = cause.__cause__
            shape = tuple(self.cases.shapes()[i]) if hasattr(self.cases, "shapes") else "?"
            raise DrawError(f"training case {self.case_id(i)} (shape {shape}): {what} raised "
                            f"{type(cause).__name__}: {cause}") from exc


class StepBatches:
    """The batch sampler: from ``start`` to ``total`` steps, each step's ``(epoch, index)`` keys.

    With ``world`` processes, as a ``DistributedSampler`` would, each rank takes every world-th key of
    the step's batch; an epoch is then its full batches only, so that no rank ever has nothing to do
    (the order changes every epoch, so the cases left over are different ones each time).
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int, total: int, rank: int = 0,
                 world: int = 1) -> None:
        self.n, self.batch_size, self.seed, self.start, self.total = n, batch_size, seed, start, total
        self.rank, self.world = rank, world
        self.per_epoch = -(-n // batch_size) if world == 1 else n // batch_size

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def __iter__(self):
        order, order_epoch = None, -1
        for step in range(self.start, self.total):
            epoch, offset = divmod(step, self.per_epoch)
            if epoch != order_epoch:
                order, order_epoch = epoch_order(self.n, self.seed, epoch), epoch
            keys = order[offset * self.batch_size: (offset + 1) * self.batch_size]
            yield [(epoch, int(i)) for i in keys[self.rank::self.world]]


def _plain(x):
    import torch

    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


def collate(batch: list[list[dict[str, Any]]]):
    """Flatten each case's samples (patch samplers give several) and stack images and labels."""
    import torch

    samples = [s for item in batch for s in item]
    shapes = {tuple(s["image"].shape[1:]) for s in samples} | {tuple(s["label"].shape[1:]) for s in samples}
    if len(shapes) > 1:
        raise ValueError(f"a batch holds samples of different shapes {sorted(shapes)[:3]}: sample patches of one "
                         "size in train.augment (RandCropByPosNegLabeld, RandSpatialCropSamplesd), fix the size in "
                         "preprocessing, or use batch_size 1")
    images = torch.stack([_plain(s["image"]).float() for s in samples])
    labels = torch.stack([_plain(s["label"]).float() for s in samples])
    return images, labels


class ThreadLoader:
    """Batches made ahead by one background thread, as MONAI's ThreadDataLoader makes them (no processes:
    what MONAI's fast-training guide uses with data on the GPU), except that an exception in the thread
    is raised in the training loop: MONAI's thread dies alone and its loader just ends early."""

    def __init__(self, loader, buffer_size: int = 2) -> None:
        self.loader, self.buffer_size = loader, buffer_size

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        buffer: queue.Queue = queue.Queue(self.buffer_size)
        stop, end = threading.Event(), object()

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    buffer.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def fill() -> None:
            try:
                for batch in self.loader:
                    if not put((batch, None)):
                        return
            except BaseException as exc:  # noqa: BLE001 - handed to the training loop, which raises it
                put((end, exc))
                return
            put((end, None))

        thread = threading.Thread(target=fill, name="voxelflow-loader", daemon=True)
        thread.start()
        try:
            while True:
                try:
                    batch, exc = buffer.get(timeout=1.0)
                except queue.Empty:
                    if not thread.is_alive() and buffer.empty():
                        raise RuntimeError("the training loader's thread ended without a last word") from None
                    continue
                if batch is end:
                    if exc is not None:
                        raise exc
                    return
                yield batch
        finally:
            stop.set()
            thread.join()


def make_loader(dataset: TrainingSet, batches: StepBatches, workers: int, device):
    """MONAI's DataLoader with worker processes (whose exceptions torch raises in this process), or a
    :class:`ThreadLoader` over one that loads in this process."""
    import torch
    from monai.data import DataLoader

    # a loader of its own generator: torch's global RNG (initial weights, dropout) is left to the network
    generator = torch.Generator().manual_seed(dataset.seed)
    if workers > 0:  # on a GPU too: the workers read and augment on the CPU and never touch CUDA; the
        # training thread moves each (pinned) batch to the device
        return DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                          persistent_workers=False, multiprocessing_context="fork", generator=generator,
                          pin_memory=device.type == "cuda")
    return ThreadLoader(DataLoader(dataset, batch_sampler=batches, num_workers=0, collate_fn=collate,
                                   generator=generator), buffer_size=2)


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
                pred = torch.argmax(logits.float(), dim=1)[0].to(torch.uint8).cpu().numpy()
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


def _rng_state(device) -> dict[str, Any]:
    import torch

    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device) -> None:
    import torch

    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def train(
    spec: TrainSpec,
    cases,
    checkpoints: Checkpoints,
    validation: Validation | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    on_validation: Callable[[int, dict[str, float], dict[str, np.ndarray]], None] | None = None,
    device: str | None = None,
) -> TrainResult:
    """Train ``spec.network`` on ``cases`` (:class:`StoreCases`, :class:`ArrayCases`); returns the weights
    of the best validation (the last epoch's without ``validation``).

    With ``train.devices`` above one, this process is rank 0 of a DistributedDataParallel group
    (NCCL on GPUs, gloo on CPUs) and starts the other ranks itself; each step's batch is split
    between the ranks and their gradients averaged, so the steps are those of one process with the
    whole batch. Rank 0 alone validates, checkpoints and calls back.
    """
    where = devices.placement(spec.devices, devices.visible_gpus(), spec.batch_size, device)
    if spec.deterministic and where.kind == "cuda":
        devices.cublas_workspace()  # before this process's first matmul; the ranks started below inherit it
    log.info("training on %s (train.devices: %s); a resume matches %s", where.describe(), spec.devices,
             devices.determinism(spec.deterministic, where.kind))
    device, world = device or where.device, where.processes  # devices: cpu is the CPU, GPUs or not
    if world == 1:
        return _train(spec, cases, checkpoints, validation, on_epoch, on_validation, device)
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:  # a free loopback port for the group's rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")  # never fork a process that holds threads or a CUDA context
    errors = ctx.SimpleQueue()
    ranks = [ctx.Process(target=_rank, args=(rank, world, port, spec, cases, checkpoints, device, errors),
                         daemon=True) for rank in range(1, world)]
    for proc in ranks:
        proc.start()
    supervisor = _Supervisor(ranks, errors)
    try:
        result = _train(spec, cases, checkpoints, validation, on_epoch, on_validation, device, (0, world, port))
    except BaseException as exc:
        dead = supervisor.failure(wait=10.0)  # a rank that died is why the collective failed: say which
        if dead:
            raise dead from exc
        raise
    finally:
        supervisor.stop()
        for proc in ranks:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    dead = supervisor.failure(wait=0.0)
    if dead:
        raise dead
    return result


class RankFailed(RuntimeError):
    """A training process other than rank 0 died: its error (or exit code) is the message. Worth a retry
    (from the newest checkpoint) when it was killed by a signal (a preempted or lost node), not when
    it raised: that error would come again."""

    def __init__(self, message: str, killed: bool = False):
        super().__init__(message)
        self.transient = killed


class _Supervisor:
    """Watches the other ranks from a thread of rank 0. When one dies (an exception, out of memory, a
    kill), the process group is aborted, so rank 0's pending collective fails at once instead of
    waiting for the collective timeout (NCCL would then kill the whole process, and Prefect's retry
    with it); the training then fails with that rank's error and a retry resumes from the newest
    checkpoint."""

    def __init__(self, ranks: list, errors):
        self.ranks, self.errors = ranks, errors
        self.messages: dict[int, str] = {}
        self.dead: RankFailed | None = None
        self._lock = threading.Lock()  # the watcher and rank 0's failure() both look
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="voxelflow-rank-supervisor", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            if self._check():
                _abort_group()
                return

    def _check(self) -> bool:
        with self._lock:
            return self._look()

    def _look(self) -> bool:
        if self.dead is not None:
            return True
        while not self.errors.empty():
            rank, message = self.errors.get()
            self.messages[rank] = message
        for rank, proc in enumerate(self.ranks, start=1):
            code = proc.exitcode
            if code not in (None, 0) or rank in self.messages:
                if code is None:
                    proc.join(timeout=5)  # it reported its error and is exiting
                    code = proc.exitcode
                killed = code is not None and code < 0
                how = (f"killed by signal {-code}" if killed else f"exit code {code}" if code is not None
                       else "raised, still exiting")
                self.dead = RankFailed(f"training process {rank} failed ({how}): "
                                       f"{self.messages.get(rank, 'no error reported')}", killed=killed)
                return True
        return False

    def failure(self, wait: float) -> RankFailed | None:
        """The first rank that died, waiting up to ``wait`` seconds for one to be seen dying."""
        deadline = time.monotonic() + wait
        while not self._check() and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.dead

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _abort_group() -> None:
    """Make collectives blocked in this process fail now (NCCL; gloo already fails on a lost peer)."""
    import torch.distributed as dist

    try:
        if dist.is_initialized() and dist.get_backend() == "nccl":
            from torch.distributed.distributed_c10d import _abort_process_group

            _abort_process_group()
    except Exception as exc:  # noqa: BLE001 - best effort: the collective timeout remains the bound
        log.warning("could not abort the process group (%s: %s)", type(exc).__name__, exc)


def sync_batch_norms(model, device_type: str):
    """Batch norms of a network trained in several processes compute their statistics over the whole
    batch (SyncBatchNorm; same parameters and buffers, so the weights load into the plain network):
    otherwise each process normalises by its own share of the batch. torch syncs them on GPUs only;
    on gloo processes on the CPU they stay per process, and the log says so."""
    import torch

    norms = (torch.nn.modules.batchnorm._BatchNorm,)
    if not any(isinstance(m, norms) for m in model.modules()):
        return model
    if device_type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    log.warning("the network has batch norms and trains in several CPU processes: their statistics are per "
                "process there (torch syncs batch norms on GPUs only); use instance norm or one process for "
                "the steps of one process with the whole batch")
    return model


def load_scaler(scaler, saved: dict | None) -> None:
    """Restore a GradScaler's state only when both sides have one: the precision may have changed
    between attempts (fp32 or bf16 keep a disabled scaler, whose state is empty; loading it into an
    enabled one raises, and an enabled one's state means nothing to a disabled one)."""
    if saved and scaler.is_enabled():
        scaler.load_state_dict(saved)


def _rank(rank: int, world: int, port: int, spec: TrainSpec, cases, checkpoints: Checkpoints,
          device: str | None, errors) -> None:
    """A training process other than rank 0; its error goes to rank 0's supervisor before it exits."""
    try:
        _train(spec, cases, checkpoints, None, None, None, device, (rank, world, port))
    except BaseException as exc:
        errors.put((rank, f"{type(exc).__name__}: {exc}"[:2000]))
        raise


#: the process group's own timeout: the rendezvous (each rank starts, reading its cache, before it joins)
#: and the other ranks' wait at the end of an epoch while rank 0 validates. The steps' collectives have
#: ``train.collective_timeout_s``.
SETUP_TIMEOUT_S = 1800


def _train(spec, cases, checkpoints, validation, on_epoch, on_validation, device, group=None) -> TrainResult:
    import datetime

    import torch
    import torch.distributed as dist

    rank, world, port = group or (0, 1, 0)
    if len(cases) == 0:
        raise ValueError("no training cases: ingest data first")
    dev = device_for(device)
    steps = None
    if world > 1:
        if dev.type == "cuda":
            dev = torch.device("cuda", rank)
            torch.cuda.set_device(dev)
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                rank=rank, world_size=world, timeout=datetime.timedelta(seconds=SETUP_TIMEOUT_S))
        # the steps' collectives in a group of their own, with the short timeout: a rank that stops taking
        # part (alive, so the supervisor sees nothing) fails the others within it instead of 30 minutes
        steps = dist.new_group(timeout=datetime.timedelta(seconds=spec.collective_timeout_s))
    try:
        with devices.deterministic_cuda(spec.deterministic and dev.type == "cuda"):
            return _loop(spec, cases, checkpoints, validation, on_epoch, on_validation, dev, rank, world, steps)
    finally:
        if world > 1:
            dist.destroy_process_group()


def _loop(spec, cases, checkpoints, validation, on_epoch, on_validation, dev, rank: int, world: int,
          steps=None) -> TrainResult:
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
    model = build_network(spec.network).to(dev)
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

    def save(at: int) -> None:
        if rank != 0:
            return
        checkpoints.save(at, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                              "scaler": scaler.state_dict(),
                              "scheduler": sched.state_dict() if sched is not None else None,
                              "step": at, "history": history, "running": running, "best": dict(best),
                              "rng": _rng_state(dev)})

    start = time.perf_counter()
    net.train()
    total = spec.epochs * steps_per_epoch
    dataset = TrainingSet(cases, spec.augment, spec.seed, spec.patch_size)
    loader = make_loader(dataset, StepBatches(n, spec.batch_size, spec.seed, step, total, rank, world), spec.workers,
                         dev)
    if state is not None and "rng" in state:
        _set_rng_state(state["rng"], dev)
    batches = iter(loader)
    stopped = validation is not None and validation.patience is not None and best["stale"] >= validation.patience
    samples, step_start = 0, time.perf_counter()
    for x, y in ([] if stopped else batches):
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
            if validation is not None and ((epoch + 1) % validation.every == 0 or step == total):
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
            if world > 1:  # rank 0 alone validates (the others wait here, on the group's timeout): whether to stop
                flag = torch.tensor([float(stopped)], device=dev)
                dist.broadcast(flag, src=0)
                stopped = bool(flag.item())
            history.append({"epoch": epoch, **{k: v for k, v in metrics.items() if k != "samples_per_s"}})
            running, samples, step_start = [], 0, time.perf_counter()
            if on_epoch:
                on_epoch(epoch, metrics)
        if step % spec.checkpoint_every_steps == 0 or step == total or stopped:
            save(step)
        if stopped:
            break
    if step < total and not stopped:
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
        stopped_early=bool(stopped) and step < total,
        determinism=devices.determinism(spec.deterministic, dev.type),
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
