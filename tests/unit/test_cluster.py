"""Which Dask cluster a spec's `cluster` value means here, and that a local one stays on loopback."""

from __future__ import annotations

import logging

from voxelflow.cluster import dask_client, gpu_count, resolve_kind


def test_resolve_kind():
    assert resolve_kind("tcp://10.0.0.5:8786", None) == "external"
    assert resolve_kind("auto", "tcp://scheduler:8786") == "external"
    assert resolve_kind("local", "tcp://scheduler:8786") == "local"
    assert resolve_kind("cuda", None) == "cuda"
    assert resolve_kind("auto", None) == ("cuda" if gpu_count() else "local")


def test_local_cluster_binds_loopback_and_runs_tasks():
    before = logging.getLogger("distributed").level
    with dask_client("local", n_workers=1) as client:
        assert client.scheduler.address.startswith("tcp://127.0.0.1:")
        workers = client.scheduler_info()["workers"]
        assert len(workers) == 1 and all(addr.startswith("tcp://127.0.0.1:") for addr in workers)
        assert client.submit(sum, [1, 2, 3]).result() == 6
        assert logging.getLogger("distributed").level >= logging.WARNING
    assert logging.getLogger("distributed").level == before
