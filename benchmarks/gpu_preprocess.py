"""GPU preprocessing: voxelflow's preprocessing with ``device="cuda"`` on a LocalCUDACluster vs the CPU LocalCluster.

The same synthetic raw cases (256³ float32 at 1 mm, LPS, with a label) are preprocessed
(Orientationd RAS, Spacingd 1.5 mm, ScaleIntensityRanged) twice on this machine, by
``voxelflow.data.preprocess.preprocess``:

* cpu: a CPU LocalCluster, one single-threaded worker per core, transforms on the CPU;
* gpu: a LocalCUDACluster (one worker per GPU, a few threads each), transforms on the GPU.

Clusters are started and warmed (a warm-up job each) before anything is timed; each side runs
``--repeats`` times, and the ratio of the medians (cpu ÷ gpu) is printed as the last line, one
JSON object. Both outputs are compared (the GPU's float arithmetic differs slightly: the largest
image difference and the share of label voxels that differ are printed).

Where there is no CUDA device or no dask-cuda, it says so, prints the metric with ``"value": null``
and exits 0. Needs only torch, monai, dask, distributed, dask-cuda, zarr, xarray, numpy, fsspec and
this repository's ``src`` (no pydantic, Prefect or MLflow). Takes about 1-3 minutes on one GPU.
Run from the repository root: ``python benchmarks/gpu_preprocess.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, "src")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

METRIC = "gpu_preprocess_speedup"
GOAL = 3.0  # the GPU path against every CPU core of the same node
TRANSFORMS = [
    {"Orientationd": {"keys": ["image", "label"], "axcodes": "RAS"}},
    {"Spacingd": {"keys": ["image", "label"], "pixdim": [1.5, 1.5, 1.5], "mode": ["bilinear", "nearest"]}},
    {"ScaleIntensityRanged": {"keys": "image", "a_min": 0.0, "a_max": 1.0, "b_min": 0.0, "b_max": 1.0,
                              "clip": True}},
]
SHAPE = (256, 256, 256)  # a 1 mm brain MRI in FreeSurfer's conformed space


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def missing() -> str | None:
    """Why this machine cannot run the comparison, or None."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    for module in ("dask_cuda", "monai", "distributed", "zarr", "xarray", "fsspec"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
    return None


def make_raw(raw, n: int, shape: tuple[int, int, int]) -> list[str]:
    import numpy as np
    import xarray as xr
    from monai.data import create_test_image_3d

    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[:3, 3] = [s / 2 for s in shape]
    bases = []  # a few distinct volumes, each stored under several case ids: what they hold costs the same
    for i in range(min(n, 4)):
        image, label = create_test_image_3d(*shape, num_objs=6, rad_max=30, rad_min=8, noise_max=0.3,
                                            num_seg_classes=1, random_state=np.random.RandomState(i))
        bases.append((image.astype(np.float32), (label > 0).astype(np.uint8)))
    ids = []
    for i in range(n):
        image, label = bases[i % len(bases)]
        ds = xr.Dataset({"image": (("x", "y", "z"), image), "label": (("x", "y", "z"), label)},
                        attrs={"affine": affine.tolist(), "spacing": [1.0, 1.0, 1.0], "case_name": f"synth_{i:03d}"})
        cid = f"case-{i:03d}"
        raw.write(cid, ds, chunks=tuple(min(s, 128) for s in shape))
        ids.append(cid)
    return ids


