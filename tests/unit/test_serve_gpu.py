"""The service on GPUs: inferences per GPU, which GPU a request gets, where the output is stitched, the device
memory budget, and out-of-memory answered 503 with the worker recovered.

The decisions are pure functions tested for any number of GPUs; the request path runs in the real app with the
real tiny segmenter (on the CPU: its device is named as such); the ``gpu`` tests at the end need a CUDA device.
"""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from tests.unit.helpers import npy
from voxelflow.learn.model import Segmenter, stitch_device
from voxelflow.serving.serve import NPY, KeyStore, ModelHolder, create_app
from voxelflow.serving.serve_gpu import (
    DEVICE_FRACTION,
    RETRY_AFTER_OOM,
    GpuSlots,
    device_share,
    out_of_memory,
    pick,
    plan,
    replicate,
)
from voxelflow.serving.serve_volumes import device_working_set_bytes, model_grid_voxels, stitch_limit_voxels
from voxelflow.spec.config import Settings

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


VOLUME = np.random.default_rng(0).random((20, 18, 16), dtype=np.float32)


# ---------------------------------------------------------------- pure decisions


@pytest.mark.parametrize("gpus", range(9))
@pytest.mark.parametrize("per_gpu", [1, 2])
def test_workers_and_slots_for_n_gpus(gpus, per_gpu):
    placed = plan(gpus, per_gpu, None, cores=16)
    assert placed.devices == tuple(f"cuda:{i}" for i in range(gpus))
    assert placed.slots == gpus * per_gpu
    assert placed.workers == (gpus * per_gpu if gpus else 16)  # on GPUs: one thread per slot, not per core
    assert plan(gpus, per_gpu, 3, cores=16).workers == 3  # set explicitly: kept (the GPU semaphore still bounds)
    assert ("CPU" in placed.describe()) == (gpus == 0)


@pytest.mark.parametrize("per_gpu", [0, 3])
def test_per_gpu_outside_1_or_2_is_refused_naming_the_setting(per_gpu, monkeypatch):
    with pytest.raises(ValueError, match="VOXELFLOW_SERVE_PER_GPU"):
        plan(2, per_gpu, None, cores=4)
    monkeypatch.setenv("VOXELFLOW_SERVE_PER_GPU", str(per_gpu))
    with pytest.raises(ValueError, match="serve_per_gpu"):
        Settings()


def test_per_gpu_setting_is_read(monkeypatch):
    assert Settings().serve_per_gpu == 1
    monkeypatch.setenv("VOXELFLOW_SERVE_PER_GPU", "2")
    assert Settings().serve_per_gpu == 2


def test_a_request_gets_the_gpu_running_the_fewest():
    assert pick({"cuda:0": 0, "cuda:1": 0}, 1) == "cuda:0"
    assert pick({"cuda:0": 1, "cuda:1": 0}, 1) == "cuda:1"
    assert pick({"cuda:0": 1, "cuda:1": 0, "cuda:2": 1}, 2) == "cuda:1"
    assert pick({"cuda:0": 1, "cuda:1": 1}, 2) == "cuda:0"
    assert pick({"cuda:0": 1, "cuda:1": 1}, 1) is None
    assert pick({"cuda:0": 2, "cuda:1": 2}, 2) is None


def test_gpu_semaphore_spreads_bounds_and_wakes_a_waiter():
    slots = GpuSlots(["cuda:0", "cuda:1"], 1)
    got: list[str] = []
    with slots.take() as first, slots.take() as second:
        assert {first, second} == {"cuda:0", "cuda:1"}
        with pytest.raises(TimeoutError):  # both GPUs run one: a third inference does not start
            with slots.take(timeout=0.05):
                pass
        done = threading.Event()

        def waiter_runs() -> None:
            with slots.take() as device:
                got.append(device)
                done.wait(30)

        waiter = threading.Thread(target=waiter_runs)
        waiter.start()
        assert not got  # it waits for a GPU
    while not got and waiter.is_alive():
        waiter.join(timeout=0.01)
    assert got and got[0] in ("cuda:0", "cuda:1")
    assert sorted(slots.in_use.values()) == [0, 1]  # the waiter holds one, nothing leaked
    done.set()
    waiter.join(timeout=30)
    assert slots.in_use == {"cuda:0": 0, "cuda:1": 0}


