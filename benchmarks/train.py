"""Training input pipeline, speed against plain MONAI, tracking overhead and memory, side by side.

Volumes of ``--size``³ (default 128) in their own store; the network trains on ``--patch``³ patches
(default 64, two per case, ``RandCropByPosNegLabeld``), batch 2 cases = 4 patches a step.

* ``train_input_efficiency`` = step time on patches staged in memory beforehand ÷ step time through
  voxelflow's loader (cache, augmentation, collation), same network and steps. Goal ≥ 0.95.
* ``train_speedup_vs_monai`` = voxelflow's patches/s (cached preprocessed cases, precision auto: fp32 on a CPU) ÷ a plain
  MONAI ``Dataset`` + ``DataLoader`` loop in fp32 that loads and preprocesses each NIfTI file as it is
  drawn, same patches, network and steps. Goal ≥ 3 on a CPU.
* ``tracking_overhead`` = wall time of the pipeline's training stage (MLflow metrics batched per
  epochs, validation overlays, curve) ÷ the same training with no tracking. Goal ≤ 1.02.
* Peak RSS of a training process whose data set is 4× its cache budget (printed, not a ratio).

Every side runs on ``--device`` (default: the GPU where there is one, else the CPU): voxelflow's
loop, the staged loop, the plain MONAI loop and the training stage alike.

    python benchmarks/train.py [--size 128] [--patch 64] [--cases 6] [--steps 12] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

NETWORK = {"UNet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [8, 16, 32],
                    "strides": [2, 2], "num_res_units": 1}}
PREPROCESS = [
    {"Orientationd": {"keys": ["image", "label"], "axcodes": "RAS"}},
    {"Spacingd": {"keys": ["image", "label"], "pixdim": [1.0, 1.0, 1.0], "mode": ["bilinear", "nearest"]}},
    {"ScaleIntensityRanged": {"keys": "image", "a_min": 0.0, "a_max": 1.0, "b_min": 0.0, "b_max": 1.0,
                              "clip": True}},
]


def patches(size: int) -> list[dict]:
    return [{"RandCropByPosNegLabeld": {"keys": ["image", "label"], "label_key": "label",
                                        "spatial_size": [size] * 3, "pos": 1, "neg": 1, "num_samples": 2}}]


def metric(name: str, value: float, goal: float, higher: bool) -> None:
    print(json.dumps({"metric": name, "value": round(value, 4), "goal": goal, "higher_is_better": higher}),
          flush=True)


def make_data(root: Path, cases: int, size: int):
    """NIfTI files (for the MONAI baseline) and the same cases preprocessed into a store (for voxelflow)."""
    from monai.data import create_test_image_3d

    from voxelflow.core.storage import CaseStore, Store
    from voxelflow.data.preprocess import build_transforms, case_dataset, preprocess_case

    out = CaseStore(Store(root / "store"), "pre/bench")
    transforms = build_transforms(PREPROCESS)
    files = []
    for i in range(cases):
        image, label = create_test_image_3d(size, size, size, num_objs=6, rad_max=size // 6, rad_min=size // 12,
                                            noise_max=0.4, num_seg_classes=1, random_state=np.random.RandomState(i))
        affine = np.diag([1.2, 1.2, 1.2, 1.0])
        paths = {}
        for key, arr in (("image", image.astype(np.float32)), ("label", (label > 0).astype(np.uint8))):
            paths[key] = str(root / f"{key}-{i}.nii.gz")
            nib.save(nib.Nifti1Image(arr, affine), paths[key])
        files.append(paths)
        result = preprocess_case({"image": image.astype(np.float32), "label": (label > 0).astype(np.uint8),
                                  "affine": affine}, transforms)
        out.write(f"case-{i}", case_dataset(result, {}, "bench"))
    return out, files


def train_spec(steps_per_epoch: int, epochs: int, patch: int, precision: str, **over):
    from voxelflow.spec.config import TrainSpec

    return TrainSpec(network=NETWORK, epochs=epochs, batch_size=2, learning_rate=1e-3, precision=precision,
                     checkpoint_every_steps=10**6, seed=0, augment=patches(patch), **over)


def staged_vs_loader(store, ids, patch: int, steps: int, device: str) -> tuple[float, float]:
    """Seconds per step: patches drawn beforehand and held as tensors on ``device``, against voxelflow's
    loader on the same device; the staged loop does what voxelflow's does apart from the input (the
    step's loss read back, a GradScaler for fp16)."""
    import torch

    from voxelflow.core.storage import Store
    from voxelflow.learn import train

    epochs = max(1, steps // (len(ids) // 2))
    spec = train_spec(len(ids) // 2, epochs, patch, "auto")
    cases = train.StoreCases(store, ids, 2**34)
    drawn = train.TrainingSet(cases, spec.augment, spec.seed)
    batches = list(train.StepBatches(len(ids), spec.batch_size, spec.seed, 0, epochs * (len(ids) // 2)))
    dev = torch.device(device)
    staged = [tuple(t.to(dev) for t in train.collate([drawn[k] for k in keys])) for keys in batches]

    torch.manual_seed(0)
    net = train.for_training(train.build_network(spec.network), dev)
    loss_fn, opt = train.build_loss(spec.loss), train.build_optimizer(spec.optimizer, net.parameters(), 1e-3)
    scaler = torch.amp.GradScaler(dev.type, enabled=train.resolve_precision(spec.precision, dev) == "fp16-mixed")
    start = time.perf_counter()
    for x, y in staged:
        opt.zero_grad(set_to_none=True)
        with train.autocast_for(spec.precision, dev):
            loss = loss_fn(net(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        float(loss.detach())
    t_staged = (time.perf_counter() - start) / len(staged)

    with tempfile.TemporaryDirectory() as tmp:
        result = train.train(spec, cases, train.Checkpoints(Store(tmp), "ck"), device=device)
    return t_staged, result.seconds / result.steps


def voxelflow_rate(store, ids, patch: int, steps: int, workers: int, device: str) -> float:
    from voxelflow.core.storage import Store
    from voxelflow.learn import train

    epochs = max(1, steps // (len(ids) // 2))
    spec = train_spec(len(ids) // 2, epochs, patch, "auto", workers=workers)
    cases = train.StoreCases(store, ids, 2**34)  # the cache fill is part of the cost
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = train.train(spec, cases, train.Checkpoints(Store(tmp), "ck"), device=device)
    return result.steps * 4 / (time.perf_counter() - start)


def monai_rate(files, patch: int, steps: int, workers: int, device: str) -> float:
    """A plain MONAI loop on ``device``: Dataset + DataLoader, each file loaded and preprocessed when drawn, fp32."""
    import torch
    from monai.data import DataLoader, Dataset
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    from voxelflow.data.preprocess import build_transforms
    from voxelflow.learn import train

    transform = Compose([LoadImaged(keys=["image", "label"]), EnsureChannelFirstd(keys=["image", "label"]),
                         *build_transforms(PREPROCESS).transforms, *build_transforms(patches(patch)).transforms])
    loader = DataLoader(Dataset(files, transform), batch_size=2, shuffle=True, num_workers=workers)
    torch.manual_seed(0)
    dev = torch.device(device)
    net = train.build_network(NETWORK).to(dev)
    loss_fn = train.build_loss({"DiceCELoss": {"to_onehot_y": True, "softmax": True}})
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    done, start = 0, time.perf_counter()
    while done < steps:
        for batch in loader:
            x, y = batch["image"].as_tensor().to(dev), batch["label"].as_tensor().float().to(dev)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(x), y)
            loss.backward()
            opt.step()
            done += 1
            if done == steps:
                break
    return steps * 4 / (time.perf_counter() - start)


def tracking(root: Path, store, ids, patch: int, steps: int, device: str) -> tuple[float, float]:
    """The pipeline's training stage (MLflow on SQLite) against the same training with no tracking, both
    on ``device`` (``train.devices``: cpu, or 1 GPU), the cache placed as the stage places it."""
    from voxelflow import pipeline
    from voxelflow.core.storage import Store
    from voxelflow.data.preprocess import open_case, transform_digest
    from voxelflow.learn import devices, train
    from voxelflow.spec.config import Settings, load_spec

    epochs = max(2, steps // (len(ids) // 2))
    settings = Settings(home=root / "home")
    spec = load_spec(ROOT / "deployments/specs/demo.yaml", sets=[
        f"train.network={json.dumps(NETWORK)}", f"train.epochs={epochs}", "train.checkpoint_every_steps=1000000",
        f"train.augment={json.dumps(patches(patch))}", "train.val_every=1", f"train.devices={devices_of(device)}",
        f"preprocess.transforms={json.dumps(PREPROCESS)}", f"evaluate.sliding_window.roi_size={[patch] * 3}"])
    ctx = pipeline.Context(settings, spec.name)
    digest = transform_digest(spec.preprocess)
    target = ctx.layout.preprocessed(digest)
    for cid in ids:  # the benchmark's cases, placed where the stage looks for them
        target.write(cid, open_case(store, cid).load())
    train_ids, val_ids = ids[:-1], ids[-1:]
    pipeline.ensure_tracking(ctx)
    times = {}
    for side in ("without", "with", "without", "with"):
        start = time.perf_counter()
        if side == "with":
            run = pipeline.start_run(spec, ctx, "bench", None)
            pipeline.train_stage(spec, ctx, train_ids, run, val_ids)
        else:
            where = devices.placement(spec.train.devices, devices.visible_gpus(), spec.train.batch_size)
            cache_device, budget = devices.cache_placement(
                spec.train.cache_mb * 2**20, where, spec.train.workers,
                devices.free_gpu_bytes() if where.kind == "cuda" else None)
            cases = train.StoreCases(target, train_ids, budget, cache_device)
            val = train.Validation(train.StoreCases(target, val_ids, max(0, budget - cases.cached_bytes),
                                                    cache_device), (patch,) * 3)
            with tempfile.TemporaryDirectory() as tmp:
                train.train(spec.train, cases, train.Checkpoints(Store(tmp), "ck"), val)
        times.setdefault(side, []).append(time.perf_counter() - start)
    return min(times["with"]), min(times["without"])


RSS_CHILD = """
import json, sys, tempfile
sys.path[:0] = {paths!r}
from voxelflow.learn import train
from voxelflow.core.storage import CaseStore, Store
from voxelflow.spec.config import TrainSpec
store = CaseStore(Store({store!r}), {prefix!r})
spec = TrainSpec(**json.loads({spec!r}))
import torch, monai.networks.nets  # noqa: F401 - what any training process holds, before data
def hwm():  # VmHWM: this process's peak RSS (ru_maxrss would carry the parent's over exec)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
base = hwm()
cases = train.StoreCases(store, {ids!r}, spec.cache_mb * 2**20)
with tempfile.TemporaryDirectory() as tmp:
    train.train(spec, cases, train.Checkpoints(Store(tmp), "ck"))
peak = hwm()
print(json.dumps({{"cases_cached": cases.cached, "imports_mib": round(base), "peak_mib": round(peak),
                  "peak_above_imports_mib": round(peak - base)}}))
"""


def devices_of(device: str) -> str | int:
    """``train.devices`` for a benchmark device: the CPU, or one GPU."""
    return "cpu" if device == "cpu" else 1


def peak_rss(store, ids, patch: int, device: str) -> dict:
    """A training process with a cache budget of a quarter of its data set."""
    total = sum(int(np.prod(train_shape(store, cid))) * 5 for cid in ids)  # float32 image + uint8 label
    budget_mb = max(1, int(total / 4 / 2**20))
    spec = train_spec(len(ids) // 2, 2, patch, "auto", cache_mb=budget_mb,
                      devices=devices_of(device)).model_dump(mode="json")
    code = RSS_CHILD.format(paths=[str(ROOT), str(ROOT / "src")], store=store.store.url, prefix=store.prefix,
                            spec=json.dumps(spec), ids=ids)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {"data_set_mib": round(total / 2**20, 1), "cache_budget_mib": budget_mb, **result}


def train_shape(store, cid):
    from voxelflow.data.preprocess import open_case

    return open_case(store, cid)["image"].shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers of both sides")
    parser.add_argument("--only", choices=["all", "input", "speed", "memory", "tracking"], default="all",
                        help="one part of the benchmark")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="where every side trains (default: cuda where there is a GPU, else cpu)")
    args = parser.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"# {args.cases} volumes of {args.size}^3, {args.patch}^3 patches, 4 a step, {args.steps} steps, "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} cores, every side on {device}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store, files = make_data(root, args.cases, args.size)
        ids = [f"case-{i}" for i in range(args.cases)]
        part = {p: args.only in ("all", p) for p in ("input", "speed", "memory", "tracking")}
        if part["input"]:
            staged, loader = staged_vs_loader(store, ids, args.patch, args.steps, device)
            print(f"# step: staged {staged:.3f} s, through the loader {loader:.3f} s", flush=True)
            metric("train_input_efficiency", staged / loader, 0.95, True)
        if part["speed"]:
            ours = voxelflow_rate(store, ids, args.patch, args.steps, args.workers, device)
            theirs = monai_rate(files, args.patch, args.steps, args.workers, device)
            print(f"# patches/s: voxelflow {ours:.2f}, plain MONAI {theirs:.2f}", flush=True)
            metric("train_speedup_vs_monai", ours / theirs, 3.0, True)
        if part["memory"]:
            rss = peak_rss(store, ids, args.patch, device)
            print(f"# data set 4x the cache budget: {json.dumps(rss)}; this process "
                  f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB", flush=True)
        if part["tracking"]:
            with_t, without_t = tracking(root, store, ids, args.patch, args.steps, device)
            print(f"# training stage: with tracking {with_t:.2f} s, without {without_t:.2f} s", flush=True)
            metric("tracking_overhead", with_t / without_t, 1.02, False)

if __name__ == "__main__":
    main()
