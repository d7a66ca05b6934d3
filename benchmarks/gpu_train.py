"""GPU training: samples/s, model-FLOPs utilisation and the GPU-busy fraction of voxelflow's own training loop.

Each network (SegResNet and UNet) at each ``--size`` (default 96 and 128) trains through
``voxelflow.learn.train.train`` itself, on preprocessed cases staged in a case store (cached on the GPU
within the budget the pipeline gives it, ``voxelflow.learn.devices.cache_placement``), with
``RandCropByPosNegLabeld`` drawing ``--samples`` patches of ``--size``³ per case and ``--batch``
cases a step, in bf16-mixed: the loop with its per-step loss read-back, GradScaler, loader thread
and epoch bookkeeping, not a loop of this script's own. The script only watches it: a CUDA event
is recorded when the loop receives each batch and another when its optimizer has stepped (a
wrapper around the loader and an optimizer step hook); the first ``--warmup`` steps are not timed.

* ``gpu_samples_per_s``: the patches of the timed batches, as the loop received them (counted from
  the batches, never ``steps × batch``), ÷ the time from the first timed step's start event to the
  last one's end event;
* ``gpu_busy_fraction``: the time inside steps (each step's start event to its end event) ÷ that
  same span; the rest is the GPU waiting between steps (for the next batch, epoch bookkeeping).
  Not clamped: a value over 1 would be a measurement error and is printed as it is;
* ``gpu_mfu_bf16``: FLOPs of one step (``torch.utils.flop_counter.FlopCounterMode`` over forward
  and backward of the same network on a batch of the same shape, in bf16 autocast) × timed steps
  ÷ the span, ÷ the bf16 matmul peak measured here (8192² ``torch.matmul``, ``--peak-seconds`` ≥ 2 s
  after a warm-up, so the clocks have ramped).

* ``gpu_deterministic_slowdown``: the cost of ``train.deterministic`` (deterministic cuDNN, no
  autotuning, TF32 off): the headline run's samples/s ÷ those of the same run with it, measured
  right after the headline (``gpu_samples_per_s_deterministic``); ``--no-deterministic`` skips it.

The headline metrics are SegResNet's at the largest size (goals: MFU ≥ 0.30, busy ≥ 0.95), run
first and printed as soon as they are measured; the other runs print as ``gpu_*_<network>_<size>``. Without a CUDA device (``--cpu`` forces it) the same
measurement runs on the CPU on a tiny network in fp32, every line labelled as a CPU smoke run, and
the GPU metrics print with ``"value": null`` and the reason; it exits 0. Needs torch, monai, zarr,
xarray, pydantic, pyyaml, fsspec and safetensors (no Prefect, no MLflow).

    python benchmarks/gpu_train.py [--size 96 128] [--steps 20] [--warmup 5] [--batch 2] [--samples 2]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

NETWORKS = {
    "segresnet": {"SegResNet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "init_filters": 16,
                                "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1]}},
    "unet": {"UNet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [16, 32, 64, 128, 256],
                      "strides": [2, 2, 2, 2], "num_res_units": 2}},
}
CPU_NETWORKS = {"unet": {"UNet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8],
                                  "strides": [2], "num_res_units": 0}}}
LOSS = {"DiceCELoss": {"to_onehot_y": True, "softmax": True}}
GOALS = {"mfu": 0.30, "busy": 0.95}
MIN_PEAK_SECONDS = 2.0


def metric(name: str, value: float | None, goal: float | None, higher: bool = True, **extra: Any) -> None:
    print(json.dumps({"metric": name, "value": None if value is None else round(float(value), 4), "goal": goal,
                      "higher_is_better": higher, **extra}), flush=True)


def note(obj: dict[str, Any]) -> None:
    print("# " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in obj.items()}), flush=True)


def measure_peak(run_once: Callable[[], None], flops_per_call: float, sync: Callable[[], None],
                 min_seconds: float = MIN_PEAK_SECONDS, warmup_seconds: float = 0.5, sync_every: int = 10,
                 clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """FLOP/s of ``run_once`` (``flops_per_call`` each): calls for ``warmup_seconds`` untimed, then timed
    calls until at least ``min_seconds`` have passed, synchronising every ``sync_every`` calls and at
    the end, so the time is that of work done, not queued."""
    start = clock()
    while clock() - start < warmup_seconds:
        for _ in range(sync_every):
            run_once()
        sync()
    calls, start = 0, clock()
    while True:
        run_once()
        calls += 1
        if calls % sync_every == 0:
            sync()
            elapsed = clock() - start
            if elapsed >= min_seconds:
                break
    return {"flops_per_s": flops_per_call * calls / elapsed, "seconds": elapsed, "calls": calls}


def matmul_peak(device, dtype, min_seconds: float, n: int = 8192) -> dict[str, float]:
    """The matmul peak of this device in ``dtype``: what MFU is measured against."""
    import torch

    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return measure_peak(lambda: torch.matmul(a, b, out=out), 2.0 * n**3, sync, min_seconds,
                        warmup_seconds=0.5 if device.type == "cuda" else 0.0,
                        sync_every=10 if device.type == "cuda" else 1)


def step_flops(net, loss_fn, x, y, precision: str) -> int:
    """FLOPs of one training step's forward and backward (FlopCounterMode counts convolutions and
    matmuls, the work MFU is about), under the step's autocast."""
    from torch.utils.flop_counter import FlopCounterMode

    from voxelflow.learn.train import autocast_for

    counter = FlopCounterMode(display=False)
    with counter:
        with autocast_for(precision, x.device):
            loss = loss_fn(net(x), y)
        loss.backward()
    net.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def span_figures(spans: list[tuple[float, float]], samples: int) -> dict[str, float]:
    """From each timed step's (start, end) in seconds on one clock, and the samples of those steps:
    the span from the first start to the last end, the share of it inside steps (unclamped) and samples/s."""
    if not spans:
        raise ValueError("no timed steps: raise --steps")
    span = spans[-1][1] - spans[0][0]
    inside = sum(end - start for start, end in spans)
    return {"span_s": span, "busy": inside / span, "samples_per_s": samples / span, "steps": len(spans)}


