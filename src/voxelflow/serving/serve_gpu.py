"""The inference service on GPUs: inferences per GPU, which GPU a request gets, a model replica and a memory
share per GPU, CUDA out-of-memory recovered.

Each visible GPU holds one replica of the served model and runs at most ``VOXELFLOW_SERVE_PER_GPU`` (1 or 2)
inferences at once; a request takes the GPU running the fewest. Each inference may use its share of the memory
free on its GPU once the replica is loaded (:func:`device_share`); the volumes whose stitched sliding-window
output would not fit in it are stitched on the CPU (:func:`voxelflow.serving.serve_volumes.stitch_limit_voxels`). On a
machine without GPUs none of this is used: inference runs on the CPU pool as before.
"""

from __future__ import annotations

import gc
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

from voxelflow.serving.serve_volumes import stitch_limit_voxels

SETTING = "VOXELFLOW_SERVE_PER_GPU"
MAX_PER_GPU = 2
#: of the memory free on a GPU once its replica is loaded, what its inferences share (the rest: the allocator's
#: fragmentation, cuDNN's workspaces beyond the estimate)
DEVICE_FRACTION = 0.9
#: what a client is told to wait after an inference ran out of GPU memory (seconds)
RETRY_AFTER_OOM = 5


def workers_for(workers: int | None, gpus: int, per_gpu: int, cores: int) -> int:
    """Inference threads: ``workers`` when set; else one per GPU slot (``gpus`` x ``per_gpu``) on GPUs, one per
    core without them."""
    if workers:
        return workers
    return gpus * per_gpu if gpus > 0 else max(1, cores)


@dataclass(frozen=True)
class Plan:
    """Where the service runs inference: ``devices`` (``cuda:0``...; empty: the CPU), ``per_gpu`` inferences on
    each at once, ``workers`` threads."""

    devices: tuple[str, ...]
    per_gpu: int
    workers: int

    @property
    def slots(self) -> int:
        """Inferences on GPUs at once (0 on the CPU)."""
        return len(self.devices) * self.per_gpu

    def describe(self) -> str:
        if not self.devices:
            return f"inference on the CPU, {self.workers} at once"
        gpus = "1 GPU" if len(self.devices) == 1 else f"{len(self.devices)} GPUs"
        return f"inference on {gpus}, {self.per_gpu} at once on each (one model replica per GPU)"

    def replicate(self, segmenter: Any) -> dict[str, Replica]:
        return replicate(segmenter, self.devices, self.per_gpu)


def plan(gpus: int, per_gpu: int, workers: int | None, cores: int) -> Plan:
    """What the service does on a machine with ``gpus`` visible GPUs and ``cores`` cores."""
    if not 1 <= per_gpu <= MAX_PER_GPU:
        raise ValueError(f"{SETTING} must be 1 or {MAX_PER_GPU} (inferences each GPU runs at once), not {per_gpu}")
    devices = tuple(f"cuda:{i}" for i in range(max(0, gpus)))
    return Plan(devices, per_gpu, workers_for(workers, len(devices), per_gpu, cores))


def pick(in_use: Mapping[str, int], per_device: int) -> str | None:
    """The GPU a request gets: the one running the fewest inferences (the first of equals); None when every
    GPU runs ``per_device``."""
    free = [(n, i, device) for i, (device, n) in enumerate(in_use.items()) if n < per_device]
    return min(free)[2] if free else None


class GpuSlots:
    """The GPU semaphore: at most ``per_device`` inferences on each device at once; ``take`` waits for one."""

    def __init__(self, devices: Sequence[str], per_device: int) -> None:
        if not devices:
            raise ValueError("GpuSlots needs at least one device")
        self.per_device = per_device
        self.in_use = {device: 0 for device in devices}
        self.cond = threading.Condition()

    @contextmanager
    def take(self, timeout: float | None = None) -> Iterator[str]:
        """A free device for the block; ``TimeoutError`` after ``timeout`` seconds without one."""
        with self.cond:
            if not self.cond.wait_for(lambda: pick(self.in_use, self.per_device) is not None, timeout):
                raise TimeoutError(f"no GPU free within {timeout:g} s")
            device = pick(self.in_use, self.per_device)
            assert device is not None
            self.in_use[device] += 1
        try:
            yield device
        finally:
            with self.cond:
                self.in_use[device] -= 1
                self.cond.notify()


def device_share(free_bytes: int, per_gpu: int) -> int:
    """Device memory one inference may use: :data:`DEVICE_FRACTION` of what is free, split between the
    ``per_gpu`` inferences that run there at once."""
    return int(free_bytes * DEVICE_FRACTION) // max(1, per_gpu)


@dataclass(frozen=True)
class Replica:
    """The served model on one GPU, and the device memory one inference may use there."""

    segmenter: Any
    share_bytes: int


def free_bytes(device: str) -> int:
    """Memory free on ``device`` (what torch's cache holds unused is handed back first)."""
    import torch

    torch.cuda.empty_cache()
    return int(torch.cuda.mem_get_info(torch.device(device))[0])


def replicate(segmenter: Any, devices: Sequence[str], per_gpu: int,
              free: Callable[[str], int] = free_bytes) -> dict[str, Replica]:
    """One replica of ``segmenter`` per device, each told above which grid its logits are stitched on the CPU.
    The share is measured after the replica is loaded (during a hot swap the old model is still there too, so it
    errs small)."""
    replicas = {}
    for device in devices:
        twin = segmenter.replica(device)
        share = device_share(free(device), per_gpu)
        twin.stitch_voxels = stitch_limit_voxels(share, segmenter.config)
        replicas[device] = Replica(twin, share)
    return replicas


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is, or was raised from, torch's out-of-memory error (MONAI's transforms wrap errors)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None:
        return False
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, torch.OutOfMemoryError):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


def recover() -> None:
    """After an out-of-memory: collect the failed inference's tensors and hand torch's cached blocks back to
    the driver, so the next inference starts from the memory the replicas hold."""
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