def side(name: str, client, spec, raw, ids, store, repeats: int) -> tuple[list[float], object]:
    from voxelflow.core.storage import CaseStore
    from voxelflow.data.preprocess import preprocess

    workers = client.scheduler_info()["workers"]
    t = time.perf_counter()
    preprocess(spec, raw, ids[: max(1, len(workers))], CaseStore(store, f"{name}-warm"), client=client)
    emit({"setup": f"{name} warm-up job", "workers": len(workers),
          "threads": sum(w["nthreads"] for w in workers.values()), "seconds": round(time.perf_counter() - t, 2)})
    times, out = [], None
    for r in range(repeats):
        out = CaseStore(store, f"{name}-{r}")
        t = time.perf_counter()
        report = preprocess(spec, raw, ids, out, client=client)
        seconds = time.perf_counter() - t
        if report.failed or report.processed != len(ids):
            raise RuntimeError(f"{name}: {report.processed} processed, failed: {report.failed[:3]}")
        times.append(seconds)
        emit({"run": name, "repeat": r, "seconds": round(seconds, 3), "per_case": round(seconds / len(ids), 4),
              "worker_phases_s": report.seconds})
    return times, out


def compare(cpu_out, gpu_out, ids: list[str]) -> dict:
    import numpy as np

    from voxelflow.data.preprocess import load_case_arrays

    worst, differing, voxels = 0.0, 0, 0
    for cid in ids:
        a, b = load_case_arrays(cpu_out, cid), load_case_arrays(gpu_out, cid)
        if a["image"].shape != b["image"].shape:
            return {"check": "gpu output matches cpu output", "value": False, "case": cid,
                    "shapes": [list(a["image"].shape), list(b["image"].shape)]}
        worst = max(worst, float(np.abs(a["image"] - b["image"]).max()))
        differing += int((a["label"] != b["label"]).sum())
        voxels += a["label"].size
    return {"check": "gpu output matches cpu output", "value": worst < 1e-3 and differing / voxels < 0.01,
            "max_abs_image_difference": worst, "label_voxels_differing": differing / voxels}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=2)
    parser.add_argument("--cpu-workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--shape", type=int, nargs=3, default=SHAPE)
    args = parser.parse_args()

    reason = missing()
    if reason:
        print(f"gpu_preprocess: skipped: {reason}", file=sys.stderr)
        emit({"metric": METRIC, "value": None, "goal": GOAL, "higher_is_better": True, "skipped": reason})
        return 0
    warnings.simplefilter("ignore", FutureWarning)

    import torch

    from voxelflow.core.storage import CaseStore, Store
    from voxelflow.data.cluster import dask_client

    tmp = Path(tempfile.mkdtemp(prefix="voxelflow-gpu-bench-"))
    try:
        store = Store(tmp)
        raw = CaseStore(store, "raw")
        t = time.perf_counter()
        ids = make_raw(raw, args.cases, tuple(args.shape))
        emit({"setup": "raw cases written", "cases": len(ids), "shape": list(args.shape),
              "gpu": torch.cuda.get_device_name(0), "cores": os.cpu_count(), "seconds": round(time.perf_counter() - t, 2)})

        cpu_spec = SimpleNamespace(transforms=TRANSFORMS, shard_size=args.shard_size, device="cpu")
        gpu_spec = SimpleNamespace(transforms=TRANSFORMS, shard_size=args.shard_size, device="cuda")
        t = time.perf_counter()
        with dask_client("local", n_workers=args.cpu_workers) as client:
            emit({"setup": "cpu cluster started", "seconds": round(time.perf_counter() - t, 2)})
            cpu_times, cpu_out = side("cpu", client, cpu_spec, raw, ids, store, args.repeats)
        t = time.perf_counter()
        with dask_client("cuda", device="cuda") as client:
            emit({"setup": "cuda cluster started", "seconds": round(time.perf_counter() - t, 2)})
            gpu_times, gpu_out = side("gpu", client, gpu_spec, raw, ids, store, args.repeats)

        emit(compare(cpu_out, gpu_out, ids))
        cpu, gpu = statistics.median(cpu_times), statistics.median(gpu_times)
        emit({"summary": "median seconds", "cpu": round(cpu, 3), "gpu": round(gpu, 3), "cases": len(ids)})
        emit({"metric": METRIC, "value": round(cpu / gpu, 3), "goal": GOAL, "higher_is_better": True})
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
