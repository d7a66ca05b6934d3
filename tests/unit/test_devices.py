"""train.devices and train.precision decided as pure functions, for 0 to 8 GPUs and several batch sizes."""

from __future__ import annotations

import os

import pytest

from voxelflow.learn.devices import Placement, placement, precision


@pytest.mark.parametrize("gpus", range(0, 9))
@pytest.mark.parametrize("batch", [1, 2, 3, 4, 6, 8, 12])
def test_auto_uses_the_most_gpus_that_divide_the_batch(gpus, batch):
    got = placement("auto", gpus, batch)
    if gpus == 0:
        assert got == Placement("cpu", 1)
    else:
        assert got.kind == "cuda" and batch % got.processes == 0 and 1 <= got.processes <= gpus
        assert not any(batch % k == 0 for k in range(got.processes + 1, gpus + 1))
    assert placement("auto", 8, 2) == Placement("cuda", 2)  # the demo's batch on an 8-GPU node
    assert placement("auto", 4, 3) == Placement("cuda", 3)


@pytest.mark.parametrize("gpus", range(0, 9))
def test_cpu_means_the_cpu_whatever_the_gpus(gpus):
    assert placement("cpu", gpus, 4) == Placement("cpu", 1)
    assert placement("cpu", gpus, 4).device == "cpu"


def test_a_number_of_processes():
    assert placement(2, 0, 4) == Placement("cpu", 2)  # gloo on a machine without GPUs
    assert placement(2, 4, 4) == Placement("cuda", 2)
    with pytest.raises(ValueError, match="multiple of train.devices"):
        placement(3, 4, 4)
    with pytest.raises(ValueError, match="needs 4 GPUs and this machine has 2"):
        placement(4, 2, 4)


def test_an_explicit_device_is_one_process_there():
    assert placement("auto", 4, 4, device="cpu") == Placement("cpu", 1)
    assert placement(2, 4, 4, device="cuda:1") == Placement("cuda", 1)
    with pytest.raises(ValueError, match="no GPU"):
        placement("auto", 0, 2, device="cuda")


def test_precision_auto_is_native_bf16_else_fp16_on_gpus_and_fp32_on_the_cpu():
    assert precision("auto", "cuda", bf16_native=True) == "bf16-mixed"
    assert precision("auto", "cuda", bf16_native=False) == "fp16-mixed"  # V100, T4: bf16 only emulated
    assert precision("auto", "cpu", bf16_native=True) == "fp32"
    assert precision("bf16-mixed", "cpu", bf16_native=False) == "bf16-mixed"  # what the spec says, as said


def test_a_scaler_state_is_restored_only_when_both_sides_have_one():
    import torch

    from voxelflow.learn.train import load_scaler

    disabled, enabled = torch.amp.GradScaler("cpu", enabled=False), torch.amp.GradScaler("cpu", enabled=True)
    load_scaler(enabled, disabled.state_dict())  # fp32 attempt, then fp16: torch raises on this load
    load_scaler(disabled, enabled.state_dict())
    enabled.scale(torch.ones(1))  # makes its scale tensor
    enabled.update(1024.0)
    again = torch.amp.GradScaler("cpu", enabled=True)
    load_scaler(again, enabled.state_dict())
    assert again.get_scale() == 1024.0


def test_batch_norms_are_synced_across_gpu_processes_and_load_back_into_the_plain_network():
    import torch

    from voxelflow.learn.train import build_network, sync_batch_norms

    spec = {"UNet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2],
                     "num_res_units": 1, "norm": "BATCH"}}
    net = build_network(spec)
    synced = sync_batch_norms(net, "cuda")  # the conversion itself needs no GPU
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    assert not any(type(m) is torch.nn.BatchNorm3d for m in synced.modules())
    build_network(spec).load_state_dict(synced.state_dict())  # registered weights load as before
    cpu_net = build_network(spec)
    assert sync_batch_norms(cpu_net, "cpu") is cpu_net  # gloo: torch cannot sync them, the log says so
    plain = build_network({"UNet": {**spec["UNet"], "norm": "INSTANCE"}})
    assert sync_batch_norms(plain, "cuda") is plain


