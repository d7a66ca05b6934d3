"""Faults on a real Dask cluster: a worker killed with SIGKILL mid-run, and a poison case that kills its worker.

Both run on 2-worker LocalClusters on 127.0.0.1 over real Zarr stores in a tmp folder.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import xarray as xr

from voxelflow.core.storage import CaseStore, Store
from voxelflow.data.preprocess import load_case_arrays, preprocess
from voxelflow.spec.config import PreprocessSpec

TRANSFORMS = [
    {"Orientationd": {"keys": ["image", "label"], "axcodes": "RAS"}},
    {"Spacingd": {"keys": ["image", "label"], "pixdim": [1.5, 1.5, 1.5], "mode": ["bilinear", "nearest"]}},
    {"ScaleIntensityRanged": {"keys": "image", "a_min": 0.0, "a_max": 1.0, "b_min": 0.0, "b_max": 1.0,
                              "clip": True}},
]


def write_raw(raw: CaseStore, case_id: str, seed: int, size: int = 40, spacing: float = 1.0) -> None:
    """One labelled synthetic case as ingestion stores it (image, label, affine and spacing attrs)."""
    from monai.data import create_test_image_3d

    image, label = create_test_image_3d(size, size, size, rad_max=max(3, size // 5), rad_min=2, num_seg_classes=1,
                                        random_state=np.random.RandomState(seed))
    affine = np.diag([spacing, spacing, spacing, 1.0])
    ds = xr.Dataset({"image": (("x", "y", "z"), image.astype(np.float32)),
                     "label": (("x", "y", "z"), (label > 0).astype(np.uint8))},
                    attrs={"affine": affine.tolist(), "spacing": [spacing] * 3, "case_name": case_id})
    raw.write(case_id, ds)


def files(out: CaseStore) -> dict[str, dict[str, bytes]]:
    """Every file of every committed case (the attempt its marker names), by case and path inside it."""
    found = {}
    for cid in out.committed():
        root = Path(out.url(cid))
        found[cid] = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    return found


def test_a_worker_killed_mid_run_changes_nothing(tmp_path):
    """SIGKILL one of two workers once the first shard is done: Dask reschedules its shard, output is bit-identical."""
    from voxelflow.data.cluster import dask_client

    raw = CaseStore(Store(tmp_path), "raw")
    ids = [f"case-{i:03d}" for i in range(16)]
    for i, cid in enumerate(ids):
        write_raw(raw, cid, i, size=56)
    spec = PreprocessSpec(transforms=TRANSFORMS, shard_size=2)
    reference = CaseStore(Store(tmp_path), "reference")
    assert preprocess(spec, raw, ids, reference).processed == len(ids)  # fault-free, in this process

    out = CaseStore(Store(tmp_path), "out")
    killed: dict[str, object] = {}
    with dask_client("local", n_workers=2) as client:
        pids = client.run(os.getpid)

        def kill_a_busy_worker(done: int, total: int) -> None:
            if killed:
                return
            busy = [addr for addr, keys in client.processing().items() if keys and addr in pids]
            addr = busy[0] if busy else next(iter(pids))
            os.kill(pids[addr], signal.SIGKILL)
            killed.update(addr=addr, pid=pids[addr], busy=bool(busy), done=done)

        report = preprocess(spec, raw, ids, out, client=client, progress=kill_a_busy_worker)
        # the nanny starts a new worker process in place of the killed one
        deadline = time.monotonic() + 60
        while killed["pid"] in client.run(os.getpid).values() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert killed["pid"] not in client.run(os.getpid).values()
    assert killed["busy"] and killed["done"] < len(ids), killed  # it was working, and the run was not over
    assert report.processed == len(ids) and not report.failed
    assert out.committed() == ids
    assert files(out) == files(reference)  # every byte of every committed case, Zarr metadata included


def test_a_poison_case_fails_alone_and_the_others_complete(tmp_path):
    """A case whose header claims 64 mm voxels: resampling it to 1.5 mm needs gigabytes (683³ voxels, and a
    sampling grid three times that), so the nanny kills its worker at the 1 GiB memory limit, every time.

    The memory limit is a real kill (the nanny terminates the process, as it would on a production cluster);
    the limit is above the ~520 MB a worker holds after importing torch and MONAI, and pausing at 80 % is off
    so that a worker near its limit still runs the normal cases. ``allowed-failures: 0`` makes the first
    death final for the scheduler, so the test does not wait for four deaths per attempt.
    """
    import dask

    from voxelflow.data.cluster import dask_client

    raw = CaseStore(Store(tmp_path), "raw")
    good = [f"case-{i:03d}" for i in range(7)]
    for i, cid in enumerate(good):
        write_raw(raw, cid, i, size=24)
    poison = "case-002-poison"  # sorts into the middle of the first shard: cases after it must still be done
    write_raw(raw, poison, 99, size=16, spacing=64.0)
    spec = PreprocessSpec(transforms=TRANSFORMS, shard_size=4)
    out = CaseStore(Store(tmp_path), "out")
    config = {
        "distributed.scheduler.allowed-failures": 0,
        "distributed.worker.memory.pause": False,
        "distributed.worker.memory.spill": False,
        "distributed.worker.memory.target": False,
    }
    with dask.config.set(config), dask_client("local", n_workers=2, memory_limit="1GiB") as client:
        report = preprocess(spec, raw, [*good, poison], out, client=client)
    assert [f["case"] for f in report.failed] == [poison], report.failed
    assert "KilledWorker" in report.failed[0]["reason"]
    assert report.processed == len(good) and sorted(report.shapes) == good
    assert out.committed() == good
    assert all(load_case_arrays(out, cid)["image"].shape == (1, 16, 16, 16) for cid in good)


def test_a_case_that_raises_fails_with_its_reason(tmp_path):
    """An ordinary error (here: the transforms want a label the case lacks) fails that case only, in process."""
    raw = CaseStore(Store(tmp_path), "raw")
    write_raw(raw, "case-000", 0, size=24)
    ds = raw.open("case-000").load()
    raw.write("case-001", ds.drop_vars("label"))
    spec = PreprocessSpec(transforms=TRANSFORMS, shard_size=2)
    out = CaseStore(Store(tmp_path), "out")
    report = preprocess(spec, raw, ["case-000", "case-001"], out)
    assert report.processed == 1 and out.committed() == ["case-000"]
    assert [f["case"] for f in report.failed] == ["case-001"]
    assert "label" in report.failed[0]["reason"]


def test_failures_on_either_side_of_the_move_onto_a_cluster_fail_alone(tmp_path, monkeypatch):
    """Here first, then a real 2-worker local cluster (its cost set to nothing, so the rest moves after the first
    shard): a case that raises here and one that raises on the cluster each fail once with their reason, every
    other case is committed, and progress ends at the total."""
    from voxelflow.data import preprocess as prep
    from voxelflow.data.cluster import dask_client

    raw = CaseStore(Store(tmp_path), "raw")
    ids = [f"case-{i:03d}" for i in range(6)]
    for i, cid in enumerate(ids):
        write_raw(raw, cid, i, size=24)
    unlabelled = raw.open("case-000").load().drop_vars("label")
    bad = ["case-001", "case-004"]  # in the first shard (here) and in the third (on the cluster)
    for cid in bad:
        raw.write(cid, unlabelled)
    monkeypatch.setattr(prep, "CLUSTER_COST_S", 0.0)
    started = []

    def cluster():
        started.append(1)
        return dask_client("local", n_workers=2)

    spec = PreprocessSpec(transforms=TRANSFORMS, shard_size=2)
    out = CaseStore(Store(tmp_path), "out")
    calls = []
    report = preprocess(spec, raw, ids, out, progress=lambda i, n: calls.append((i, n)), cluster=cluster, workers=2)
    assert started == [1]
    assert [f["case"] for f in report.failed] == bad and all("label" in f["reason"] for f in report.failed)
    assert report.processed == 4 and out.committed() == [c for c in ids if c not in bad]
    assert calls == sorted(calls) and calls[-1] == (6, 6)
