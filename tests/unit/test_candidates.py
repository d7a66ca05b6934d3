"""The spec's ``candidates``: expansion (grid, list, seeded random), each candidate validated in full at load with
errors naming the candidate and the key, values replacing whole, and which candidates share preprocessing."""

from __future__ import annotations

import copy

import pytest

from voxelflow.data.preprocess import transform_digest
from voxelflow.spec.candidates import higher_is_better, listing, set_at, shared_preprocessing
from voxelflow.spec.config import SpecError, load_spec, validate_spec

GRID = {"train.learning_rate": [0.01, 0.003], "train.network.UNet.channels": [[8, 16, 32], [16, 32, 64]]}


def with_candidates(demo_data, **section):
    data = copy.deepcopy(demo_data)
    data["candidates"] = {"select": {"metric": "dice"}, **section}
    return validate_spec(data, "demo.yaml")


def test_a_grid_is_every_combination_of_its_values(demo_data):
    spec = with_candidates(demo_data, grid=GRID, max_parallel=2)
    found = spec.candidate_specs()
    assert [(c.spec.train.learning_rate, c.spec.train.network["UNet"]["channels"]) for c in found] == [
        (0.01, [8, 16, 32]), (0.01, [16, 32, 64]), (0.003, [8, 16, 32]), (0.003, [16, 32, 64])]
    assert found[1].overrides == {"train.learning_rate": 0.01, "train.network.UNet.channels": [16, 32, 64]}
    assert all(c.spec.candidates is None for c in found)  # a candidate is the spec without its candidates
    assert found[0].spec.train.network["UNet"]["strides"] == [2, 2]  # the rest of the component is kept
    assert spec.candidates.max_parallel == 2 and higher_is_better(spec, "dice")
    # a candidate that changes nothing is the spec itself: the same digest as the spec without candidates
    same = with_candidates(demo_data, list=[{"train.learning_rate": 0.01}]).candidate_specs()[0].spec
    assert same.digest() == validate_spec(demo_data).digest()


def test_a_component_given_whole_replaces_the_specs(demo_data):
    loss = {"DiceLoss": {"to_onehot_y": True, "softmax": True}}
    spec = with_candidates(demo_data, list=[{"train.epochs": 3}, {"train.loss": loss}])
    first, second = spec.candidate_specs()
    assert (first.spec.train.epochs, first.spec.train.loss) == (3, {"DiceCELoss": {"to_onehot_y": True,
                                                                                    "softmax": True}})
    assert second.spec.train.loss == loss and second.spec.train.epochs == 20  # replaced, not merged into


def test_keys_read_as_set_reads_them(demo_data):
    data = copy.deepcopy(demo_data)
    set_at(data, "preprocess.transforms.Spacingd.pixdim", [2, 2, 2])  # a transform by its name: its arguments
    set_at(data, "preprocess.transforms.0", {"Orientationd": {"keys": ["image", "label"], "axcodes": "LPS"}})
    set_at(data, "train.network.UNet.channels", [4, 8, 16])
    assert data["preprocess"]["transforms"][1]["Spacingd"]["pixdim"] == [2, 2, 2]
    assert data["preprocess"]["transforms"][1]["Spacingd"]["mode"] == ["bilinear", "nearest"]
    assert data["preprocess"]["transforms"][0]["Orientationd"]["axcodes"] == "LPS"
    assert data["train"]["network"]["UNet"]["channels"] == [4, 8, 16]
    with pytest.raises(ValueError, match="the list has 4 elements"):
        set_at(data, "preprocess.transforms.7.x", 1)


def test_random_candidates_are_drawn_from_their_seed(demo_data):
    space = {"train.learning_rate": {"loguniform": [0.0001, 0.01]}, "train.batch_size": {"choice": [1, 2]},
             "evaluate.sliding_window.overlap": {"uniform": [0.0, 0.5]}}
    draw = [c.overrides for c in with_candidates(demo_data, random={"n": 5, "seed": 3, "space": space})
            .candidate_specs()]
    again = [c.overrides for c in with_candidates(demo_data, random={"n": 5, "seed": 3, "space": space})
             .candidate_specs()]
    other = [c.overrides for c in with_candidates(demo_data, random={"n": 5, "seed": 4, "space": space})
             .candidate_specs()]
    assert draw == again and draw != other and len(draw) == 5
    assert all(0.0001 <= o["train.learning_rate"] <= 0.01 and o["train.batch_size"] in (1, 2)
               and 0.0 <= o["evaluate.sliding_window.overlap"] <= 0.5 for o in draw)
    assert len({o["train.learning_rate"] for o in draw}) == 5


