"""Preprocessing speed-up: a plain sequential MONAI loop ÷ voxelflow's sharded preprocessing on Dask.

Both read the same 16 synthetic raw cases (256³ float32 at 1 mm, LPS-oriented, with a label: a brain
MRI in FreeSurfer's conformed space) from a CaseStore, reorient them to RAS, resample them to 1.5 mm
and rescale their intensities (MONAI's Orientationd, Spacingd, ScaleIntensityRanged), and write each
result to a CaseStore (same arrays, attributes, chunks and codec: the outputs are compared).

* sequential: a plain loop in a fresh process of its own, ``torch.set_num_threads(os.cpu_count())``:
  read a case with xarray, run the MONAI ``Compose`` on it, write it; then the next case. One case
  first, untimed (imports, first calls).
* voxelflow: ``preprocess.preprocess`` on a warm 2-worker LocalCluster from ``cluster.dask_client``
  (start-up and a warm-up job untimed); each worker reads, transforms and writes its shard's cases.

Before each timed run the script waits (up to 2 min) for the machine to be idle, and it reports the
CPU time other processes took during each run. The runs alternate; the ratio of the medians is the
speed-up. While voxelflow runs, this process's RSS is sampled every 10 ms: its peak growth ÷ the
bytes written is ``preprocess_driver_memory_ratio`` (no array passes through the driver).

Part of voxelflow's gain is its workers' C allocator settings (``voxelflow.data.cluster.WORKER_ENV``: a
case no longer page-faults through freshly mapped memory), which a plain process does not have. So,
for information, the same sequential loop also runs in a fresh process started with those settings
(``speedup_vs_tuned_sequential`` in the summary line): that ratio is the gain from running the cases
in parallel alone. ``--no-tuned-sequential`` skips it.

Prints JSON lines: raw timings first, then the memory ratio, and as the LAST line the speed-up
(metric, value, goal, higher_is_better). Run: ``.venv/bin/python benchmarks/preprocess.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

TRANSFORMS = [
    {"Orientationd": {"keys": ["image", "label"], "axcodes": "RAS"}},
    {"Spacingd": {"keys": ["image", "label"], "pixdim": [1.5, 1.5, 1.5], "mode": ["bilinear", "nearest"]}},
    {"ScaleIntensityRanged": {"keys": "image", "a_min": 0.0, "a_max": 1.0, "b_min": 0.0, "b_max": 1.0,
                              "clip": True}},
]
SHAPE = (256, 256, 256)  # a 1 mm brain MRI in FreeSurfer's conformed space


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def make_raw(raw, n: int, shape: tuple[int, int, int]) -> list[str]:
    """``n`` labelled synthetic volumes as ingestion stores them (chunks of at most 128 per axis)."""
    import numpy as np
    import xarray as xr
    from monai.data import create_test_image_3d

    affine = np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS, as DICOM-derived volumes often are: Orientationd flips
    affine[:3, 3] = [s / 2 for s in shape]
    ids = []
    for i in range(n):
        image, label = create_test_image_3d(*shape, num_objs=12, rad_max=30, rad_min=8, noise_max=0.3,
                                            num_seg_classes=1, random_state=np.random.RandomState(i))
        ds = xr.Dataset({"image": (("x", "y", "z"), image.astype(np.float32)),
                         "label": (("x", "y", "z"), (label > 0).astype(np.uint8))},
                        attrs={"affine": affine.tolist(), "spacing": [1.0, 1.0, 1.0], "case_name": f"synth_{i:03d}"})
        cid = f"case-{i:03d}"
        raw.write(cid, ds, chunks=tuple(min(s, 128) for s in shape))
        ids.append(cid)
    return ids


def sequential(raw, ids: list[str], out) -> tuple[float, dict[str, float]]:
    """The plain loop: read a case, run the MONAI transforms on it with every core, write it; next case."""
    import monai.transforms
    import numpy as np
    import torch
    import xarray as xr
    from monai.data import MetaTensor

    torch.set_num_threads(os.cpu_count() or 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compose = monai.transforms.Compose([getattr(monai.transforms, name)(**kwargs)
                                            for item in TRANSFORMS for name, kwargs in item.items()])
    phases = {"read": 0.0, "transform": 0.0, "write": 0.0}
    start = time.perf_counter()
    for cid in ids:
        t0 = time.perf_counter()
        ds = xr.open_zarr(raw.url(cid), zarr_format=3, consolidated=False, chunks=None)  # as voxelflow reads
        source = dict(ds.attrs)
        image, label = ds["image"].values, ds["label"].values
        t1 = time.perf_counter()
        affine = torch.as_tensor(np.asarray(source["affine"], dtype=np.float64))
        result = compose({"image": MetaTensor(torch.as_tensor(image.astype(np.float32))[None], affine=affine),
                          "label": MetaTensor(torch.as_tensor(label)[None], affine=affine)})
        image = result["image"].as_tensor().numpy()
        label = np.rint(result["label"].as_tensor().numpy()).astype(np.uint8)
        new_affine = result["image"].affine.numpy()
        t2 = time.perf_counter()
        dims = ("channel", "x", "y", "z")
        attrs = {"case_name": source["case_name"], "source_affine": source["affine"],
                 "source_spacing": source["spacing"], "affine": new_affine.tolist(),
                 "spacing": np.linalg.norm(new_affine[:3, :3], axis=0).tolist()}
        ds = xr.Dataset({"image": (dims, image), "label": (dims, label)}, attrs=attrs)
        out.write(cid, ds, chunks=(1, *(min(s, 128) for s in image.shape[1:])))
        t3 = time.perf_counter()
        phases["read"] += t1 - t0
        phases["transform"] += t2 - t1
        phases["write"] += t3 - t2
    return time.perf_counter() - start, phases


class RssSampler:
    """Peak RSS growth of this process over a block, sampled every 10 ms in a thread."""

    def __init__(self, interval: float = 0.01) -> None:
        import psutil

        self.process, self.interval = psutil.Process(), interval
        self.base = self.peak = 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self.base = self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.base


class ForeignCpu:
    """CPU seconds that processes other than this one and its children (the Dask workers) used over a block.

    The figures are only worth something on an otherwise idle machine: this says whether it was.
    """

    def _ours(self) -> float:
        import psutil

        total = 0.0
        me = psutil.Process()
        for p in [me, *me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
            except psutil.Error:
                pass
        return total

    def _busy(self) -> float:
        import psutil

        t = psutil.cpu_times()
        return t.user + t.system + t.nice + getattr(t, "irq", 0) + getattr(t, "softirq", 0)

    def __enter__(self) -> ForeignCpu:
        self.busy0, self.ours0, self.t0 = self._busy(), self._ours(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = max(0.0, (self._busy() - self.busy0) - (self._ours() - self.ours0))
        self.share = self.seconds / ((time.perf_counter() - self.t0) * (os.cpu_count() or 1))


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def same_arrays(a, b, ids: list[str]) -> bool:
    from voxelflow.data.preprocess import load_case_arrays

    for cid in ids:
        x, y = load_case_arrays(a, cid), load_case_arrays(b, cid)
        if x["image"].tobytes() != y["image"].tobytes() or x["label"].tobytes() != y["label"].tobytes():
            return False
    return True


def wait_until_idle(limit: float = 120.0, busy: float = 25.0) -> float:
    """Wait (at most ``limit`` s) until the machine's CPUs are below ``busy`` % for a second; returns the wait."""
    import psutil

    start = time.perf_counter()
    while time.perf_counter() - start < limit and psutil.cpu_percent(interval=1.0) > busy:
        pass
    return time.perf_counter() - start