def test_the_cache_is_budgeted_against_free_gpu_memory_and_kept_on_the_cpu_for_worker_processes():
    from voxelflow.learn.devices import cache_placement

    gib = 2**30
    cpu, gpu = Placement("cpu", 1), Placement("cuda", 2)
    assert cache_placement(64 * gib, cpu, 0, None) == ("cpu", 64 * gib)
    assert cache_placement(4 * gib, gpu, 0, 80 * gib) == ("cuda:0", 4 * gib)  # fits: as asked
    assert cache_placement(64 * gib, gpu, 0, 20 * gib) == ("cuda:0", 8 * gib)  # 40 % of what is free
    assert cache_placement(64 * gib, gpu, 4, 20 * gib) == ("cpu", 64 * gib)  # train.workers: CPU side


def test_determinism_says_what_a_resume_promises_on_each_device():
    from voxelflow.learn.devices import determinism

    assert determinism(False, "cpu") == determinism(True, "cpu") == "bit for bit (the CPU)"
    assert determinism(True, "cuda").startswith("bit for bit (train.deterministic")
    assert determinism(False, "cuda").startswith("to float tolerance")


def test_the_cublas_workspace_is_set_unless_already_deterministic():
    from voxelflow.learn.devices import CUBLAS_WORKSPACE, cublas_workspace

    assert cublas_workspace(env := {}) == CUBLAS_WORKSPACE and env == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    assert cublas_workspace({"CUBLAS_WORKSPACE_CONFIG": ":16:8"}) == ":16:8"  # the other value torch accepts
    assert cublas_workspace({"CUBLAS_WORKSPACE_CONFIG": ":1024:2"}) == CUBLAS_WORKSPACE  # not a repeatable one


def test_deterministic_cuda_sets_torchs_flags_for_the_block_and_restores_them(monkeypatch):
    """The flags are torch's own, settable without a GPU; the block changes them and puts them back."""
    import torch

    from voxelflow.learn.devices import deterministic_cuda

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul

    def flags():
        return (cudnn.deterministic, cudnn.benchmark, matmul.allow_tf32, cudnn.allow_tf32,
                torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())

    before = flags()
    with deterministic_cuda(False):
        assert flags() == before
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    with deterministic_cuda():
        assert flags() == (True, False, False, False, True, True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert flags() == before
    with pytest.raises(RuntimeError, match="inside"), deterministic_cuda():
        raise RuntimeError("inside")
    assert flags() == before  # restored when the training raises too


def test_deterministic_is_accepted_and_changes_nothing_on_the_cpu(tmp_path, monkeypatch):
    import numpy as np
    import torch

    from voxelflow.core.storage import Store
    from voxelflow.learn.train import ArrayCases, Checkpoints, train
    from voxelflow.spec.config import TrainSpec

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.set_num_threads(1)
    images = np.random.default_rng(4).random((4, 1, 16, 16, 16), dtype=np.float32)
    cases = ArrayCases(images, (images > 0.6).astype(np.uint8))
    spec = dict(network={"UNet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8],
                                  "strides": [2], "num_res_units": 0}},
                epochs=2, batch_size=2, precision="fp32", seed=1, devices="cpu")
    seen = []

    def flags(epoch, metrics):
        seen.append((torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled()))

    plain = train(TrainSpec(**spec), cases, Checkpoints(Store(tmp_path), "plain"))
    det = train(TrainSpec(**spec, deterministic=True), cases, Checkpoints(Store(tmp_path), "det"), on_epoch=flags)
    assert det.weights == plain.weights and det.history == plain.history
    assert det.determinism == plain.determinism == "bit for bit (the CPU)"
    assert seen == [(False, False)] * 2  # the CUDA settings are for CUDA: the CPU's stay as they were
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ


@pytest.mark.parametrize("value", [0, 1801])
def test_the_collective_timeout_is_bounded_and_named(value):
    from pydantic import ValidationError

    from voxelflow.spec.config import TrainSpec

    net = {"UNet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2]}}
    with pytest.raises(ValidationError, match="collective_timeout_s"):
        TrainSpec(network=net, collective_timeout_s=value)
    assert TrainSpec(network=net).collective_timeout_s == 300