class StepTimer:
    """Marks around each step of voxelflow's loop: a start when the loop receives a batch (before it
    moves it to the device), an end when its optimizer has stepped. On a GPU the marks are CUDA
    events on the current stream (GPU time); on the CPU, host clock readings."""

    def __init__(self, device, warmup: int) -> None:
        self.cuda, self.warmup = device.type == "cuda", warmup
        self.marks: list[list[Any]] = []  # [start, end or None] of each timed step
        self.seen = self.samples = 0
        self.batch_shapes: set[tuple[int, ...]] = set()

    def _mark(self):
        import torch

        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _close(self) -> None:
        if self.marks and self.marks[-1][1] is None:  # a step whose optimizer step was skipped (fp16 overflow)
            self.marks[-1][1] = self._mark()

    def on_batch(self, x) -> None:
        self._close()
        self.seen += 1
        if self.seen > self.warmup:
            self.samples += int(x.shape[0])
            self.batch_shapes.add(tuple(x.shape))
            self.marks.append([self._mark(), None])

    def on_step(self, *_args) -> None:
        if self.seen > self.warmup and self.marks and self.marks[-1][1] is None:
            self.marks[-1][1] = self._mark()

    def spans(self) -> list[tuple[float, float]]:
        import torch

        self._close()
        if self.cuda:
            torch.cuda.synchronize()
            first = self.marks[0][0]
            return [(first.elapsed_time(s) / 1000, first.elapsed_time(e) / 1000) for s, e in self.marks]
        first = self.marks[0][0] if self.marks else 0.0
        return [(s - first, e - first) for s, e in self.marks]


class _Watched:
    def __init__(self, loader, timer: StepTimer) -> None:
        self.loader, self.timer = loader, timer

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            self.timer.on_batch(x)
            yield x, y


@contextmanager
def watching(timer: StepTimer):
    """voxelflow's loop, unchanged, with the timer's marks: its loader wrapped, its optimizer hooked."""
    from voxelflow.learn import train

    make_loader, build_optimizer = train.make_loader, train.build_optimizer

    def loader(*args, **kwargs):
        return _Watched(make_loader(*args, **kwargs), timer)

    def optimizer(*args, **kwargs):
        opt = build_optimizer(*args, **kwargs)
        opt.register_step_post_hook(timer.on_step)
        return opt

    train.make_loader, train.build_optimizer = loader, optimizer
    try:
        yield timer
    finally:
        train.make_loader, train.build_optimizer = make_loader, build_optimizer


def stage_cases(root: Path, size: int, n: int = 4):
    """``n`` preprocessed cases of 1.5 × ``size`` a side in a case store, so patches are really sampled."""
    from voxelflow.core.storage import CaseStore, Store
    from voxelflow.data.preprocess import case_dataset

    full = size + size // 2
    out = CaseStore(Store(root), "pre/bench")
    rng = np.random.default_rng(0)
    for i in range(n):
        image = rng.random((1, full, full, full), dtype=np.float32)
        label = (image > 0.7).astype(np.uint8)
        out.write(f"case-{i}", case_dataset({"image": image, "label": label, "affine": np.eye(4)}, {}, "bench"))
    return out, [f"case-{i}" for i in range(n)]


