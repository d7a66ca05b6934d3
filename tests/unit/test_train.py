"""Training: tiny runs, checkpoints, exact resume, mixed precision on CPU."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load

from voxelflow.config import TrainSpec
from voxelflow.train import epoch_order, latest_checkpoint, load_network, train

NETWORK = {"UNet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                    "channels": [4, 8], "strides": [2], "num_res_units": 0}}
LOSS = {"DiceCELoss": {"to_onehot_y": True, "softmax": True}}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.random((4, 1, 16, 16, 16), dtype=np.float32)
    labels = (images > 0.6).astype(np.uint8)
    return images, labels


def spec(**over) -> TrainSpec:
    values = dict(network=copy.deepcopy(NETWORK), loss=copy.deepcopy(LOSS), epochs=2, batch_size=2,
                  learning_rate=0.01, precision="fp32", checkpoint_every_steps=50, seed=3)
    values.update(over)
    return TrainSpec(**values)


def same_weights(a: bytes, b: bytes) -> bool:
    ta, tb = load(a), load(b)
    return set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_tiny_training(data, tmp_path):
    images, labels = data
    epochs_seen = []
    result = train(spec(), images, labels, tmp_path / "ckpt", on_epoch=lambda e, m: epochs_seen.append((e, m)))
    assert [h["epoch"] for h in result.history] == [0, 1]
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    assert [e for e, _ in epochs_seen] == [0, 1]
    assert epochs_seen[1][1]["train_loss"] == result.history[1]["train_loss"]
    assert result.steps == 4  # 2 epochs x ceil(4 / 2)
    assert result.resumed_from is None
    assert result.device == "cpu"
    # the final step is always checkpointed
    ckpt = latest_checkpoint(tmp_path / "ckpt")
    assert ckpt is not None and ckpt.name == "step-00000004.pt"
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 4 and len(state["history"]) == 2
    # the returned weights are safetensors that rebuild the network
    net = load_network(NETWORK, result.weights, "cpu")
    assert not net.training
    with torch.no_grad():
        out = net(torch.as_tensor(images[:1]))
    assert tuple(out.shape) == (1, 2, 16, 16, 16)
    # training changed the weights
    torch.manual_seed(3)
    from voxelflow.train import build_network, state_dict_bytes

    assert not same_weights(result.weights, state_dict_bytes(build_network(NETWORK)))


def test_checkpoints_every_n_steps_keep_the_last_two(data, tmp_path):
    images, labels = data
    train(spec(epochs=3, checkpoint_every_steps=1), images, labels, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("step-*.pt")) == ["step-00000005.pt", "step-00000006.pt"]
    assert not list(tmp_path.glob("*.tmp"))


def test_uneven_last_batch(data, tmp_path):
    images, labels = data
    result = train(spec(batch_size=3, epochs=1), images[:4], labels[:4], tmp_path)
    assert result.steps == 2 and len(result.history) == 1


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(data, tmp_path):
    images, labels = data
    straight = train(spec(epochs=2), images, labels, tmp_path / "straight")

    first = train(spec(epochs=1), images, labels, tmp_path / "resumed")
    assert first.steps == 2
    resumed = train(spec(epochs=2), images, labels, tmp_path / "resumed")
    assert resumed.resumed_from == 2
    assert resumed.steps == 4
    assert [h["epoch"] for h in resumed.history] == [0, 1]
    assert resumed.history == straight.history  # resumed at an epoch boundary: same losses
    assert same_weights(resumed.weights, straight.weights)
    assert resumed.weights == straight.weights  # byte-identical safetensors


def _interrupted_mid_epoch(images, labels, directory):
    """A run of 4 steps per epoch that stopped after step 3, in the middle of epoch 0."""
    train(spec(epochs=1, batch_size=1, checkpoint_every_steps=3), images, labels, directory)
    (directory / "step-00000004.pt").unlink()
    assert latest_checkpoint(directory).name == "step-00000003.pt"


def test_resume_mid_epoch_gives_the_same_weights(data, tmp_path):
    images, labels = data
    straight = train(spec(epochs=2, batch_size=1), images, labels, tmp_path / "straight")
    _interrupted_mid_epoch(images, labels, tmp_path / "resumed")
    resumed = train(spec(epochs=2, batch_size=1), images, labels, tmp_path / "resumed")
    assert resumed.resumed_from == 3
    assert resumed.steps == 8
    assert [h["epoch"] for h in resumed.history] == [0, 1]
    assert resumed.history[1] == straight.history[1]
    assert resumed.weights == straight.weights


def test_resume_mid_epoch_gives_the_same_history(data, tmp_path):
    images, labels = data
    straight = train(spec(epochs=2, batch_size=1), images, labels, tmp_path / "straight")
    _interrupted_mid_epoch(images, labels, tmp_path / "resumed")
    resumed = train(spec(epochs=2, batch_size=1), images, labels, tmp_path / "resumed")
    assert resumed.history == straight.history


def test_finished_run_is_not_trained_again(data, tmp_path):
    images, labels = data
    done = train(spec(epochs=1), images, labels, tmp_path)
    again = train(spec(epochs=1), images, labels, tmp_path)
    assert again.resumed_from == 1 * 2
    assert again.weights == done.weights
    assert again.history == done.history


def test_different_seeds_differ(data, tmp_path):
    images, labels = data
    a = train(spec(epochs=1, seed=0), images, labels, tmp_path / "a")
    b = train(spec(epochs=1, seed=1), images, labels, tmp_path / "b")
    assert not same_weights(a.weights, b.weights)


@pytest.mark.parametrize("precision", ["fp16-mixed", "bf16-mixed"])
def test_mixed_precision_on_cpu(data, tmp_path, precision):
    images, labels = data
    result = train(spec(precision=precision), images, labels, tmp_path, device="cpu")
    assert len(result.history) == 2
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    for name, tensor in load(result.weights).items():
        assert tensor.dtype == torch.float32, name  # master weights stay fp32
        assert torch.isfinite(tensor).all(), name


def test_no_cases_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no training cases"):
        train(spec(), np.zeros((0, 1, 16, 16, 16), np.float32), np.zeros((0, 1, 16, 16, 16), np.uint8), tmp_path)


def test_epoch_order_is_a_pure_function():
    assert np.array_equal(epoch_order(10, 1, 2), epoch_order(10, 1, 2))
    assert sorted(epoch_order(10, 1, 2)) == list(range(10))
    assert not np.array_equal(epoch_order(10, 1, 2), epoch_order(10, 1, 3))


def test_default_loss_trains_on_one_channel_labels(data, tmp_path):
    images, labels = data
    default = TrainSpec(network=copy.deepcopy(NETWORK), epochs=1, batch_size=2, precision="fp32")
    result = train(default, images, labels, tmp_path)
    assert math.isfinite(result.history[0]["train_loss"])
