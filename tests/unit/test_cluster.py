"""Which Dask cluster a spec's `cluster` value means here; local ones stay on loopback, start warm and close."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from voxelflow.data.cluster import WORKER_ENV, cuda_plan, dask_client, gpu_count, has_dask_cuda, resolve_kind


def test_resolve_kind():
    assert resolve_kind("tcp://10.0.0.5:8786", None) == "external"
    assert resolve_kind("auto", "tcp://scheduler:8786") == "external"
    assert resolve_kind("auto", "tcp://scheduler:8786", device="cuda") == "external"
    assert resolve_kind("local", "tcp://scheduler:8786") == "local"
    # CPU transforms never get a CUDA cluster, GPU or not
    assert resolve_kind("auto", None) == "local"

def test_gpu_transforms_never_fall_back_to_a_cpu_cluster():
    with pytest.raises(RuntimeError, match="cluster auto or cuda"):
        resolve_kind("local", None, device="cuda")
    if has_dask_cuda():
        assert resolve_kind("auto", None, device="cuda") == "cuda"
    else:
        with pytest.raises(RuntimeError, match=r"preprocess.device cuda needs dask-cuda.*voxelflow\[gpu\]"):
            resolve_kind("auto", None, device="cuda")
    assert resolve_kind("auto", "tcp://scheduler:8786", device="cuda") == "external"  # its workers have the GPUs


@pytest.mark.parametrize("gpus", range(1, 9))
def test_a_cuda_cluster_fits_the_visible_gpus(gpus):
    for cores in (2, 16, 64):
        plan = cuda_plan(gpus, cores)
        assert plan.workers == gpus and plan.adapt is None
        assert plan.threads == max(1, cores // gpus)  # the node's cores shared out, not a fixed 4
    assert cuda_plan(gpus, 16, n_workers=32).workers == gpus
    plan = cuda_plan(gpus, 16, bounds=(1, 16))
    assert plan.adapt == (1, gpus) and plan.workers == 1  # never asks dask-cuda for more than it can start
    plan = cuda_plan(gpus, 16, bounds=(4, 8))
    assert plan.adapt == (min(4, gpus), min(8, gpus)) and plan.workers == min(4, gpus)


def test_a_cuda_cluster_without_a_gpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        cuda_plan(0, 16)


def test_explicit_cuda_without_the_extra_is_a_clear_error():
    if has_dask_cuda():
        pytest.skip("dask-cuda is installed here")
    with pytest.raises(RuntimeError, match=r"pip install voxelflow\[gpu\]"):
        resolve_kind("cuda", None)
    with pytest.raises(RuntimeError, match=r"voxelflow\[gpu\]"), dask_client("cuda"):
        pass


def _warm_state() -> dict:
    import sys

    import torch

    return {"modules": {"torch", "monai.transforms"} <= set(sys.modules), "threads": torch.get_num_threads()}


def _malloc_env() -> dict:
    import os

    return {k: os.environ.get(k) for k in WORKER_ENV}


def test_local_cluster_binds_loopback_starts_warm_and_closes():
    before = logging.getLogger("distributed").level
    env_before = _malloc_env()
    with dask_client("local", n_workers=1) as client:
        assert client.scheduler.address.startswith("tcp://127.0.0.1:")
        workers = client.scheduler_info()["workers"]
        assert len(workers) == 1 and all(addr.startswith("tcp://127.0.0.1:") for addr in workers)
        assert all(w["nthreads"] == 1 for w in workers.values())
        dashboard = client.cluster.dashboard_link
        assert "127.0.0.1" in dashboard and ":8787" not in dashboard
        # the warm-up plugin ran before the block began: MONAI imported, one torch thread per Dask thread
        assert all("voxelflow-warm" in names for names in client.run(lambda dask_worker: list(dask_worker.plugins)).values())
        assert list(client.run(_warm_state).values()) == [{"modules": True, "threads": 1}]
        assert client.submit(sum, [1, 2, 3]).result() == 6
        # workers keep freed memory for the next case (no per-case mmap/munmap, see voxelflow.data.cluster)
        assert list(client.run(_malloc_env).values()) == [WORKER_ENV]
        assert logging.getLogger("distributed").level >= logging.WARNING
        cluster = client.cluster
    assert client.status == "closed" and cluster.status.name == "closed"
    assert logging.getLogger("distributed").level == before
    assert _malloc_env() == env_before  # this process's environment is as it was


def test_adaptive_cluster_scales_up_and_late_workers_are_warm():
    from voxelflow.spec.config import Adaptive

    with dask_client("local", adaptive=Adaptive(minimum=1, maximum=2)) as client:
        assert len(client.scheduler_info()["workers"]) == 1
        futures = client.map(time.sleep, [4.0] * 6, pure=False)  # ~24 s of work: worth a second worker
        deadline = time.monotonic() + 60
        while len(client.scheduler_info()["workers"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        client.wait_for_workers(2, timeout=60)
        states = client.run(_warm_state)
        assert len(states) == 2 and all(s == {"modules": True, "threads": 1} for s in states.values())
        client.cancel(futures)


def test_external_workers_warm_up_with_the_preload(tmp_path):
    """`dask worker --preload voxelflow.data.dask_preload`, started as voxelflow.data.dask_preload says."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=0, host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster:
        worker = subprocess.Popen(
            [str(Path(sys.executable).parent / "dask"), "worker", cluster.scheduler_address, "--nthreads", "1",
             "--host", "127.0.0.1", "--no-dashboard", "--preload", "voxelflow.data.dask_preload"],
            stdout=subprocess.DEVNULL, stderr=(tmp_path / "worker.log").open("w"),
            env={**os.environ, **WORKER_ENV, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        )
        try:
            with Client(cluster) as client:
                client.wait_for_workers(1, timeout=90)
                assert list(client.run(_warm_state).values()) == [{"modules": True, "threads": 1}]
                assert list(client.run(_malloc_env).values()) == [WORKER_ENV]
        finally:
            worker.terminate()
            worker.wait(timeout=30)


@pytest.mark.gpu
@pytest.mark.skipif(not (gpu_count() and has_dask_cuda()), reason="needs a CUDA device and dask-cuda")
def test_auto_with_cuda_transforms_starts_a_cuda_cluster():
    with dask_client("auto", device="cuda") as client:
        assert type(client.cluster).__name__ == "LocalCUDACluster"
        assert len(client.scheduler_info()["workers"]) == gpu_count()
        assert all(client.run(lambda: __import__("torch").cuda.is_available()).values())


def test_sticky_cuda_errors_restart_the_worker_and_out_of_memory_does_not():
    import torch

    from voxelflow.data.preprocess import sticky_cuda_error

    # the messages torch raises for a broken context
    assert sticky_cuda_error(RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel "
                                          "errors might be asynchronously reported"))
    assert sticky_cuda_error(RuntimeError("CUDA error: device-side assert triggered"))
    assert sticky_cuda_error(torch.AcceleratorError("CUDA error: unspecified launch failure"))
    # out of memory frees up with the case; anything else is the case's own error
    assert not sticky_cuda_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not sticky_cuda_error(RuntimeError("CUDA error: out of memory"))
    assert not sticky_cuda_error(ValueError("applying transform Spacingd: bad pixdim"))
