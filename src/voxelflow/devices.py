"""Where training runs: pure decisions from what the spec says and what the machine has.

``train.devices``: ``cpu`` trains on the CPU (one process) whatever GPUs there are; ``auto`` uses the
largest number of GPUs that divides the batch (one process each; the CPU when there is no GPU);
``N`` runs N processes, one per GPU, or N gloo processes on a machine without GPUs. ``train.precision:
auto`` is bf16-mixed on a GPU with native bf16, fp16-mixed (with a GradScaler) on one without (V100,
T4: torch's ``is_bf16_supported()`` counts emulation unless told not to), and fp32 on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass


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
