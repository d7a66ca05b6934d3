"""Exact resume after the training process is killed with SIGKILL in the middle of an epoch: with
patch sampling, augmentation, a network with dropout and validation, the rerun ends with the
same weights, history and best validation as an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import numpy as np
import torch

from voxelflow.core.storage import Store
from voxelflow.learn.train import ArrayCases, Checkpoints, Validation, train
from voxelflow.spec.config import TrainSpec

SPEC = dict(
    network={"UNet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2],
                      "num_res_units": 0}},
    epochs=3, batch_size=1, learning_rate=0.01, precision="fp32", checkpoint_every_steps=2, seed=5,
    optimizer={"SGD": {"momentum": 0.9}}, scheduler={"MultiStepLR": {"milestones": [2], "gamma": 0.1}},
    augment=[{"RandSpatialCropSamplesd": {"keys": ["image", "label"], "roi_size": [12, 12, 12], "num_samples": 2,
                                          "random_size": False}},
             {"RandFlipd": {"keys": ["image", "label"], "prob": 0.5, "spatial_axis": 1}}],
)
SPEC["network"]["UNet"]["dropout"] = 0.2  # torch's RNG matters: it is checkpointed
KILL_AFTER_STEP = 8  # 5 cases, batch 1: step 8 is the middle of epoch 1 (its 3rd step)

SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    import numpy as np, torch
    from voxelflow.spec.config import TrainSpec
    from voxelflow.core.storage import Store
    from voxelflow.learn.train import ArrayCases, Checkpoints, Validation, train

    torch.set_num_threads(1)
    spec, root, kill_after = TrainSpec(**json.loads(sys.argv[1])), sys.argv[2], int(sys.argv[3])

    class Killed(Checkpoints):
        def save(self, step, state):
            key = super().save(step, state)
            if step >= kill_after > 0:
                os.kill(os.getpid(), signal.SIGKILL)
            return key

    data = np.load(os.path.join(root, "data.npz"))
    val = Validation(ArrayCases(data["images"][:2], data["labels"][:2]), (12, 12, 12))
    train(spec, ArrayCases(data["images"], data["labels"]), Killed(Store(os.path.join(root, "store")), "ckpt"), val)
""")


def test_sigkill_mid_epoch_then_rerun_equals_an_uninterrupted_run(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.random((5, 1, 16, 16, 16), dtype=np.float32)
    labels = (images > 0.6).astype(np.uint8)
    np.savez(tmp_path / "data.npz", images=images, labels=labels)

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        straight = train(TrainSpec(**SPEC), ArrayCases(images, labels), Checkpoints(Store(tmp_path / "straight"), "ckpt"),
                         Validation(ArrayCases(images[:2], labels[:2]), (12, 12, 12)))
    finally:
        torch.set_num_threads(before)

    run = [sys.executable, "-c", SCRIPT, json.dumps(SPEC), str(tmp_path)]
    killed = subprocess.run([*run, str(KILL_AFTER_STEP)], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    checkpoints = Checkpoints(Store(tmp_path / "store"), "ckpt")
    state = checkpoints.load_latest("cpu")
    assert state["step"] == KILL_AFTER_STEP and [h["epoch"] for h in state["history"]] == [0]
    assert len(state["running"]) == 3  # the losses of epoch 1's first three steps, kept for its mean

    finished = subprocess.run([*run, "0"], capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    final = checkpoints.load_latest("cpu")
    assert final["step"] == 15
    assert final["history"] == straight.history  # one record per epoch: no gap, no repeat
    assert [h["epoch"] for h in final["history"]] == [0, 1, 2]
    reference = Checkpoints(Store(tmp_path / "straight"), "ckpt").load_latest("cpu")
    for name, tensor in reference["model"].items():
        assert torch.allclose(final["model"][name], tensor, rtol=0, atol=1e-6), name
    assert final["best"] == reference["best"] and final["best"]["metric"] is not None
    assert "val_epoch_dice" in final["history"][-1]