def run(network: dict, size: int, steps: int, warmup: int, batch: int, samples: int, precision: str, device,
        root: Path, deterministic: bool = False) -> dict[str, Any]:
    """One network trained by ``voxelflow.learn.train.train`` for ``warmup + steps`` steps (whole epochs), with
    ``train.deterministic`` as given."""
    import torch

    from voxelflow.learn import devices, train
    from voxelflow.spec.config import TrainSpec

    store, ids = stage_cases(root, size)
    augment = [{"RandCropByPosNegLabeld": {"keys": ["image", "label"], "label_key": "label",
                                           "spatial_size": [size] * 3, "pos": 1, "neg": 1,
                                           "num_samples": samples}}]
    per_epoch = math.ceil(len(ids) / batch)
    epochs = math.ceil((warmup + steps) / per_epoch)
    spec = TrainSpec(network=network, loss=LOSS, batch_size=batch, precision=precision, epochs=epochs,
                     augment=augment, checkpoint_every_steps=10**6, seed=0, devices=1, workers=0,
                     deterministic=deterministic)
    where = devices.placement(spec.devices, devices.visible_gpus(), spec.batch_size, str(device))
    cache_device, budget = devices.cache_placement(spec.cache_mb * 2**20, where, spec.workers,
                                                   devices.free_gpu_bytes() if where.kind == "cuda" else None)
    cases = train.StoreCases(store, ids, budget, cache_device)

    torch.manual_seed(0)
    net = train.build_network(network).to(device)
    x = torch.rand(batch * samples, 1, size, size, size, device=device)
    y = torch.randint(0, 2, (batch * samples, 1, size, size, size), device=device).float()
    flops = step_flops(net, train.build_loss(LOSS), x, y, precision)
    del net, x, y
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    timer = StepTimer(device, warmup)
    with watching(timer), tempfile.TemporaryDirectory() as tmp:
        from voxelflow.core.storage import Store

        result = train.train(spec, cases, train.Checkpoints(Store(tmp), "ck"), device=str(device))
    figures = span_figures(timer.spans(), timer.samples)
    out = {"steps_total": result.steps, "steps_timed": figures["steps"], "patches_timed": timer.samples,
           "batch_shapes": sorted(timer.batch_shapes), "cached_cases": cases.cached,
           "step_gflop": flops / 1e9, "span_s": figures["span_s"], "samples_per_s": figures["samples_per_s"],
           "busy": figures["busy"], "achieved_tflops": flops * figures["steps"] / figures["span_s"] / 1e12,
           "determinism": result.determinism}
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def deterministic_cost(plain: dict[str, Any] | None, network: dict, size: int, steps: int, warmup: int, batch: int,
                       samples: int, precision: str, device, root: Path, gpu: str, label: str) -> None:
    """The run of ``plain`` again with ``train.deterministic``: its samples/s and the slowdown (plain ÷ it)."""
    what = f"samples/s of train.deterministic false / true, {next(iter(network))} at {size}^3"
    try:
        r = run(network, size, steps, warmup, batch, samples, precision, device, root, deterministic=True)
    except Exception as exc:  # noqa: BLE001 - reported; the other runs go on
        note({"run": label, "size": size, "deterministic": True, "error": f"{type(exc).__name__}: {exc}"})
        r = None
    if r is not None:
        note({"run": label, "network": f"{next(iter(network)).lower()} (deterministic)", "size": size,
              "precision": precision, **r})
    why = {} if r and plain else {"reason": "the plain or the deterministic run failed (see above)"}
    metric("gpu_samples_per_s_deterministic", r and r["samples_per_s"], None, gpu=gpu, **why)
    slowdown = plain["samples_per_s"] / r["samples_per_s"] if r and plain else None
    metric("gpu_deterministic_slowdown", slowdown, None, higher=False, gpu=gpu, note=what, **why)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, nargs="+", default=None, help="patch sizes (default 96 128; CPU 16)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; CPU 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; CPU 1)")
    parser.add_argument("--batch", type=int, default=2, help="cases a step")
    parser.add_argument("--samples", type=int, default=None, help="patches a case (default 2; CPU 1)")
    parser.add_argument("--peak-seconds", type=float, default=MIN_PEAK_SECONDS,
                        help=f"timed seconds of the matmul peak (at least {MIN_PEAK_SECONDS} on a GPU)")
    parser.add_argument("--networks", nargs="+", default=None, help="of: " + " ".join(NETWORKS))
    parser.add_argument("--cpu", action="store_true", help="the CPU smoke run even where there is a GPU")
    parser.add_argument("--no-deterministic", action="store_true",
                        help="skip the headline's second run with train.deterministic (its cost)")
    args = parser.parse_args(argv)
    import torch

    from voxelflow.learn import devices

    reason = None
    if args.cpu:
        reason = "--cpu asked for"
    elif not torch.cuda.is_available():
        reason = "no CUDA device (torch.cuda.is_available() is False)"
    elif not devices.bf16_native():
        reason = f"{torch.cuda.get_device_name()} has no native bf16 (the MFU goal is for bf16)"
    gpu = reason is None
    device = torch.device("cuda" if gpu else "cpu")
    if gpu and args.peak_seconds < MIN_PEAK_SECONDS:
        parser.error(f"--peak-seconds must be at least {MIN_PEAK_SECONDS} on a GPU (clocks ramp up), "
                     f"not {args.peak_seconds}")
    sizes = args.size or ([96, 128] if gpu else [16])
    steps, warmup = args.steps or (20 if gpu else 3), args.warmup if args.warmup is not None else (5 if gpu else 1)
    samples = args.samples or (2 if gpu else 1)
    networks = NETWORKS if gpu else CPU_NETWORKS
    if args.networks:
        unknown = sorted(set(args.networks) - set(NETWORKS))
        if unknown:
            parser.error(f"unknown networks {unknown}: choose from {sorted(NETWORKS)}")
        networks = {k: v for k, v in NETWORKS.items() if k in args.networks} if gpu else networks
    precision = "bf16-mixed" if gpu else "fp32"
    label = "gpu" if gpu else "cpu smoke run, not a GPU figure"
    if not gpu:
        print(f"# CPU smoke run ({reason}): the same measurement on the CPU, a tiny UNet in fp32, host clock; "
              "its figures say nothing about a GPU", flush=True)

    dtype = torch.bfloat16 if gpu else torch.float32
    peak = matmul_peak(device, dtype, args.peak_seconds, n=8192 if gpu else 256)
    name = torch.cuda.get_device_name() if gpu else "cpu"
    note({"run": label, "device": name, "torch": torch.__version__, "matmul_peak_tflops": peak["flops_per_s"] / 1e12,
          "peak_dtype": str(dtype).removeprefix("torch."), "peak_seconds": peak["seconds"],
          "peak_calls": peak["calls"],
          "cudnn_benchmark": torch.backends.cudnn.benchmark, "cudnn_deterministic": torch.backends.cudnn.deterministic,
          "tf32_conv": torch.backends.cudnn.allow_tf32})
    head = ("segresnet", max(sizes))
    plan = [(n, size) for n in networks for size in sizes]
    plan.sort(key=lambda item: item != head)  # the headline first: a time limit cuts the others, not it
    got_head = False
    with tempfile.TemporaryDirectory() as tmp:
        for net_name, size in plan:
            try:
                r = run(networks[net_name], size, steps, warmup, args.batch, samples, precision, device,
                        Path(tmp) / f"{net_name}-{size}")
            except Exception as exc:  # noqa: BLE001 - one network failing (out of memory) leaves the others
                note({"run": label, "network": net_name, "size": size, "error": f"{type(exc).__name__}: {exc}"})
                if not gpu:
                    raise  # on the CPU smoke run nothing is allowed to fail: that is what it is for
                r = None
            if r is not None:
                r["mfu"] = r["achieved_tflops"] * 1e12 / peak["flops_per_s"]
                note({"run": label, "network": net_name, "size": size, "precision": precision, **r})
            if not gpu:
                continue
            suffix = "" if (net_name, size) == head else f"_{net_name}_{size}"
            why = {} if r else {"reason": f"{net_name} at {size}^3 failed (see the line above)"}
            metric(f"gpu_samples_per_s{suffix}", r and r["samples_per_s"], None, gpu=name, **why)
            metric(f"gpu_busy_fraction{suffix}", r and r["busy"], GOALS["busy"], gpu=name, **why)
            metric(f"gpu_mfu_bf16{suffix}", r and r["mfu"], GOALS["mfu"], gpu=name, **why)
            got_head = got_head or not suffix
            if not suffix and not args.no_deterministic:  # the cost of train.deterministic, on the headline
                deterministic_cost(r, networks[net_name], size, steps, warmup, args.batch, samples, precision,
                                   device, Path(tmp) / f"{net_name}-{size}-deterministic", name, label)
    if not gpu:
        metric("gpu_deterministic_slowdown", None, None, higher=False, reason=reason)
        for name_, goal in (("gpu_samples_per_s", None), ("gpu_busy_fraction", GOALS["busy"]),
                            ("gpu_mfu_bf16", GOALS["mfu"])):
            metric(name_, None, goal, reason=reason)
    elif not got_head:
        why = {"reason": f"SegResNet at {head[1]}^3 was not run (--networks)"}
        for name_, goal in (("gpu_samples_per_s", None), ("gpu_busy_fraction", GOALS["busy"]),
                            ("gpu_mfu_bf16", GOALS["mfu"])):
            metric(name_, None, goal, gpu=name, **why)
    return 0


if __name__ == "__main__":
    sys.exit(main())
