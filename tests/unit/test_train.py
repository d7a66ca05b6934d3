"""Training: tiny runs, checkpoints, exact resume, mixed precision on CPU."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load

from voxelflow.core.storage import Store
from voxelflow.learn.train import ArrayCases, Checkpoints, epoch_order, load_network, train
from voxelflow.spec.config import TrainSpec

NETWORK = {"UNet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                    "channels": [4, 8], "strides": [2], "num_res_units": 0}}
LOSS = {"DiceCELoss": {"to_onehot_y": True, "softmax": True}}

pytestmark = pytest.mark.usefixtures("one_thread")


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


def ckpts(tmp_path, name: str = "ckpt", keep: int = 2) -> Checkpoints:
    return Checkpoints(Store(tmp_path / "store"), f"checkpoints/p/{name}", keep=keep)


def same_weights(a: bytes, b: bytes) -> bool:
    ta, tb = load(a), load(b)
    return set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_tiny_training(data, tmp_path):
    images, labels = data
    epochs_seen = []
    checkpoints = ckpts(tmp_path)
    result = train(spec(), ArrayCases(images, labels), checkpoints, on_epoch=lambda e, m: epochs_seen.append((e, m)))
    assert [h["epoch"] for h in result.history] == [0, 1]
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    assert [e for e, _ in epochs_seen] == [0, 1]
    assert epochs_seen[1][1]["train_loss"] == result.history[1]["train_loss"]
    assert result.steps == 4  # 2 epochs x ceil(4 / 2)
    assert result.resumed_from is None
    assert result.device == "cpu"
    # the final step is always checkpointed
    assert checkpoints.steps()[-1] == "step-00000004.pt"
    state = checkpoints.load_latest("cpu")
    assert state["step"] == 4 and len(state["history"]) == 2
    assert set(state) == {"model", "optimizer", "scaler", "scheduler", "step", "history", "running", "best", "rng"}
    # the returned weights are safetensors that rebuild the network
    net = load_network(NETWORK, result.weights, "cpu")
    assert not net.training
    with torch.no_grad():
        out = net(torch.as_tensor(images[:1]))
    assert tuple(out.shape) == (1, 2, 16, 16, 16)
    # training changed the weights
    torch.manual_seed(3)
    from voxelflow.learn.train import build_network, state_dict_bytes

    assert not same_weights(result.weights, state_dict_bytes(build_network(NETWORK)))


def test_checkpoints_every_n_steps_keep_the_last_two(data, tmp_path):
    images, labels = data
    checkpoints = ckpts(tmp_path)
    train(spec(epochs=3, checkpoint_every_steps=1), ArrayCases(images, labels), checkpoints)
    assert checkpoints.steps() == ["step-00000005.pt", "step-00000006.pt"]
    # nothing else under the prefix: no temporary files of the atomic writes
    assert checkpoints.store.files(checkpoints.prefix) == [f"{checkpoints.prefix}/{n}" for n in checkpoints.steps()]
    folder = tmp_path / "store" / "checkpoints" / "p" / "ckpt"
    assert sorted(p.name for p in folder.iterdir()) == checkpoints.steps()


def test_uneven_last_batch(data, tmp_path):
    images, labels = data
    result = train(spec(batch_size=3, epochs=1), ArrayCases(images[:4], labels[:4]), ckpts(tmp_path))
    assert result.steps == 2 and len(result.history) == 1


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(data, tmp_path):
    images, labels = data
    straight = train(spec(epochs=2), ArrayCases(images, labels), ckpts(tmp_path, "straight"))

    first = train(spec(epochs=1), ArrayCases(images, labels), ckpts(tmp_path, "resumed"))
    assert first.steps == 2
    resumed = train(spec(epochs=2), ArrayCases(images, labels), ckpts(tmp_path, "resumed"))
    assert resumed.resumed_from == 2
    assert resumed.steps == 4
    assert [h["epoch"] for h in resumed.history] == [0, 1]
    assert resumed.history == straight.history  # resumed at an epoch boundary: same losses
    assert same_weights(resumed.weights, straight.weights)
    assert resumed.weights == straight.weights  # byte-identical safetensors


def _interrupted_mid_epoch(images, labels, checkpoints: Checkpoints, torn: bool = False) -> None:
    """A run of 4 steps per epoch that stopped after step 3, in the middle of epoch 0.

    ``torn``: step 4's checkpoint is there but truncated (killed mid-write where writes are not atomic).
    """
    train(spec(epochs=1, batch_size=1, checkpoint_every_steps=3), ArrayCases(images, labels), checkpoints)
    assert checkpoints.steps() == ["step-00000003.pt", "step-00000004.pt"]
    key = f"{checkpoints.prefix}/step-00000004.pt"
    if torn:
        checkpoints.store.write_bytes(key, checkpoints.store.read_bytes(key)[:1000])
    else:
        checkpoints.store.remove(key)
    assert checkpoints.load_latest("cpu")["step"] == 3


@pytest.mark.parametrize("torn", [False, True], ids=["lost", "torn"])
def test_resume_mid_epoch_gives_the_same_weights(data, tmp_path, torn):
    images, labels = data
    straight = train(spec(epochs=2, batch_size=1), ArrayCases(images, labels), ckpts(tmp_path, "straight"))
    _interrupted_mid_epoch(images, labels, ckpts(tmp_path, "resumed"), torn=torn)
    resumed = train(spec(epochs=2, batch_size=1), ArrayCases(images, labels), ckpts(tmp_path, "resumed"))
    assert resumed.resumed_from == 3
    assert resumed.steps == 8
    assert [h["epoch"] for h in resumed.history] == [0, 1]
    assert resumed.history[1] == straight.history[1]
    assert resumed.weights == straight.weights


def test_resume_mid_epoch_gives_the_same_history(data, tmp_path):
    images, labels = data
    straight = train(spec(epochs=2, batch_size=1), ArrayCases(images, labels), ckpts(tmp_path, "straight"))
    _interrupted_mid_epoch(images, labels, ckpts(tmp_path, "resumed"))
    resumed = train(spec(epochs=2, batch_size=1), ArrayCases(images, labels), ckpts(tmp_path, "resumed"))
    assert resumed.history == straight.history


def test_finished_run_is_not_trained_again(data, tmp_path):
    images, labels = data
    done = train(spec(epochs=1), ArrayCases(images, labels), ckpts(tmp_path))
    again = train(spec(epochs=1), ArrayCases(images, labels), ckpts(tmp_path))
    assert again.resumed_from == 1 * 2
    assert again.weights == done.weights
    assert again.history == done.history


def test_different_seeds_differ(data, tmp_path):
    images, labels = data
    a = train(spec(epochs=1, seed=0), ArrayCases(images, labels), ckpts(tmp_path, "a"))
    b = train(spec(epochs=1, seed=1), ArrayCases(images, labels), ckpts(tmp_path, "b"))
    assert not same_weights(a.weights, b.weights)


def test_fp16_on_the_cpu_is_refused_before_anything_is_written(data, tmp_path):
    images, labels = data
    with pytest.raises(ValueError, match="fp16-mixed needs a CUDA device.*bf16-mixed or fp32"):
        train(spec(precision="fp16-mixed"), ArrayCases(images, labels), ckpts(tmp_path), device="cpu")
    assert ckpts(tmp_path).steps() == []


def test_mixed_precision_on_cpu(data, tmp_path, precision="bf16-mixed"):
    images, labels = data
    result = train(spec(precision=precision), ArrayCases(images, labels), ckpts(tmp_path), device="cpu")
    assert len(result.history) == 2
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    for name, tensor in load(result.weights).items():
        assert tensor.dtype == torch.float32, name  # master weights stay fp32
        assert torch.isfinite(tensor).all(), name


def test_no_cases_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no training cases"):
        train(spec(), ArrayCases(np.zeros((0, 1, 16, 16, 16), np.float32), np.zeros((0, 1, 16, 16, 16), np.uint8)),
              ckpts(tmp_path))


def test_epoch_order_is_a_pure_function():
    assert np.array_equal(epoch_order(10, 1, 2), epoch_order(10, 1, 2))
    assert sorted(epoch_order(10, 1, 2)) == list(range(10))
    assert not np.array_equal(epoch_order(10, 1, 2), epoch_order(10, 1, 3))


def test_default_loss_trains_on_one_channel_labels(data, tmp_path):
    images, labels = data
    default = TrainSpec(network=copy.deepcopy(NETWORK), epochs=1, batch_size=2, precision="fp32")
    result = train(default, ArrayCases(images, labels), ckpts(tmp_path))
    assert math.isfinite(result.history[0]["train_loss"])


# ---------------------------------------------------------------- optimizer and scheduler from the spec


def test_optimizer_and_scheduler_by_name(data, tmp_path):
    images, labels = data
    s = spec(epochs=3, optimizer={"SGD": {"lr": 0.1, "momentum": 0.9}}, scheduler={"StepLR": {"step_size": 1,
                                                                                             "gamma": 0.5}})
    result = train(s, ArrayCases(images, labels), ckpts(tmp_path))
    assert [h["lr"] for h in result.history] == pytest.approx([0.1, 0.05, 0.025])  # lr of each epoch's steps
    adam = train(spec(epochs=1), ArrayCases(images, labels), ckpts(tmp_path, "adam"))
    assert adam.history[0]["lr"] == pytest.approx(0.01)  # default: Adam at train.learning_rate


def test_resume_mid_epoch_restores_the_scheduler(data, tmp_path):
    images, labels = data
    over = dict(optimizer={"AdamW": {"weight_decay": 0.01}}, scheduler={"CosineAnnealingLR": {"T_max": 2}})
    straight = train(spec(epochs=2, batch_size=1, **over), ArrayCases(images, labels), ckpts(tmp_path, "straight"))
    first = spec(epochs=1, batch_size=1, checkpoint_every_steps=3, **over)
    train(first, ArrayCases(images, labels), ckpts(tmp_path, "resumed"))
    ckpts(tmp_path, "resumed").store.remove("checkpoints/p/resumed/step-00000004.pt")  # stopped after step 3
    resumed = train(spec(epochs=2, batch_size=1, **over), ArrayCases(images, labels), ckpts(tmp_path, "resumed"))
    assert resumed.resumed_from == 3
    assert resumed.history == straight.history
    assert resumed.weights == straight.weights


@pytest.mark.parametrize("over, message", [
    ({"network": {"UNet": {**NETWORK["UNet"], "channels": "abc"}}}, r"network 'UNet': argument 'channels' = 'abc'"),
    ({"network": {"UNet": {**NETWORK["UNet"], "spatial_dims": "three"}}}, r"argument 'spatial_dims' = 'three'"),
    ({"optimizer": {"AdamW": {"lr": "fast"}}}, r"optimizer 'AdamW': argument 'lr' = 'fast'"),
    ({"optimizer": {"AdamW": {"betas": 0.9}}}, r"optimizer 'AdamW': argument 'betas' = 0.9"),
    ({"optimizer": {"Adamm": {}}}, r"unknown optimizer 'Adamm': expected a class in torch.optim"),
    ({"optimizer": {"SGD": {"momentum": 0.9, "nesterov": True, "lr_decay": 1}}}, r"has no argument lr_decay"),
    ({"optimizer": {"SGD": {"params": []}}}, r"params is supplied by training"),
    ({"scheduler": {"StepLR": {"gamma": 0.5}}}, r"scheduler 'StepLR' needs the argument\(s\) step_size"),
    ({"scheduler": {"StepLR": {"step_size": "often"}}}, r"argument 'step_size' = 'often'"),
    ({"scheduler": "ReduceLROnPlateau"}, r"ReduceLROnPlateau' needs a validation metric"),
    ({"loss": {"DiceCELoss": {"lambda_dice": "x"}}}, r"loss 'DiceCELoss': argument 'lambda_dice' = 'x'"),
])
def test_bad_component_arguments_are_refused_at_spec_load_naming_the_key(demo_data, tmp_path, over, message):
    import yaml

    from voxelflow.spec.config import SpecError, load_spec

    demo_data["train"].update(over)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(demo_data))
    with pytest.raises(SpecError, match=message):
        load_spec(path)


def test_tensor_and_tuple_arguments_take_yaml_lists():
    s = TrainSpec(network={"UNet": {**NETWORK["UNet"], "act": ["prelu", {"init": 0.2}], "kernel_size": [3, 3, 3]}},
                  loss={"DiceCELoss": {"weight": [1.0, 2.0]}}, optimizer={"AdamW": {"betas": [0.9, 0.99]}},
                  scheduler={"PolynomialLR": {"total_iters": 10, "power": 0.9}})
    assert s.optimizer == {"AdamW": {"betas": [0.9, 0.99]}}


# ---------------------------------------------------------------- Checkpoints, on a folder and on S3


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Store:
    if request.param == "local":
        return Store(tmp_path / "store")
    return request.getfixturevalue("s3_store")


def tiny_state(step: int) -> dict:
    return {"step": step, "weights": torch.full((3,), float(step)), "history": [{"epoch": 0, "train_loss": 0.5}]}


def test_checkpoints_save_list_load_and_keep(store):
    checkpoints = Checkpoints(store, "checkpoints/p/run")
    assert checkpoints.steps() == [] and checkpoints.load_latest("cpu") is None
    key = checkpoints.save(7, tiny_state(7))
    assert key == "checkpoints/p/run/step-00000007.pt"
    state = checkpoints.load_latest("cpu")
    assert state["step"] == 7 and torch.equal(state["weights"], torch.full((3,), 7.0))
    checkpoints.save(12, tiny_state(12))
    checkpoints.save(100, tiny_state(100))
    assert checkpoints.steps() == ["step-00000012.pt", "step-00000100.pt"]  # the last two, in step order
    assert checkpoints.load_latest("cpu")["step"] == 100
    assert store.files("checkpoints/p/run") == [f"checkpoints/p/run/{n}" for n in checkpoints.steps()]
    store.write_bytes("checkpoints/p/run/notes.txt", b"not a checkpoint")
    assert checkpoints.steps() == ["step-00000012.pt", "step-00000100.pt"]
    checkpoints.clear()
    assert checkpoints.steps() == [] and store.files("checkpoints/p/run") == []
    assert checkpoints.load_latest("cpu") is None


def test_checkpoints_keep_more_when_asked(store):
    checkpoints = Checkpoints(store, "ck", keep=3)
    for step in range(1, 6):
        checkpoints.save(step, tiny_state(step))
    assert checkpoints.steps() == [f"step-{s:08d}.pt" for s in (3, 4, 5)]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_newest_checkpoint_falls_back_to_the_one_before(store, damage):
    checkpoints = Checkpoints(store, "checkpoints/p/run")
    checkpoints.save(1, tiny_state(1))
    newest = checkpoints.save(2, tiny_state(2))
    good = store.read_bytes(newest)
    broken = {"garbage": b"\x00not a torch file" * 10, "truncated": good[: len(good) // 2], "empty": b""}[damage]
    store.write_bytes(newest, broken)
    state = checkpoints.load_latest("cpu")
    assert state is not None and state["step"] == 1
    assert torch.equal(state["weights"], torch.ones(3))
    store.write_bytes(f"{checkpoints.prefix}/step-00000001.pt", broken)  # every checkpoint unreadable
    assert checkpoints.load_latest("cpu") is None


def test_checkpoints_refuse_pickled_code(store):
    """load_latest uses weights_only: a checkpoint carrying an arbitrary object is not executed."""
    checkpoints = Checkpoints(store, "ck")
    checkpoints.save(1, tiny_state(1))
    buf = io.BytesIO()
    torch.save({"step": 2, "payload": Store("/tmp")}, buf)  # any non-tensor class needs a full unpickle
    store.write_bytes("ck/step-00000002.pt", buf.getvalue())
    assert checkpoints.load_latest("cpu")["step"] == 1


def test_training_on_s3_checkpoints_resumes(data, s3_store):
    images, labels = data
    checkpoints = Checkpoints(s3_store, "checkpoints/p/run")
    first = train(spec(epochs=1), ArrayCases(images, labels), checkpoints)
    assert checkpoints.steps() == ["step-00000002.pt"]
    resumed = train(spec(epochs=2), ArrayCases(images, labels), Checkpoints(Store(s3_store.url), "checkpoints/p/run"))
    assert first.steps == 2 and resumed.resumed_from == 2 and resumed.steps == 4
    assert checkpoints.steps() == ["step-00000002.pt", "step-00000004.pt"]


def test_auto_precision_is_fp32_on_a_cpu():
    from voxelflow.learn.train import resolve_precision

    assert resolve_precision("auto", torch.device("cpu")) == "fp32"  # emulated bf16 is ~10x slower there
    assert resolve_precision("bf16-mixed", torch.device("cpu")) == "bf16-mixed"  # asked for: done
    assert TrainSpec(network=copy.deepcopy(NETWORK)).precision == "auto"


def test_a_cpu_network_trains_channels_last_and_its_weights_load_either_way(data, tmp_path):
    """On a CPU the 3-D convolutions' weights train in NDHWC (faster there, the same arithmetic to rounding):
    the trained weights are contiguous safetensors, and a checkpoint resumes into a network of either layout."""
    from voxelflow.learn.train import build_loss, build_network, for_training, state_dict_bytes

    net = for_training(build_network(copy.deepcopy(NETWORK)), torch.device("cpu"))
    convs = [p for p in net.parameters() if p.dim() == 5]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in convs)
    plain = for_training(build_network(copy.deepcopy(NETWORK)), torch.device("cpu"), world=2)
    assert all(p.is_contiguous() for p in plain.parameters())

    images, labels = data
    result = train(spec(), ArrayCases(images, labels), ckpts(tmp_path))
    assert all(t.is_contiguous() for t in load(result.weights).values())
    # the same steps in the default layout: the same losses, to float rounding
    x, y = torch.as_tensor(images), torch.as_tensor(labels).long()
    losses = []
    for layout in (torch.contiguous_format, torch.channels_last_3d):
        torch.manual_seed(0)
        n = build_network(copy.deepcopy(NETWORK)).to(memory_format=layout)
        opt = torch.optim.Adam(n.parameters(), 0.01)
        loss_fn = build_loss(copy.deepcopy(LOSS))
        for _ in range(3):
            opt.zero_grad()
            loss = loss_fn(n(x), y)
            loss.backward()
            opt.step()
        losses.append(float(loss.detach()))
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    # a checkpoint written by the channels-last run resumes into a default-layout network
    state = ckpts(tmp_path).load_latest("cpu")
    fresh = build_network(copy.deepcopy(NETWORK))
    fresh.load_state_dict(state["model"])
    assert all(p.is_contiguous() for p in fresh.parameters())
    assert same_weights(result.weights, state_dict_bytes(fresh))
