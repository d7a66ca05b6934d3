"""GPU training: samples/s, model-FLOPs utilisation and the GPU-busy fraction of voxelflow's training step.

For SegResNet and UNet on ``--size``³ patches (default 96 and 128), bf16-mixed, batch ``--batch``,
cases cached on the GPU and patches sampled there (``voxelflow.train``: StoreCases on the device,
ThreadDataLoader), each network trains ``--steps`` steps after ``--warmup`` untimed ones, eager and
with ``torch.compile`` where it compiles:

* ``samples_per_s``: patches a second through voxelflow's loop;
* ``mfu``: FLOPs of one step (``torch.utils.flop_counter.FlopCounterMode``, forward + backward) × steps/s
  ÷ the bf16 matmul peak measured in this script (large ``torch.matmul`` in bf16);
* ``gpu_busy``: the share of the timed wall time the GPU spent in kernels (CUDA events around the
  steps give the wall time; the profiler's kernel time gives the busy time).

Goals: MFU ≥ 0.30 for SegResNet, busy ≥ 0.95. Metrics are JSON lines
``gpu_train_mfu_segresnet``, ``gpu_train_busy_segresnet``, ``gpu_train_samples_per_s_segresnet`` (and
``_unet``). Without a CUDA device it says so, prints the metrics with ``"value": null`` and exits 0.

    python benchmarks/gpu_train.py [--size 96 128] [--steps 20] [--batch 2] [--no-compile]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

NETWORKS = {
    "segresnet": {"SegResNet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "init_filters": 16,
                                "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1]}},
    "unet": {"UNet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [16, 32, 64, 128, 256],
                      "strides": [2, 2, 2, 2], "num_res_units": 2}},
}
GOALS = {"mfu": 0.30, "busy": 0.95}


def metric(name: str, value, goal, higher: bool = True) -> None:
    print(json.dumps({"metric": name, "value": None if value is None else round(float(value), 4), "goal": goal,
                      "higher_is_better": higher}), flush=True)


def matmul_peak(dtype) -> float:
    """FLOP/s of large bf16 matmuls on this GPU: the peak MFU is measured against."""
    import torch

    n = 8192
    a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    reps, start = 20, time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def step_flops(net, loss_fn, x, y) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    from voxelflow.train import autocast_for

    counter = FlopCounterMode(display=False)
    with counter, autocast_for("bf16-mixed", x.device):
        loss_fn(net(x), y).backward()
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def run(name: str, size: int, steps: int, warmup: int, batch: int, compile_: bool, root: Path) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from voxelflow import train
    from voxelflow.config import TrainSpec
    from voxelflow.preprocess import case_dataset
    from voxelflow.storage import CaseStore, Store

    full = size + size // 2  # cases larger than the patches, so patches are really sampled
    out = CaseStore(Store(root / f"{name}-{size}"), "pre")
    rng = np.random.default_rng(0)
    for i in range(4):
        image = rng.random((1, full, full, full), dtype=np.float32)
        label = (image > 0.7).astype(np.uint8)
        out.write(f"case-{i}", case_dataset({"image": image, "label": label, "affine": np.eye(4)}, {}, "gpu"))
    cases = train.StoreCases(out, [f"case-{i}" for i in range(4)], 2**34, device="cuda")
    augment = [{"RandCropByPosNegLabeld": {"keys": ["image", "label"], "label_key": "label",
                                           "spatial_size": [size] * 3, "num_samples": 1}}]
    spec = TrainSpec(network=NETWORKS[name], batch_size=batch, precision="bf16-mixed", epochs=1, augment=augment)
    net = train.build_network(spec.network).cuda()
    loss_fn = train.build_loss(spec.loss)
    opt = train.build_optimizer(spec.optimizer, net.parameters(), 1e-4)
    dataset = train.TrainingSet(cases, augment, 0)
    total = warmup + steps
    loader = train.make_loader(dataset, train.StepBatches(4, batch, 0, 0, total * 2), 0, torch.device("cuda"))
    model = torch.compile(net) if compile_ else net
    batches = iter(loader)
    x0, y0 = next(batches)
    flops = step_flops(net, loss_fn, x0.cuda(), y0.cuda())

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        with train.autocast_for("bf16-mixed", x.device):
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        x, y = next(batches)
        step(x.cuda(), y.cuda())
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(steps):
            x, y = next(batches)
            step(x.cuda(non_blocking=True), y.cuda(non_blocking=True))
        end.record()
        torch.cuda.synchronize()
    wall_s = begin.elapsed_time(end) / 1000
    kernel_s = sum(e.self_device_time_total for e in prof.key_averages()) / 1e6  # microseconds of kernels
    busy = min(1.0, kernel_s / wall_s)
    return {"network": name, "size": size, "compile": compile_, "samples_per_s": steps * batch / wall_s,
            "step_tflop": flops / 1e12, "achieved_tflops": flops * steps / wall_s / 1e12, "busy": busy,
            "kernel_s": kernel_s, "wall_s": wall_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, nargs="+", default=[96, 128])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("# no CUDA device (torch.cuda.is_available() is False): nothing measured", flush=True)
        for name in NETWORKS:
            metric(f"gpu_train_mfu_{name}", None, GOALS["mfu"])
            metric(f"gpu_train_busy_{name}", None, GOALS["busy"])
        return
    peak = matmul_peak(torch.bfloat16)
    print(f"# {torch.cuda.get_device_name()}: bf16 matmul peak measured {peak / 1e12:.1f} TFLOP/s", flush=True)
    best: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in NETWORKS:
            for size in args.size:
                for compile_ in ([False] if args.no_compile else [False, True]):
                    try:
                        r = run(name, size, args.steps, args.warmup, args.batch, compile_, Path(tmp))
                    except Exception as exc:  # noqa: BLE001 - torch.compile may not handle a network: say so
                        print(f"# {name} {size}^3 compile={compile_}: {type(exc).__name__}: {exc}", flush=True)
                        continue
                    r["mfu"] = r["achieved_tflops"] * 1e12 / peak
                    print("# " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}),
                          flush=True)
                    if name not in best or r["mfu"] > best[name]["mfu"]:
                        best[name] = r
    for name in NETWORKS:
        r = best.get(name)
        metric(f"gpu_train_samples_per_s_{name}", r and r["samples_per_s"], None)
        metric(f"gpu_train_mfu_{name}", r and r["mfu"], GOALS["mfu"])
        metric(f"gpu_train_busy_{name}", r and r["busy"], GOALS["busy"])


if __name__ == "__main__":
    main()
