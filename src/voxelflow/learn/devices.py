"""Where training runs: pure decisions from what the spec says and what the machine has.

``train.devices``: ``cpu`` trains on the CPU (one process) whatever GPUs there are; ``auto`` uses the
largest number of GPUs that divides the batch (one process each; the CPU when there is no GPU);
``N`` runs N processes, one per GPU, or N gloo processes on a machine without GPUs. ``train.precision:
auto`` is bf16-mixed on a GPU with native bf16, fp16-mixed (with a GradScaler) on one without (V100,
T4: torch's ``is_bf16_supported()`` counts emulation unless told not to), and fp32 on a CPU.
``train.deterministic`` makes training on CUDA bit for bit repeatable (:func:`deterministic_cuda`); without
it a resumed run there matches an uninterrupted one to float tolerance (:func:`determinism` says which).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, MutableMapping


@dataclass(frozen=True)
class Placement:
    kind: str  # "cpu" or "cuda"
    processes: int

    @property
    def device(self) -> str:
        """The device of rank 0 (rank r uses ``cuda:r``)."""
        return "cuda:0" if self.kind == "cuda" else "cpu"

    def describe(self) -> str:
        if self.kind == "cpu":
            return "the CPU" if self.processes == 1 else f"{self.processes} gloo processes on the CPU"
        return "1 GPU" if self.processes == 1 else f"{self.processes} GPUs (DistributedDataParallel)"


def placement(devices: str | int, gpus: int, batch_size: int, device: str | None = None) -> Placement:
    """What ``train.devices`` means on a machine with ``gpus`` GPUs for batches of ``batch_size``; an
    explicit ``device`` (``cpu``, ``cuda``, ``cuda:1``) is one process there."""
    if batch_size < 1:
        raise ValueError(f"train.batch_size must be at least 1, not {batch_size}")
    if device is not None:
        kind = "cuda" if device.startswith("cuda") else "cpu"
        if kind == "cuda" and gpus < 1:
            raise ValueError(f"device {device!r} asked for, and this machine has no GPU")
        return Placement(kind, 1)
    if devices == "cpu":
        return Placement("cpu", 1)
    if devices == "auto":
        if gpus < 1:
            return Placement("cpu", 1)
        return Placement("cuda", max(k for k in range(1, gpus + 1) if batch_size % k == 0))
    n = int(devices)
    if n < 1:
        raise ValueError(f"train.devices must be auto, cpu or a number of processes (at least 1), not {n}")
    if batch_size % n:
        raise ValueError(f"train.batch_size ({batch_size}) must be a multiple of train.devices ({n}): each step's "
                         "batch is split between the processes")
    if gpus and n > gpus:
        raise ValueError(f"train.devices: {n} needs {n} GPUs and this machine has {gpus}")
    return Placement("cuda" if gpus else "cpu", n)


def precision(asked: str, kind: str, bf16_native: bool) -> str:
    """``train.precision`` resolved for a ``kind`` device: ``auto`` is bf16-mixed where bf16 is native,
    fp16-mixed on a GPU without it, fp32 on the CPU (autocast's bf16 convolutions are emulated there)."""
    if asked != "auto":
        return asked
    if kind == "cuda":
        return "bf16-mixed" if bf16_native else "fp16-mixed"
    return "fp32"


def bf16_native() -> bool:
    """Whether this process's GPU computes bf16 natively (emulation does not count)."""
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False))


def visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - torch without a working driver: no GPU
        return 0


def cache_placement(asked_bytes: int, where: Placement, workers: int, free_bytes: int | None) -> tuple[str, int]:
    """Where the training cache lives and how much of ``train.cache_mb`` it may take.

    On the CPU, and on a GPU when ``train.workers`` read and augment the cases in worker processes
    (which never touch CUDA: the batches move to the GPU in the training thread), the cache is held
    on the CPU as asked. Otherwise it is held on the GPU, up to 40 % of the memory free there when
    training starts (``free_bytes``, per process: every rank holds its own copy); the cases beyond
    that are streamed from the store.
    """
    if where.kind != "cuda" or workers > 0:
        return "cpu", asked_bytes
    limit = int((free_bytes or 0) * 0.4)
    return where.device, min(asked_bytes, limit)


def free_gpu_bytes() -> int | None:
    """Free memory of this process's current GPU, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info()
    return int(free)


#: cuBLAS's workspace for repeatable results (torch's reproducibility notes): 8 buffers of 4 MiB
CUBLAS_WORKSPACE = ":4096:8"
_CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")


def determinism(deterministic: bool, kind: str) -> str:
    """What a training on a ``kind`` device (``cpu``, ``cuda``) with ``train.deterministic`` promises of a
    resumed run; logged and returned with the result, as the placement is."""
    if kind != "cuda":
        return "bit for bit (the CPU)"
    if deterministic:
        return ("bit for bit (train.deterministic: cuDNN deterministic, no autotuning, TF32 off, "
                f"CUBLAS_WORKSPACE_CONFIG={CUBLAS_WORKSPACE})")
    return "to float tolerance (cuDNN's default algorithms and TF32 convolutions; train.deterministic: false)"


def cublas_workspace(environ: MutableMapping[str, str] | None = None) -> str:
    """Set ``CUBLAS_WORKSPACE_CONFIG`` for deterministic cuBLAS unless it already has one of the two values
    torch accepts; returns the value. cuBLAS reads it once, at a process's first matmul on a GPU, and the
    training processes started afterwards inherit it."""
    environ = os.environ if environ is None else environ
    if environ.get("CUBLAS_WORKSPACE_CONFIG") not in _CUBLAS_DETERMINISTIC:
        environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    return environ["CUBLAS_WORKSPACE_CONFIG"]


@contextmanager
def deterministic_cuda(on: bool = True) -> Iterator[None]:
    """torch's deterministic settings for CUDA within the block, restored after it (they are process-wide):
    deterministic cuDNN algorithms, no cuDNN autotuning, no TF32 in matmuls and convolutions, and
    ``torch.use_deterministic_algorithms`` in warn-only mode (an operation with no deterministic CUDA
    kernel warns instead of failing the training). ``on=False``: nothing changes."""
    import torch

    if not on:
        yield
        return
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    cublas_workspace()
    saved = (cudnn.deterministic, cudnn.benchmark, matmul.allow_tf32, cudnn.allow_tf32,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    cudnn.deterministic, cudnn.benchmark, matmul.allow_tf32, cudnn.allow_tf32 = True, False, False, False
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark, matmul.allow_tf32, cudnn.allow_tf32 = saved[:4]
        torch.use_deterministic_algorithms(saved[4], warn_only=saved[5])
