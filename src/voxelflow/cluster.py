"""Dask clusters: an external scheduler, LocalCUDACluster for GPU transforms, LocalCluster otherwise."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Iterator
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

CUDA_THREADS = 4  # most threads (shards at once) per GPU worker of a LocalCUDACluster


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

    ``auto``: the scheduler when one is configured; a LocalCUDACluster only when the transforms run
    on the GPU (``device="cuda"``), dask-cuda is installed and a GPU is present; a CPU LocalCluster
    otherwise. ``local`` and ``cuda`` are taken as said; ``cuda`` without dask-cuda is a RuntimeError.
    """
    if cluster.startswith(("tcp://", "tls://")) or (cluster == "auto" and scheduler):
        return "external"
    if cluster == "cuda":
        if not has_dask_cuda():
            raise RuntimeError(f"cluster 'cuda' needs dask-cuda, which is not installed here: {GPU_EXTRA}")
        return "cuda"
    if cluster == "auto" and device == "cuda" and has_dask_cuda() and gpu_count() > 0:
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
    """A connected client whose workers are warm (:class:`~voxelflow.dask_preload.WarmWorker`).

    ``cluster`` and ``device`` choose the cluster (:func:`resolve_kind`); ``scheduler`` is the
    configured scheduler address (``VOXELFLOW_DASK_SCHEDULER``). A cluster voxelflow starts listens
    on 127.0.0.1 only, gives its workers one thread each (CPU) and :data:`WORKER_ENV`, has
    ``n_workers`` workers (default: the cores, at most 8; one per GPU for CUDA), each limited to
    ``memory_limit`` (Dask's default: the machine's memory shared out), and is closed after the
    block; with ``adaptive`` (``minimum``/``maximum``) it scales between those worker counts. An
    external scheduler is used as it is.
    """
    from voxelflow.dask_preload import WarmWorker

    kind = resolve_kind(cluster, scheduler, device)
    with quiet(), contextlib.ExitStack() as stack:
        if kind == "external":
            if adaptive is not None:
                log.warning("preprocess.adaptive is ignored: the external Dask cluster scales itself")
            client = stack.enter_context(Client(cluster if cluster.startswith(("tcp://", "tls://")) else scheduler))
        else:
            stack.enter_context(_worker_env())  # for workers started later (adapt, restarts) too
            local = stack.enter_context(_local_cluster(kind, n_workers, adaptive, memory_limit))
            bounds = _bounds(adaptive)
            if bounds:
                local.adapt(minimum=bounds[0], maximum=bounds[1])
            client = stack.enter_context(Client(local))
        client.register_plugin(WarmWorker())
        yield client


def _local_cluster(kind: str, n_workers: int | None, adaptive: Any, memory_limit: str | int | None):
    bounds = _bounds(adaptive)
    limit = "auto" if memory_limit is None else memory_limit
    if kind == "cuda":
        if not has_dask_cuda():
            raise RuntimeError(f"cluster 'cuda' needs dask-cuda, which is not installed: {GPU_EXTRA}")
        gpus = gpu_count()
        if gpus == 0:
            raise RuntimeError("cluster 'cuda' needs a CUDA device, and torch sees none here")
        from dask_cuda import LocalCUDACluster  # imported only where a GPU exists: it fails without one

        workers = min(n_workers or gpus, gpus)
        if bounds:
            workers = min(max(bounds[0], 1), gpus)
        # One worker per GPU. The transforms take milliseconds there; reading and writing the cases
        # (CPU work) is what is left, so each GPU worker runs several shards at once to overlap it.
        threads = max(1, min(CUDA_THREADS, (os.cpu_count() or 1) // gpus))
        return LocalCUDACluster(n_workers=workers, threads_per_worker=threads, host="127.0.0.1",
                                dashboard_address="127.0.0.1:0", memory_limit=limit, silence_logs=logging.ERROR)
    workers = n_workers or max(1, min(os.cpu_count() or 1, 8))
    if bounds:
        workers = bounds[0]
    return LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        memory_limit=limit,
        silence_logs=logging.ERROR,
    )