def test_stitching_moves_to_the_cpu_over_the_limit_on_a_gpu_only():
    assert stitch_device(1000, 1000, "cuda:1") == "cuda:1"
    assert stitch_device(1001, 1000, "cuda:1") == "cpu"
    assert stitch_device(10**9, None, "cuda:0") == "cuda:0"  # no limit set
    assert stitch_device(10**9, 0, "cpu") == "cpu"


def test_the_stitch_limit_is_the_largest_grid_that_fits_the_share(tiny_model_config):
    share = 2 * 1024**3
    limit = stitch_limit_voxels(share, tiny_model_config)
    assert limit > 0
    assert device_working_set_bytes(limit, tiny_model_config, stitched=True) <= share
    assert device_working_set_bytes(limit + 1, tiny_model_config, stitched=True) > share
    assert stitch_limit_voxels(device_working_set_bytes(0, tiny_model_config, stitched=False) - 1,
                               tiny_model_config) == 0  # the windows alone fill it: every grid on the CPU
    assert stitch_limit_voxels(share // 2, tiny_model_config) < limit


def test_each_inference_gets_its_share_of_the_free_device_memory():
    free = 40 * 1024**3
    assert device_share(free, 1) == int(free * DEVICE_FRACTION)
    assert device_share(free, 2) == int(free * DEVICE_FRACTION) // 2


def test_device_budget_counts_the_windows_and_the_stitched_output(tiny_model_config):
    windows = device_working_set_bytes(0, tiny_model_config, stitched=False)
    assert device_working_set_bytes(512**3, tiny_model_config, stitched=False) == windows  # stitched on the CPU
    on_device = device_working_set_bytes(512**3, tiny_model_config, stitched=True)
    channels = tiny_model_config["network"]["UNet"]["out_channels"]
    assert on_device - windows >= 512**3 * 4 * (channels + 1)  # logits of every channel + the count map
    bigger = dict(tiny_model_config, sliding_window={**tiny_model_config["sliding_window"], "sw_batch_size": 16})
    assert device_working_set_bytes(0, bigger, stitched=False) > windows
    wider = dict(tiny_model_config, network={"UNet": {**tiny_model_config["network"]["UNet"],
                                                      "channels": [64, 128]}})
    assert device_working_set_bytes(0, wider, stitched=False) > windows
    pixdim = next(t["Spacingd"]["pixdim"] for t in tiny_model_config["transforms"] if "Spacingd" in t)
    fine = model_grid_voxels((64, 64, 64), tuple(float(p) for p in pixdim), tiny_model_config)
    coarse = model_grid_voxels((64, 64, 64), tuple(2 * float(p) for p in pixdim), tiny_model_config)
    assert coarse == 8 * fine


def test_out_of_memory_is_found_through_wrapping_errors():
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        except torch.OutOfMemoryError as inner:
            raise RuntimeError("applying transform <Invertd>") from inner
    except RuntimeError as outer:
        assert out_of_memory(outer)
    assert not out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory"))
    assert not out_of_memory(ValueError("x"))


# ---------------------------------------------------------------- replicas and the request path


def test_replicas_hold_their_own_network_and_segment_alike(segmenter):
    replicas = replicate(segmenter, ["cpu"], 2, free=lambda device: 8 * 1024**3)
    twin = replicas["cpu"].segmenter
    assert twin.net is not segmenter.net and twin.pre is segmenter.pre
    assert replicas["cpu"].share_bytes == device_share(8 * 1024**3, 2)
    assert twin.stitch_voxels == stitch_limit_voxels(replicas["cpu"].share_bytes, segmenter.config)
    assert segmenter.stitch_voxels is None  # the original is untouched
    np.testing.assert_array_equal(twin.segment(VOLUME), segmenter.segment(VOLUME))


def test_a_hot_swap_swaps_the_replicas_with_the_model_and_a_failed_one_keeps_both(segmenter, tiny_model_config,
                                                                                 tiny_weights):
    other = Segmenter(tiny_model_config, tiny_weights[1], device="cpu")
    models = iter([(segmenter, "1"), (other, "2"), (other, "3")])
    fail = {"now": False}

    def replicate_or_fail(model):
        if fail["now"]:
            raise torch.OutOfMemoryError("CUDA out of memory while loading the replica")
        return replicate(model, ["cpu"], 1, free=lambda device: 8 * 1024**3)

    holder = ModelHolder(lambda: next(models), replicate=replicate_or_fail)
    holder.reload()
    first = holder.replicas["cpu"]
    holder.reload()
    assert holder.version == "2" and holder.replicas["cpu"] is not first
    kept = holder.replicas
    fail["now"] = True
    with pytest.raises(torch.OutOfMemoryError):
        holder.reload()
    assert holder.version == "2" and holder.replicas is kept and holder.swap_failures == 1


def gpu_path_app(segmenter, db, free: int, **kwargs):
    """The app on the GPU path's bookkeeping (semaphore, replicas, device budget) with the CPU as its device."""
    keys = KeyStore(db)
    key = keys.create("clinic", ["predictor", "viewer"])
    holder = ModelHolder(lambda: (segmenter, "1"), replicate=lambda m: replicate(m, ["cpu"], 1, free=lambda d: free))
    holder.reload()
    return TestClient(create_app(holder, keys, db=db, gpus=("cpu",), per_gpu=1, **kwargs)), key


def test_the_device_budget_refuses_413_before_decoding_and_admits_what_fits(segmenter, db):
    windows = device_working_set_bytes(0, segmenter.config, stitched=False)
    for host_budget in (8 * 1024**3, None):  # counted with or without a host budget
        client, key = gpu_path_app(segmenter, db, free=int(windows / DEVICE_FRACTION) - 2**20,
                                   memory_budget=host_budget)
        headers = {"X-API-Key": key, "content-type": NPY}
        response = client.post("/v1/segment", content=npy(VOLUME), headers=headers)
        assert response.status_code == 413 and "GPU memory" in response.json()["detail"]
    client, key = gpu_path_app(segmenter, db, free=8 * 1024**3)
    response = client.post("/v1/segment", content=npy(VOLUME), headers={**headers, "X-API-Key": key})
    assert response.status_code == 200
    np.testing.assert_array_equal(np.load(io.BytesIO(response.content)), segmenter.segment(VOLUME))
    metrics = client.get("/metrics", headers={"X-API-Key": key}).text
    assert 'voxelflow_gpu_inferences{device="cpu"} 0.0' in metrics


class RunsOutOfMemory(torch.nn.Module):
    """The tiny network, except that its first ``times`` forwards raise torch's out-of-memory error."""

    def __init__(self, net: torch.nn.Module, times: int = 1, error: type[Exception] = torch.OutOfMemoryError):
        super().__init__()
        self.net, self.times, self.error = net, times, error

    def forward(self, x):
        if self.times > 0:
            self.times -= 1
            raise self.error("CUDA out of memory. Tried to allocate 20.00 GiB")
        return self.net(x)


def flaky_app(segmenter, db, gpu_path: bool, error: type[Exception] = torch.OutOfMemoryError):
    flaky = segmenter.replica("cpu")
    flaky.net = RunsOutOfMemory(flaky.net, error=error)  # a replica's copy fails once too
    if gpu_path:
        return gpu_path_app(flaky, db, free=8 * 1024**3, workers=1)
    keys = KeyStore(db)
    key = keys.create("clinic", ["predictor", "viewer"])
    holder = ModelHolder(lambda: (flaky, "1"))
    holder.reload()
    return TestClient(create_app(holder, keys, db=db, workers=1), raise_server_exceptions=False), key


@pytest.mark.parametrize("gpu_path", [False, True])
def test_out_of_memory_is_503_with_retry_after_and_the_next_request_is_served(segmenter, db, gpu_path):
    client, key = flaky_app(segmenter, db, gpu_path)
    headers = {"X-API-Key": key, "content-type": NPY}
    first = client.post("/v1/segment", content=npy(VOLUME), headers=headers)
    assert first.status_code == 503, first.text
    assert first.headers["Retry-After"] == str(RETRY_AFTER_OOM)
    assert "out of device memory" in first.json()["detail"]
    second = client.post("/v1/segment", content=npy(VOLUME), headers=headers)  # the one worker serves again
    assert second.status_code == 200
    np.testing.assert_array_equal(np.load(io.BytesIO(second.content)), segmenter.segment(VOLUME))
    metrics = client.get("/metrics", headers={"X-API-Key": key}).text
    assert "voxelflow_inference_out_of_memory_total 1.0" in metrics
    assert "voxelflow_inference_in_flight 0.0" in metrics
    if gpu_path:
        assert 'voxelflow_gpu_inferences{device="cpu"} 0.0' in metrics  # the GPU slot was given back


def test_another_model_error_is_still_a_500(segmenter, db):
    client, key = flaky_app(segmenter, db, False, error=RuntimeError)
    response = client.post("/v1/segment", content=npy(VOLUME), headers={"X-API-Key": key, "content-type": NPY})
    assert response.status_code == 500 and "Retry-After" not in response.headers


# ---------------------------------------------------------------- on a GPU (pytest -m gpu)


def peak_device_bytes(run) -> tuple[object, int]:
    """What ``run()`` returns and the device memory it allocated at its peak beyond what was held before."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = run()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() - before


@pytest.mark.gpu
@cuda
def test_stitching_on_the_cpu_gives_the_mask_with_less_device_memory_within_the_estimates(tiny_model_config,
                                                                                         tiny_weights):
    config = dict(tiny_model_config, transforms=[t for t in tiny_model_config["transforms"]
                                                 if "ResizeWithPadOrCropd" not in t])  # the grid follows the input
    twin = Segmenter(config, tiny_weights[0], device="cpu").replica("cuda:0")
    volume = np.random.default_rng(2).random((160, 160, 160), dtype=np.float32)
    twin.segment(volume[:48, :48, :48])  # warm: cuDNN's plans, the allocator
    on_gpu, peak_gpu = peak_device_bytes(lambda: twin.segment(volume))
    twin.stitch_voxels = 0  # every grid is stitched on the CPU
    on_cpu, peak_cpu = peak_device_bytes(lambda: twin.segment(volume))
    assert (on_gpu == on_cpu).mean() > 0.999  # the same logits, summed in the same order on another device
    grid = model_grid_voxels(volume.shape, (1.0, 1.0, 1.0), config)
    print(f"160^3: device peak {peak_gpu / 2**20:.0f} MiB stitched on the GPU, {peak_cpu / 2**20:.0f} MiB on the "
          f"CPU; estimates {device_working_set_bytes(grid, config, True) / 2**20:.0f} and "
          f"{device_working_set_bytes(grid, config, False) / 2**20:.0f} MiB")
    assert peak_cpu < peak_gpu
    assert peak_gpu <= device_working_set_bytes(grid, config, stitched=True)
    assert peak_cpu <= device_working_set_bytes(grid, config, stitched=False)


@pytest.mark.gpu
@cuda
def test_the_service_spreads_requests_over_every_visible_gpu(segmenter, db):
    import httpx

    from voxelflow.serving.serve import Server

    placed = plan(torch.cuda.device_count(), 2, None, cores=16)
    holder = ModelHolder(lambda: (segmenter, "1"), replicate=placed.replicate)
    holder.reload()
    assert set(holder.replicas) == set(placed.devices)
    for device, replica in holder.replicas.items():  # one replica per GPU, on that GPU
        assert str(next(replica.segmenter.net.parameters()).device) == device
        assert replica.share_bytes > 0
    keys = KeyStore(db)
    key = keys.create("clinic", ["predictor", "viewer"])
    app = create_app(holder, keys, db=db, workers=placed.workers, gpus=placed.devices, per_gpu=placed.per_gpu,
                     rate=1e6, burst=10**6)
    expected = holder.replicas["cuda:0"].segmenter.segment(VOLUME)  # on a GPU (TF32 convolutions: not the CPU's)
    statuses: list[tuple[int, float]] = []
    with Server(app) as server:
        def client() -> None:
            with httpx.Client(timeout=120) as http:
                r = http.post(f"{server.url}/v1/segment", content=npy(VOLUME),
                              headers={"X-API-Key": key, "content-type": NPY})
                agree = float((np.load(io.BytesIO(r.content)) == expected).mean()) if r.status_code == 200 else 0.0
                statuses.append((r.status_code, agree))

        threads = [threading.Thread(target=client) for _ in range(placed.workers)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=120)
        metrics = httpx.get(f"{server.url}/metrics", headers={"X-API-Key": key}).text
    assert len(statuses) == placed.workers and all(s == 200 and a > 0.999 for s, a in statuses), statuses
    for device in placed.devices:
        assert f'voxelflow_gpu_inferences{{device="{device}"}} 0.0' in metrics


class AllocatesTooMuch(torch.nn.Module):
    """The tiny network, except that its first forward takes 256 MiB and then asks for twice the GPU's memory."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.times = net, 1

    def forward(self, x):
        if self.times > 0:
            self.times -= 1
            held = torch.empty(256 * 2**20, dtype=torch.uint8, device=x.device)
            total = torch.cuda.get_device_properties(x.device).total_memory
            return held, torch.empty(2 * total, dtype=torch.uint8, device=x.device)  # raises
        return self.net(x)


@pytest.mark.gpu
@cuda
def test_a_real_cuda_out_of_memory_is_503_and_the_gpu_serves_the_next_request(segmenter, db):
    greedy = segmenter.replica("cpu")
    greedy.net = AllocatesTooMuch(greedy.net)
    placed = plan(1, 1, None, cores=16)
    holder = ModelHolder(lambda: (greedy, "1"), replicate=placed.replicate)
    holder.reload()
    keys = KeyStore(db)
    key = keys.create("clinic", ["predictor", "viewer"])
    client = TestClient(create_app(holder, keys, db=db, workers=1, gpus=placed.devices, per_gpu=1))
    headers = {"X-API-Key": key, "content-type": NPY}
    torch.cuda.synchronize()
    reserved = torch.cuda.memory_reserved()
    first = client.post("/v1/segment", content=npy(VOLUME), headers=headers)
    assert first.status_code == 503 and first.headers["Retry-After"] == str(RETRY_AFTER_OOM), first.text
    assert torch.cuda.memory_reserved() <= reserved + 64 * 2**20  # the 256 MiB it held went back to the driver
    second = client.post("/v1/segment", content=npy(VOLUME), headers=headers)
    assert second.status_code == 200
    replica = holder.replicas["cuda:0"].segmenter
    np.testing.assert_array_equal(np.load(io.BytesIO(second.content)), replica.segment(VOLUME))
    assert "voxelflow_inference_out_of_memory_total 1.0" in client.get("/metrics", headers={"X-API-Key": key}).text


def test_serve_refuses_a_per_gpu_outside_1_or_2_naming_the_setting(tmp_path):
    import os

    from tests.conftest import run_cli

    env = {**os.environ, "VOXELFLOW_HOME": str(tmp_path / "home"), "VOXELFLOW_SERVE_PER_GPU": "4"}
    out = run_cli(["voxelflow", "serve", "--model", "nothing-yet"], env, timeout=120)
    assert out.returncode == 1
    assert "VOXELFLOW_SERVE_PER_GPU" in out.stderr and "less than or equal to 2" in out.stderr
