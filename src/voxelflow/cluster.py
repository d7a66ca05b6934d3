"""Dask clusters: an external scheduler, LocalCUDACluster on GPUs, LocalCluster otherwise."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from distributed import Client, LocalCluster


def gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # torch missing or CUDA driver broken: no GPU for us
        return 0


def resolve_kind(cluster: str, scheduler: str | None) -> str:
    """Which cluster ``cluster`` means on this machine: external, cuda or local."""
    if cluster.startswith(("tcp://", "tls://")) or (cluster == "auto" and scheduler):
        return "external"
    if cluster == "cuda" or (cluster == "auto" and gpu_count() > 0):
        return "cuda"
    return "local"


@contextlib.contextmanager
def quiet(logger: str = "distributed", level: int = logging.WARNING) -> Iterator[None]:
    """Keep a chatty library's INFO lines out of the run's log while a local cluster lives."""
    log = logging.getLogger(logger)
    before = log.level
    log.setLevel(max(level, before))
    try:
        yield
    finally:
        log.setLevel(before)


@contextlib.contextmanager
def dask_client(cluster: str = "auto", scheduler: str | None = None, n_workers: int | None = None) -> Iterator[Client]:
    """A connected client; a local cluster is started (on 127.0.0.1) and torn down around it."""
    kind = resolve_kind(cluster, scheduler)
    with quiet():
        yield from _client(kind, cluster, scheduler, n_workers)


def _client(kind: str, cluster: str, scheduler: str | None, n_workers: int | None) -> Iterator[Client]:
    if kind == "external":
        address = cluster if cluster.startswith(("tcp://", "tls://")) else scheduler
        with Client(address) as client:
            yield client
        return
    if kind == "cuda":
        from dask_cuda import LocalCUDACluster  # imported only where a GPU exists

        local = LocalCUDACluster(host="127.0.0.1", dashboard_address="127.0.0.1:0")
    else:
        workers = n_workers or max(1, min(os.cpu_count() or 1, 8))
        local = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            silence_logs=40,
        )
    with local, Client(local) as client:
        yield client
