"""Dask clusters: an external scheduler, LocalCUDACluster for GPU transforms, LocalCluster otherwise."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import dask
from distributed import Client, LocalCluster

log = logging.getLogger(__name__)

GPU_EXTRA = "pip install voxelflow[gpu]"

# The C allocator of the worker processes of the clusters voxelflow starts. Preprocessing allocates
# and frees arrays of tens to hundreds of MB per case (the volume, its float64 copy for resampling,
# the sampling grid, the result). By default glibc serves blocks that large with a fresh mmap and
# unmaps them on free, and Dask's nannies add MALLOC_TRIM_THRESHOLD_=65536 (hand freed memory back
# at once); a Dask task's thread also allocates from an arena of its own, made of mmap'd heaps
# unmapped when empty. So each case page-faulted through all that memory again: a third or more of
# a worker's CPU time went to the kernel. One arena, no mmap for large blocks and no trimming keep
# freed memory in the worker's heap for the next case; the worker's RSS then stays near its
# high-water mark (one case's working set) instead of going up and down with each case.
WORKER_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}
WORKER_CONFIG = {f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in WORKER_ENV.items()}

# Share of each GPU's memory a worker of a LocalCUDACluster may take: torch's allocator is capped there
# (``set_per_process_memory_fraction``, an allocation above it raises at once instead of taking what
# another process on that GPU needs), and Dask spills device data to the host above it.
GPU_MEMORY_FRACTION = 0.85


@dataclass(frozen=True)
class CudaPlan:
    """A LocalCUDACluster's shape: ``workers`` to start (one per GPU at most), ``threads`` per worker
    (the node's cores shared out between its GPUs: the transforms take milliseconds on the GPU, the
    Zarr reads and writes around them are CPU work), and ``adapt`` bounds clamped to the GPUs."""

    workers: int
    threads: int
    adapt: tuple[int, int] | None


def cuda_plan(gpus: int, cores: int, n_workers: int | None = None, bounds: tuple[int, int] | None = None) -> CudaPlan:
    """How a LocalCUDACluster fits ``gpus`` GPUs and ``cores`` cores; ``n_workers`` and ``bounds``
    (adaptive minimum, maximum) are what was asked, never more workers than GPUs (dask-cuda raises
    "Can not scale beyond visible devices" at every adapt tick otherwise)."""
    if gpus < 1:
        raise RuntimeError("cluster 'cuda' needs a CUDA device, and torch sees none here")
    workers = max(1, min(n_workers or gpus, gpus))
    adapt = None
    if bounds:
        low, high = (max(1, min(b, gpus)) for b in bounds)
        adapt, workers = (low, max(low, high)), low
    return CudaPlan(workers, max(1, cores // gpus), adapt)


def gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # torch missing or CUDA driver broken: no GPU for us
        return 0


def has_dask_cuda() -> bool:
    return importlib.util.find_spec("dask_cuda") is not None


def resolve_kind(cluster: str, scheduler: str | None, device: str = "cpu") -> str:
    """Which cluster ``cluster`` means on this machine: ``external``, ``cuda`` or ``local``.

    ``auto``: the scheduler when one is configured; a LocalCUDACluster when the transforms run on
    the GPU (``device="cuda"``); a CPU LocalCluster otherwise. ``local`` and ``cuda`` are taken as
    said. GPU transforms on a cluster voxelflow starts need dask-cuda (one worker per GPU): without
    it, or on ``local`` (CPU worker processes that would each open a context on GPU 0), they are
    refused with the reason, never run on a CPU cluster instead.
    """
    if cluster.startswith(("tcp://", "tls://")) or (cluster == "auto" and scheduler):
        return "external"
    if cluster == "local" and device == "cuda":
        raise RuntimeError("preprocess.device cuda on preprocess.cluster local would start CPU worker processes "
                           "that each open a context on GPU 0: use cluster auto or cuda (one worker per GPU), or an "
                           "external scheduler whose workers have GPUs")
    if cluster == "cuda" or device == "cuda":
        if not has_dask_cuda():
            why = "cluster 'cuda'" if cluster == "cuda" else "preprocess.device cuda"
            raise RuntimeError(f"{why} needs dask-cuda, which is not installed here: {GPU_EXTRA}")
        return "cuda"
    return "local"


@contextlib.contextmanager
def quiet(logger: str = "distributed", level: int = logging.WARNING) -> Iterator[None]:
    """Keep a chatty library's INFO lines out of the run's log while a local cluster lives."""
    target = logging.getLogger(logger)
    before = target.level
    target.setLevel(max(level, before))
    try:
        yield
    finally:
        target.setLevel(before)


@contextlib.contextmanager
def _worker_env() -> Iterator[None]:
    """``WORKER_ENV`` for the worker processes spawned inside the block, and only for those.

    Dask's nannies spawn workers with ``distributed.nanny.pre-spawn-environ``, where a variable
    already in ``os.environ`` wins, and they copy it into this process's ``os.environ`` as they
    spawn: set both here, and put this process's environment back afterwards.
    """
    saved = {k: os.environ.get(k) for k in WORKER_ENV}
    os.environ.update(WORKER_ENV)
    try:
        with dask.config.set(WORKER_CONFIG):
            yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _bounds(adaptive: Any) -> tuple[int, int] | None:
    if adaptive is None:
        return None
    if isinstance(adaptive, dict):
        return int(adaptive.get("minimum", 1)), int(adaptive.get("maximum", 4))
    return int(adaptive.minimum), int(adaptive.maximum)


@contextlib.contextmanager
def dask_client(
    cluster: str = "auto",
    scheduler: str | None = None,
    n_workers: int | None = None,
    device: str = "cpu",
    adaptive: Any = None,
    memory_limit: str | int | None = None,
) -> Iterator[Client]:
    """A connected client whose workers are warm (:class:`~voxelflow.data.dask_preload.WarmWorker`).

    ``cluster`` and ``device`` choose the cluster (:func:`resolve_kind`); ``scheduler`` is the
    configured scheduler address (``VOXELFLOW_DASK_SCHEDULER``). A cluster voxelflow starts listens
    on 127.0.0.1 only, gives its workers one thread each (CPU) and :data:`WORKER_ENV`, has
    ``n_workers`` workers (default: the cores, at most 8; one per GPU for CUDA), each limited to
    ``memory_limit`` (Dask's default: the machine's memory shared out), and is closed after the
    block; with ``adaptive`` (``minimum``/``maximum``) it scales between those worker counts. An
    external scheduler is used as it is.
    """
    from voxelflow.data.dask_preload import WarmWorker

    kind = resolve_kind(cluster, scheduler, device)
    with quiet(), contextlib.ExitStack() as stack:
        if kind == "external":
            if adaptive is not None:
                log.warning("preprocess.adaptive is ignored: the external Dask cluster scales itself")
            client = stack.enter_context(Client(cluster if cluster.startswith(("tcp://", "tls://")) else scheduler))
        else:
            stack.enter_context(_worker_env())  # for workers started later (adapt, restarts) too
            local, bounds = _local_cluster(kind, n_workers, adaptive, memory_limit)
            stack.enter_context(local)
            if bounds:
                local.adapt(minimum=bounds[0], maximum=bounds[1])
            client = stack.enter_context(Client(local))
        client.register_plugin(WarmWorker(GPU_MEMORY_FRACTION if kind == "cuda" else None))
        yield client


def local_workers(n_workers: int | None = None) -> int:
    """The workers of a local CPU cluster voxelflow starts: ``n_workers``, else the cores, at most 8."""
    return n_workers or max(1, min(os.cpu_count() or 1, 8))


def _local_cluster(kind: str, n_workers: int | None, adaptive: Any, memory_limit: str | int | None):
    """The cluster to start and the adaptive bounds to give it (clamped to the GPUs for CUDA)."""
    bounds = _bounds(adaptive)
    limit = "auto" if memory_limit is None else memory_limit
    if kind == "cuda":
        if not has_dask_cuda():
            raise RuntimeError(f"cluster 'cuda' needs dask-cuda, which is not installed: {GPU_EXTRA}")
        plan = cuda_plan(gpu_count(), os.cpu_count() or 1, n_workers, bounds)
        if bounds and plan.adapt != bounds:
            log.warning("preprocess.adaptive %s clamped to %s: one worker per visible GPU", bounds, plan.adapt)
        from dask_cuda import LocalCUDACluster  # imported only where a GPU exists: it fails without one

        cluster = LocalCUDACluster(n_workers=plan.workers, threads_per_worker=plan.threads, host="127.0.0.1",
                                   dashboard_address="127.0.0.1:0", memory_limit=limit,
                                   device_memory_limit=GPU_MEMORY_FRACTION, silence_logs=logging.ERROR)
        return cluster, plan.adapt
    workers = local_workers(n_workers)
    if bounds:
        workers = bounds[0]
    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        memory_limit=limit,
        silence_logs=logging.ERROR,
    )
    return cluster, bounds
