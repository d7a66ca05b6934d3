"""The cases training draws: in memory (:class:`ArrayCases`) or read from a case store with as many as fit a
memory budget held on the training's device (:class:`StoreCases`); their label checks; each drawn case padded
to the patch size and augmented with a seeded random state (:class:`TrainingSet`); the step-by-step batch
sampler (:class:`StepBatches`), and the loaders that make the batches ahead (:func:`make_loader`)."""

from __future__ import annotations

import queue
import threading
from functools import partial
from typing import Any, Callable

import numpy as np


class DrawError(ValueError):
    """A training case could not be drawn: the message names the case and the transform that raised."""


class LabelValuesError(ValueError):
    """Label values outside ``0..out_channels-1`` (reason ``label-values``); ``cases`` maps case to values."""

    def __init__(self, message: str, cases: dict[str, list[int]] | None = None) -> None:
        super().__init__(message)
        self.cases = dict(cases or {})


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
        if label.device.type != "cpu":
            return [int(v) for v in torch.unique(label).tolist()]
        label = label.numpy()  # a view: the histogram below, not a sort
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
    """The spec's random transforms as one MONAI ``Compose`` (None when there are none); a
    ``RandCropByPosNegLabeld`` samples its centres' voxels instead of scanning the label at each draw
    (:mod:`voxelflow.learn.sampling`)."""
    from voxelflow.data.preprocess import build_transforms
    from voxelflow.learn.sampling import with_sampled_centres

    return with_sampled_centres(build_transforms(augment)) if augment else None


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
            out = self._step(partial(self.transform, start=k, end=k + 1), out, i,
                             getattr(t, "spec_name", type(t).__name__))  # the name the spec gave it
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
    """MONAI's DataLoader with worker processes (whose exceptions torch raises in this process); on a GPU
    without workers, a :class:`ThreadLoader` over one that loads in this process; on the CPU without
    workers, that loader itself, drawing in the training thread.

    On the CPU the step's torch ops already use every core: a loader thread beside them does not overlap
    its draws with the step, it competes with it (its torch copies start an OpenMP team of their own that
    spins on the step's cores). Measured with ``benchmarks/train.py``'s cases, 2 cores, 24 steps: the step
    took 15-25 % longer with the thread, and about 2 % (the draws themselves) drawing in line."""
    import torch
    from monai.data import DataLoader

    # a loader of its own generator: torch's global RNG (initial weights, dropout) is left to the network
    generator = torch.Generator().manual_seed(dataset.seed)
    if workers > 0:  # on a GPU too: the workers read and augment on the CPU and never touch CUDA; the
        # training thread moves each (pinned) batch to the device
        return DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                          persistent_workers=False, multiprocessing_context="fork", generator=generator,
                          pin_memory=device.type == "cuda")
    in_line = DataLoader(dataset, batch_sampler=batches, num_workers=0, collate_fn=collate, generator=generator)
    return in_line if torch.device(device).type == "cpu" else ThreadLoader(in_line, buffer_size=2)