@pytest.mark.parametrize("section, message", [
    ({"grid": {"train.learning_rate": [0.01, -1.0]}},
     "candidates.grid: candidate 1 (train.learning_rate=-1): train.learning_rate: Input should be greater than 0"),
    ({"list": [{"train.epochs": 2}, {"train.network.UNet.channel": [4, 8]}]},
     "candidates.list: candidate 1 (train.network.UNet.channel=[4,8]): train.network: network 'UNet' has no "
     "argument channel"),
    ({"grid": {"preprocess.transforms.Nope.x": [1]}}, "candidate 0 (preprocess.transforms.Nope.x=1): "
     "preprocess.transforms.Nope: no single element named 'Nope'"),
    ({"grid": {"data.source": ["/elsewhere"]}}, "candidates.grid.data.source: a candidate may change train, "
     "preprocess"),
    ({"grid": {"train.epochs": 3}}, "candidates.grid.train.epochs: Input should be a valid list"),
    ({"grid": {"train.epochs": [2]}, "list": [{"train.epochs": 3}]}, "give exactly one of grid, list, random"),
    ({"random": {"n": 2, "space": {"train.learning_rate": {"loguniform": [0, 1]}}}},
     "candidates.random.space.train.learning_rate.loguniform: a log scale needs low > 0"),
    ({"random": {"n": 2, "space": {"train.learning_rate": {"uniform": [1, 1]}}}}, "low < high"),
    ({"grid": {"train.epochs": [2]}, "select": {"metric": "iou"}},
     "candidates.select.metric: 'iou' is not a metric evaluation computes for the spec"),
    ({"grid": {"train.network.UNet.out_channels": [2, 1]}, "select": {"metric": "dice_1"}},
     "'dice_1' is not a metric evaluation computes for candidate 1 (train.network.UNet.out_channels=1)"),
    ({"grid": {"train.epochs": [2]}, "max_parallel": 0}, "candidates.max_parallel: Input should be greater"),
    ({"grid": {"train.epochs": [2]}, "chosen": 1}, "candidates.chosen: unknown key"),
])
def test_a_bad_candidate_is_refused_at_load_naming_it_and_its_key(demo_data, section, message):
    data = copy.deepcopy(demo_data)
    data["candidates"] = {"select": {"metric": "dice"}, **section}
    with pytest.raises(SpecError) as caught:
        validate_spec(data, "demo.yaml")
    assert message in str(caught.value)
    assert str(caught.value).startswith("demo.yaml: candidates")


def test_the_direction_comes_from_the_metric(demo_data):
    spec = with_candidates(demo_data, grid={"train.epochs": [2, 3]}, select={"metric": "hausdorff95_1"})
    assert not higher_is_better(spec, "hausdorff95_1") and higher_is_better(spec, "dice_1")


def test_candidates_sharing_preprocessing_share_its_digest(demo_data):
    spec = with_candidates(demo_data, grid={"train.learning_rate": [0.01, 0.003],
                                            "preprocess.transforms.Spacingd.pixdim": [[1.5, 1.5, 1.5], [2, 2, 2]]})
    found = spec.candidate_specs()
    digests = [transform_digest(c.spec.preprocess) for c in found]
    assert digests[0] == digests[2] == transform_digest(spec.preprocess)  # the spec's own spacing
    assert digests[1] == digests[3] != digests[0]
    assert shared_preprocessing(found) == [0, 1, 0, 1]
    train_only = with_candidates(demo_data, grid=GRID).candidate_specs()
    assert len({transform_digest(c.spec.preprocess) for c in train_only}) == 1
    assert shared_preprocessing(train_only) == [0, 0, 0, 0]
    text = listing(spec)
    assert "candidates (grid, 4; the challenger: the best validation dice, higher is better; 1 at once):" in text
    assert "  1: train.learning_rate=0.01, preprocess.transforms.Spacingd.pixdim=[2,2,2]  [its own" in text
    assert "  3: train.learning_rate=0.003, preprocess.transforms.Spacingd.pixdim=[2,2,2]  [the preprocessing of " \
           "candidate 1]" in text


def test_candidates_leave_the_specs_digest_alone_when_absent(demo_data, demo_spec_path):
    plain = load_spec(demo_spec_path)
    assert "candidates" not in plain.model_dump(exclude_none=True)
    assert plain.candidate_specs() == [] and listing(plain) == ""
    assert with_candidates(demo_data, grid=GRID).digest() != plain.digest()  # with them, they are part of it


def test_validate_prints_the_candidates(demo_spec_path, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    overlay = tmp_path / "candidates.yaml"
    overlay.write_text("candidates:\n  grid:\n    train.learning_rate: [0.01, 0.003]\n  select: {metric: dice}\n"
                       "  max_parallel: 2\n")
    result = CliRunner().invoke(app, ["validate", str(demo_spec_path), "--overlay", str(overlay)])
    assert result.exit_code == 0, result.output
    assert "candidates (grid, 2; the challenger: the best validation dice, higher is better; 2 at once):" in \
        result.output
    assert "  1: train.learning_rate=0.003  [the spec's preprocessing]" in result.output