def child_sequential(url: str, ids: list[str], prefix: str, tuned: bool) -> dict:
    """The sequential loop in a fresh process: plain (no allocator variables) or with voxelflow's worker settings."""
    from voxelflow.data.cluster import WORKER_ENV

    env = {k: v for k, v in os.environ.items() if k not in WORKER_ENV}  # Dask's nannies copy theirs in here
    if tuned:
        env.update(WORKER_ENV)
    cmd = [sys.executable, __file__, "--child", url, prefix, *ids]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def child_main(url: str, prefix: str, ids: list[str]) -> None:
    from voxelflow.core.storage import CaseStore, Store

    raw = CaseStore(Store(url), "raw")
    sequential(raw, ids[:1], CaseStore(Store(url), f"{prefix}-warm"))  # the process's first case, untimed
    seconds, phases = sequential(raw, ids, CaseStore(Store(url), prefix))
    print(json.dumps({"seconds": seconds, "phases": phases}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shape", type=int, nargs=3, default=SHAPE)
    parser.add_argument("--no-tuned-sequential", action="store_true",
                        help="skip the informational sequential run with voxelflow's worker allocator settings")
    args = parser.parse_args()

    from voxelflow.core.storage import CaseStore, Store
    from voxelflow.data.cluster import dask_client
    from voxelflow.data.preprocess import preprocess
    from voxelflow.spec.config import PreprocessSpec

    tmp = Path(tempfile.mkdtemp(prefix="voxelflow-bench-"))
    try:
        store = Store(tmp)
        raw = CaseStore(store, "raw")
        t = time.perf_counter()
        ids = make_raw(raw, args.cases, tuple(args.shape))
        emit({"setup": "raw cases written", "cases": len(ids), "shape": list(args.shape),
              "transforms": [next(iter(t)) for t in TRANSFORMS], "seconds": round(time.perf_counter() - t, 2)})
        spec = PreprocessSpec(transforms=TRANSFORMS, shard_size=args.shard_size, cluster="local")

        seq_times, vf_times, tuned_times, growths = [], [], [], []
        bytes_written = 0
        with dask_client("local", n_workers=args.workers) as client:
            t = time.perf_counter()
            preprocess(spec, raw, ids[: args.workers], CaseStore(store, "vf-warm"), client=client)  # a case per worker
            emit({"setup": "cluster warm-up job", "seconds": round(time.perf_counter() - t, 2)})
            for r in range(args.repeats):
                waited = wait_until_idle()
                with ForeignCpu() as foreign:
                    plain = child_sequential(str(tmp), ids, f"seq-{r}", tuned=False)
                seq_times.append(plain["seconds"])
                emit({"run": "sequential", "repeat": r, "seconds": round(plain["seconds"], 3),
                      "per_case": round(plain["seconds"] / len(ids), 3),
                      "phases_s": {k: round(v, 2) for k, v in plain["phases"].items()},
                      "torch_threads": os.cpu_count(), "other_processes_cpu_s": round(foreign.seconds, 2),
                      "waited_for_idle_s": round(waited, 1)})

                waited = wait_until_idle()
                vf_out = CaseStore(store, f"vf-{r}")
                with ForeignCpu() as foreign, RssSampler() as rss:
                    t = time.perf_counter()
                    report = preprocess(spec, raw, ids, vf_out, client=client)
                    seconds = time.perf_counter() - t
                assert report.processed == len(ids) and not report.failed, report
                vf_times.append(seconds)
                growths.append(rss.growth)
                bytes_written = report.bytes_written
                emit({"run": "voxelflow", "repeat": r, "seconds": round(seconds, 3),
                      "per_case": round(seconds / len(ids), 3), "workers": args.workers,
                      "shard_size": args.shard_size, "worker_phases_s": report.seconds,
                      "driver_rss_growth_mb": round(rss.growth / 2**20, 1),
                      "bytes_written_mb": round(report.bytes_written / 2**20, 1),
                      "worker_rss_mb": sorted(round(v / 2**20) for v in client.run(_rss).values()),
                      "other_processes_cpu_s": round(foreign.seconds, 2), "waited_for_idle_s": round(waited, 1)})
                if r == 0:
                    emit({"check": "voxelflow's arrays equal the sequential loop's",
                          "value": same_arrays(CaseStore(store, f"seq-{r}"), vf_out, ids)})
                store.remove(f"seq-{r}")
                store.remove(f"vf-{r}")

                if not args.no_tuned_sequential:
                    waited = wait_until_idle()
                    with ForeignCpu() as foreign:
                        tuned = child_sequential(str(tmp), ids, f"tuned-{r}", tuned=True)
                    tuned_times.append(tuned["seconds"])
                    emit({"run": "sequential, voxelflow's worker allocator settings", "repeat": r,
                          "seconds": round(tuned["seconds"], 3), "per_case": round(tuned["seconds"] / len(ids), 3),
                          "phases_s": {k: round(v, 2) for k, v in tuned["phases"].items()},
                          "other_processes_cpu_s": round(foreign.seconds, 2), "waited_for_idle_s": round(waited, 1)})
                    store.remove(f"tuned-{r}")

        seq, vf = statistics.median(seq_times), statistics.median(vf_times)
        summary = {"summary": "median seconds", "sequential": round(seq, 3), "voxelflow": round(vf, 3),
                   "cases": len(ids), "cores": os.cpu_count(), "machine": platform.machine()}
        if tuned_times:
            tuned = statistics.median(tuned_times)
            summary["sequential_tuned_allocator"] = round(tuned, 3)
            summary["speedup_vs_tuned_sequential"] = round(tuned / vf, 3)
        emit(summary)
        emit({"metric": "preprocess_driver_memory_ratio", "value": round(max(growths) / bytes_written, 4),
              "goal": 0.1, "higher_is_better": False})
        emit({"metric": "preprocess_speedup", "value": round(seq / vf, 3), "goal": 1.7, "higher_is_better": True})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        main()
