"""Warm Dask workers: torch and MONAI's transforms imported once per worker, torch threads set.

Importing ``monai.transforms`` takes seconds in a fresh process; a worker that pays it inside its
first task makes that task (and any timing of it) slow. :func:`voxelflow.data.cluster.dask_client`
registers :class:`WarmWorker` on every client it yields, so workers started later (adaptive
scaling, a restart after a crash) warm up too. Workers voxelflow does not start can do the same
at start-up::

    dask worker tcp://scheduler:8786 --nthreads 1 --preload voxelflow.data.dask_preload

Give such workers voxelflow's allocator settings too (``voxelflow.data.cluster.WORKER_ENV``, where the
reasons are written) by starting them with those variables in their environment; the nanny passes
them on, and Dask's own MALLOC_TRIM_THRESHOLD_ default gives way to the environment's::

    env MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1099511627776 \
        dask worker tcp://scheduler:8786 --nthreads 1 --preload voxelflow.data.dask_preload
"""

from __future__ import annotations

import asyncio
import logging
import time

from distributed import WorkerPlugin

log = logging.getLogger(__name__)

MODULES = ("torch", "monai.transforms")


def warm(nthreads: int | None, gpu_memory_fraction: float | None = None) -> float:
    """Import what preprocessing needs and give torch ``nthreads`` threads; on a worker with a GPU,
    cap torch's allocator at ``gpu_memory_fraction`` of the device. Returns the seconds spent."""
    import importlib
    import warnings

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODULES:
            importlib.import_module(name)
    import torch

    if nthreads:
        torch.set_num_threads(max(1, int(nthreads)))
    if gpu_memory_fraction and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(gpu_memory_fraction)
    return time.perf_counter() - start


class WarmWorker(WorkerPlugin):
    """Runs :func:`warm` once on each worker it is registered on (and on each worker that joins later)."""

    name = "voxelflow-warm"
    idempotent = True  # registering it again (another client of the same cluster) is a no-op

    def __init__(self, gpu_memory_fraction: float | None = None):
        self.gpu_memory_fraction = gpu_memory_fraction

    async def setup(self, worker) -> None:
        nthreads = worker.state.nthreads
        # off the event loop: the worker keeps answering heartbeats while it imports
        seconds = await asyncio.get_running_loop().run_in_executor(None, warm, nthreads, self.gpu_memory_fraction)
        log.info("voxelflow: worker %s warm in %.1f s (torch threads: %s)", worker.address, seconds, nthreads)


async def dask_setup(worker) -> None:
    """``dask worker --preload voxelflow.data.dask_preload``: warm the worker as it starts."""
    from distributed import Worker

    if isinstance(worker, Worker):  # a preload given to a scheduler or nanny does nothing
        await WarmWorker().setup(worker)
