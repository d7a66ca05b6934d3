"""The GPU path: training cached on the device with mixed precision, inference, LocalCUDACluster.

Skipped cleanly where there is no CUDA device.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from voxelflow.core.storage import Store
from voxelflow.learn import train
from voxelflow.learn.model import Segmenter

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("precision", ["bf16-mixed", "fp16-mixed"])
def test_training_on_the_gpu(tiny_spec, tmp_path, precision):
    rng = np.random.default_rng(0)
    images = rng.random((4, 1, 16, 16, 16), dtype=np.float32)
    labels = (images > 0.5).astype(np.float32)
    spec = tiny_spec.train.model_copy(update={"epochs": 2, "precision": precision})
    result = train.train(spec, train.ArrayCases(images, labels), train.Checkpoints(Store(tmp_path), "ckpt"),
                         device="cuda")
    assert result.device.startswith("cuda")
    assert all(np.isfinite(h["train_loss"]) for h in result.history)


def test_deterministic_training_on_the_gpu_sets_torchs_flags_and_resumes_bit_for_bit(tiny_spec, tmp_path,
                                                                                      monkeypatch):
    """train.deterministic on CUDA: cuDNN deterministic, no autotuning, TF32 off, deterministic algorithms
    (warn only) and CUBLAS_WORKSPACE_CONFIG while the loop runs, torch's flags back afterwards; two runs,
    and a run resumed from its checkpoint, end with the same bytes."""
    import os

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul

    def flags():
        return (cudnn.deterministic, cudnn.benchmark, matmul.allow_tf32, cudnn.allow_tf32,
                torch.are_deterministic_algorithms_enabled())

    before, seen = flags(), []
    rng = np.random.default_rng(0)
    images = rng.random((4, 1, 16, 16, 16), dtype=np.float32)
    cases = train.ArrayCases(images, (images > 0.5).astype(np.float32))
    spec = tiny_spec.train.model_copy(update={"epochs": 2, "deterministic": True})
    store = Store(tmp_path)
    first = train.train(spec, cases, train.Checkpoints(store, "a"), device="cuda",
                        on_epoch=lambda epoch, metrics: seen.append(flags()))
    assert seen == [(True, False, False, False, True)] * 2
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert flags() == before  # process-wide settings: put back for what runs next in the process
    assert first.determinism.startswith("bit for bit (train.deterministic")
    again = train.train(spec, cases, train.Checkpoints(store, "b"), device="cuda")
    assert again.weights == first.weights
    train.train(spec.model_copy(update={"epochs": 1}), cases, train.Checkpoints(store, "c"), device="cuda")
    resumed = train.train(spec, cases, train.Checkpoints(store, "c"), device="cuda")
    assert resumed.resumed_from is not None and resumed.weights == first.weights


def test_without_deterministic_a_resumed_gpu_run_matches_to_the_readmes_tolerance(tiny_spec, tmp_path):
    """train.deterministic: false (cuDNN's default algorithms, TF32 convolutions): a run resumed from its
    checkpoint ends within 1e-3 of the uninterrupted one, the tolerance the README states."""
    from safetensors.torch import load

    rng = np.random.default_rng(0)
    images = rng.random((4, 1, 16, 16, 16), dtype=np.float32)
    cases = train.ArrayCases(images, (images > 0.5).astype(np.float32))
    spec = tiny_spec.train.model_copy(update={"epochs": 4})
    store = Store(tmp_path)
    whole = train.train(spec, cases, train.Checkpoints(store, "whole"), device="cuda")
    assert whole.determinism.startswith("to float tolerance")
    train.train(spec.model_copy(update={"epochs": 2}), cases, train.Checkpoints(store, "cut"), device="cuda")
    resumed = train.train(spec, cases, train.Checkpoints(store, "cut"), device="cuda")
    assert resumed.resumed_from is not None
    expected, got = load(whole.weights), load(resumed.weights)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, atol=1e-3, rtol=1e-3, msg=name)


def test_segmenter_on_the_gpu(tiny_model_config, tiny_weights):
    seg = Segmenter(tiny_model_config, tiny_weights[0], device="cuda")
    volume = np.random.default_rng(0).random((20, 18, 16), dtype=np.float32)
    assert seg.segment(volume).shape == volume.shape


@pytest.mark.skipif(importlib.util.find_spec("dask_cuda") is None, reason="needs the gpu extra (dask-cuda)")
def test_auto_cluster_is_cuda_for_gpu_transforms():
    from voxelflow.data.cluster import dask_client, resolve_kind

    assert resolve_kind("auto", None) == "local"  # CPU transforms keep a CPU cluster, GPU or not
    assert resolve_kind("auto", None, device="cuda") == "cuda"
    with dask_client("auto", device="cuda") as client:
        assert client.submit(lambda: torch.cuda.is_available()).result()


def test_patch_training_with_the_cache_on_the_gpu(tmp_path):
    """Cases cached on the device, patches sampled there, sliding-window validation, bf16."""
    from tests.unit.test_train_patches import PATCHES, SHAPES, sphere_case
    from voxelflow.core.storage import CaseStore
    from voxelflow.data.preprocess import case_dataset
    from voxelflow.spec.config import TrainSpec

    out = CaseStore(Store(tmp_path / "store"), "pre/gpu")
    for i, shape in enumerate(SHAPES):
        out.write(f"case-{i}", case_dataset(sphere_case(shape, i), {}, "gpu"))
    cases = train.StoreCases(out, ["case-0", "case-1", "case-2"], 10**8, device="cuda")
    assert cases[0]["image"].device.type == "cuda"
    validation = train.Validation(train.StoreCases(out, ["case-3"], 10**8, device="cuda"), (16, 16, 16))
    spec = TrainSpec(network={"UNet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8],
                                       "strides": [2]}}, epochs=2, batch_size=2, precision="bf16-mixed",
                     augment=PATCHES)
    result = train.train(spec, cases, train.Checkpoints(Store(tmp_path), "ck"), validation, device="cuda")
    assert result.device.startswith("cuda") and result.best_metric is not None


def test_the_gpu_benchmark_times_voxelflows_loop_with_cuda_events(tmp_path):
    """benchmarks/gpu_train.py's measurement on the GPU, on a tiny network: CUDA events around each step
    of voxelflow's own loop, the patches counted from its batches, a bf16 peak timed over >= 2 s."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import gpu_train

    device = torch.device("cuda")
    network = {"UNet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [8, 16], "strides": [2]}}
    precision = "bf16-mixed" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    r = gpu_train.run(network, 32, steps=4, warmup=2, batch=2, samples=2, precision=precision, device=device,
                      root=tmp_path)
    assert r["steps_timed"] >= 4 and r["patches_timed"] == r["steps_timed"] * 2 * 2
    assert r["batch_shapes"] == [(4, 1, 32, 32, 32)] and r["cached_cases"] == 4
    assert 0 < r["busy"] <= 1.0 + 1e-6 and r["samples_per_s"] > 0 and r["step_gflop"] > 0
    peak = gpu_train.matmul_peak(device, torch.bfloat16, 2.0, n=4096)
    assert peak["seconds"] >= 2.0 and peak["flops_per_s"] > 1e12
