"""The GPU benchmarks' measurements, exercised on the CPU so they cannot rot before a GPU runs them:
FLOPs of a step, the matmul peak's timing, the busy fraction and the samples counted from the
batches voxelflow's own loop receives, and the scripts' import chain (no Prefect, no MLflow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_train  # noqa: E402

# what a bare GPU machine lacks: the scripts and what they import from voxelflow must not need them
BLOCK = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("prefect", "mlflow", "fastapi", "sqlalchemy"):
            raise ImportError(f"{name} is not on this machine")
sys.meta_path.insert(0, Block())
"""


def test_step_flops_count_forward_and_backward_convolutions():
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1, bias=False),
                              torch.nn.Conv3d(2, 2, 3, padding=1, bias=False))
    x, y = torch.rand(2, 1, 8, 8, 8), torch.rand(2, 2, 8, 8, 8)
    voxels = 2 * 8**3
    first, second = 2 * 2 * 1 * 27 * voxels, 2 * 2 * 2 * 27 * voxels  # multiply-adds of each forward
    # the first layer's input needs no gradient: its backward is the weight gradient alone
    assert gpu_train.step_flops(net, torch.nn.functional.mse_loss, x, y, "fp32") == 2 * first + 3 * second
    assert all(p.grad is None for p in net.parameters())


def test_the_peak_is_timed_over_at_least_its_seconds_after_an_untimed_warm_up():
    now, calls, syncs = [0.0], [0], [0]

    def run_once():  # each call takes 0.03 s of the fake clock
        now[0] += 0.03
        calls[0] += 1

    def sync():
        syncs[0] += 1

    peak = gpu_train.measure_peak(run_once, 1e12, sync, min_seconds=2.0, warmup_seconds=0.5, sync_every=10,
                                  clock=lambda: now[0])
    assert peak["seconds"] >= 2.0 and peak["calls"] % 10 == 0
    assert peak["calls"] < calls[0] - 10  # the warm-up calls (0.5 s of them) are not counted
    assert peak["flops_per_s"] == pytest.approx(1e12 / 0.03)
    assert syncs[0] >= peak["calls"] // 10 + 1


def test_busy_fraction_and_samples_per_s_are_not_clamped():
    figures = gpu_train.span_figures([(0.0, 0.8), (1.0, 1.8), (2.0, 2.5)], samples=12)
    assert figures["span_s"] == 2.5 and figures["busy"] == pytest.approx(2.1 / 2.5)
    assert figures["samples_per_s"] == pytest.approx(12 / 2.5)
    assert gpu_train.span_figures([(0.0, 1.0), (0.5, 1.5)], samples=2)["busy"] == pytest.approx(4 / 3)
    with pytest.raises(ValueError, match="no timed steps"):
        gpu_train.span_figures([], 0)


def test_samples_are_counted_from_the_batches_the_loop_receives():
    timer = gpu_train.StepTimer(torch.device("cpu"), warmup=1)
    for n in (4, 4, 3, 2):  # the warm-up batch, then three timed ones of their own sizes
        timer.on_batch(torch.zeros(n, 1, 2, 2, 2))
        timer.on_step()
    spans = timer.spans()
    assert timer.samples == 9 and len(spans) == 3 and timer.seen == 4
    assert all(end >= start for start, end in spans)


def run_script(args: list[str]) -> subprocess.CompletedProcess:
    """benchmarks/gpu_train.py as make bench runs it, where Prefect and MLflow cannot be imported."""
    code = BLOCK + f"""
import json
sys.argv = ["gpu_train.py", *{args!r}]
sys.path.insert(0, {str(REPO / "benchmarks")!r})
import gpu_train
rc = gpu_train.main()
print(json.dumps({{"loaded": sorted({{m.split(".")[0] for m in sys.modules}} & {{"prefect", "mlflow"}})}}))
sys.exit(rc)
"""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)


def test_the_cpu_smoke_run_times_voxelflows_loop_and_prints_null_gpu_metrics():
    out = run_script(["--cpu", "--peak-seconds", "0.2", "--steps", "3", "--warmup", "1", "--samples", "2"])
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert json.loads(lines[-1]) == {"loaded": []}  # neither Prefect nor MLflow came in
    metrics = [json.loads(line) for line in lines[-4:-1]]
    assert [m["metric"] for m in metrics] == ["gpu_samples_per_s", "gpu_busy_fraction", "gpu_mfu_bf16"]
    assert all(m["value"] is None and m["reason"] == "--cpu asked for" for m in metrics)
    runs = [json.loads(line[2:]) for line in lines if line.startswith("# {") and '"network"' in line]
    (run,) = runs
    assert run["run"] == "cpu smoke run, not a GPU figure"
    assert run["steps_timed"] == 3 and run["steps_total"] >= 4  # the warm-up step was trained, not timed
    assert run["patches_timed"] == 3 * 2 * 2  # batch 2 cases x 2 patches each, as the loop received them
    assert run["batch_shapes"] == [[4, 1, 16, 16, 16]]
    assert 0 < run["busy"] <= 1 and run["samples_per_s"] > 0 and run["step_gflop"] > 0 and run["mfu"] > 0
    peak = json.loads(next(line[2:] for line in lines if '"matmul_peak_tflops"' in line))
    assert peak["peak_seconds"] >= 0.2


def test_the_gpu_scripts_and_what_they_import_need_no_prefect_or_mlflow():
    code = BLOCK + ("import voxelflow.learn.train, voxelflow.data.preprocess, voxelflow.core.storage, voxelflow.data.cluster, "
                    "voxelflow.learn.devices, voxelflow.learn.model\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=REPO / "src")
    assert out.returncode == 0, out.stderr[-3000:]
    preprocess = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_preprocess.py")],
                                capture_output=True, text=True, timeout=300, cwd=REPO)
    assert preprocess.returncode == 0, preprocess.stderr[-3000:]
    last = json.loads(preprocess.stdout.strip().splitlines()[-1])
    assert last["metric"] == "gpu_preprocess_speedup" and last["value"] is None and last["goal"] == 3.0
