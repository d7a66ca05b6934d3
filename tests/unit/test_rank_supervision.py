"""Supervised ranks: a training process other than rank 0 that dies (here: SIGKILL in the middle of
an epoch, gloo on the CPU) fails the training within seconds with that rank's failure, not after the
collective timeout; a retry resumes from the newest checkpoint and ends with the weights of an
uninterrupted run. One that stays alive but stops taking part fails the others after
``train.collective_timeout_s``."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import psutil
import pytest
import torch
from safetensors.torch import load

from voxelflow.core.storage import Store
from voxelflow.core.transient import is_transient
from voxelflow.learn.train import ArrayCases, Checkpoints, RankFailed, train
from voxelflow.spec.config import TrainSpec

SPEC = dict(
    network={"UNet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2],
                      "num_res_units": 0}},
    epochs=3, batch_size=2, learning_rate=0.01, precision="fp32", checkpoint_every_steps=1, seed=3, devices=2,
    optimizer={"SGD": {"momentum": 0.9}},
)
KILL_AT_STEP = 3  # 4 cases, batch 2: 2 steps an epoch; step 3 is the middle of epoch 1


class KillsRankOne(Checkpoints):
    """Checkpoints of rank 0 that SIGKILL the other training process once step ``KILL_AT_STEP`` is saved."""

    killed_at: float | None = None

    def save(self, step, state):
        key = super().save(step, state)
        if step == KILL_AT_STEP and KillsRankOne.killed_at is None:
            (child,) = [p for p in psutil.Process().children() if "spawn_main" in " ".join(p.cmdline())]
            os.kill(child.pid, signal.SIGKILL)
            KillsRankOne.killed_at = time.monotonic()
        return key


def weights(result) -> dict[str, torch.Tensor]:
    return load(result.weights)


def test_a_dead_rank_fails_the_training_fast_and_a_retry_resumes_to_the_same_weights(tmp_path):
    torch.set_num_threads(1)
    rng = np.random.default_rng(2)
    images = rng.random((4, 1, 16, 16, 16), dtype=np.float32)
    cases = ArrayCases(images, (images > 0.6).astype(np.uint8))
    spec = TrainSpec(**SPEC)
    store = Store(tmp_path)

    whole = train(spec, cases, Checkpoints(store, "whole"))

    with pytest.raises(RankFailed, match=r"training process 1 failed \(killed by signal 9\)") as failed:
        train(spec, cases, KillsRankOne(store, "killed"))
    assert is_transient(failed.value)  # a lost process: the task's retry resumes (a raised error is not retried)
    assert KillsRankOne.killed_at is not None
    assert time.monotonic() - KillsRankOne.killed_at < 60  # the collective timeout is 30 minutes

    again = train(spec, cases, Checkpoints(store, "killed"))
    assert again.resumed_from == KILL_AT_STEP and again.steps == whole.steps == 6
    for name, tensor in weights(whole).items():
        assert torch.allclose(weights(again)[name], tensor, atol=1e-6), name


def test_a_rank_that_stops_taking_part_fails_the_others_within_the_collective_timeout(tmp_path):
    """Rank 0 validates for longer than ``collective_timeout_s`` (the others wait on the group's own, long
    timeout: the training goes on), then stalls in its epoch callback: rank 1, alive but alone in its
    gradient all-reduce, fails after the collective timeout, not torch's 30 minutes, and the training
    fails with rank 1's timeout."""
    from voxelflow.learn.train import Validation

    torch.set_num_threads(1)
    timeout = 5  # seconds: above the skew between the two processes on a loaded machine
    rng = np.random.default_rng(2)
    images = rng.random((4, 1, 16, 16, 16), dtype=np.float32)
    cases = ArrayCases(images, (images > 0.6).astype(np.uint8))
    spec = TrainSpec(**{**SPEC, "checkpoint_every_steps": 100, "collective_timeout_s": timeout})
    validated, stalled = [], {}

    def slow_validation(epoch, scores, sample):
        if epoch == 0:
            time.sleep(timeout + 1.5)
            validated.append(epoch)

    def stall(epoch, metrics):
        if epoch != 1:
            return
        (child,) = [p for p in psutil.Process().children() if "spawn_main" in " ".join(p.cmdline())]
        start = time.monotonic()
        try:
            child.wait(timeout=60)
        except psutil.TimeoutExpired:
            pass
        stalled["seconds"] = time.monotonic() - start

    failed_by_timeout = r"training process 1 failed \((exit code 1|raised, still exiting)\): .*[Tt]imed out"
    with pytest.raises(RankFailed, match=failed_by_timeout) as failed:
        train(spec, cases, Checkpoints(Store(tmp_path), "ck"), Validation(cases, (16, 16, 16)),
              on_epoch=stall, on_validation=slow_validation)
    assert validated == [0]  # a validation longer than the collective timeout is not a hung collective
    assert timeout - 0.5 < stalled["seconds"] < timeout + 20, stalled  # torch's default would be 30 minutes
    assert not is_transient(failed.value)
