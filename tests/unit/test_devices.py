"""train.devices and train.precision decided as pure functions, for 0 to 8 GPUs and several batch sizes."""

from __future__ import annotations

import pytest

from voxelflow.devices import Placement, placement, precision


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

    from voxelflow.train import load_scaler

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

    from voxelflow.train import build_network, sync_batch_norms

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
    from voxelflow.devices import cache_placement

    gib = 2**30
    cpu, gpu = Placement("cpu", 1), Placement("cuda", 2)
    assert cache_placement(64 * gib, cpu, 0, None) == ("cpu", 64 * gib)
    assert cache_placement(4 * gib, gpu, 0, 80 * gib) == ("cuda:0", 4 * gib)  # fits: as asked
    assert cache_placement(64 * gib, gpu, 0, 20 * gib) == ("cuda:0", 8 * gib)  # 40 % of what is free
    assert cache_placement(64 * gib, gpu, 4, 20 * gib) == ("cpu", 64 * gib)  # train.workers: CPU side
