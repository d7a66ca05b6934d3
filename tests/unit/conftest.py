"""Shared fixtures of the unit tests: the demo spec, a tiny network, a tiny synthetic dataset."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_SPEC = REPO_ROOT / "deployments" / "specs" / "demo.yaml"

TINY_NETWORK = {
    "UNet": {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 2,
        "channels": [4, 8],
        "strides": [2],
        "num_res_units": 0,
    }
}
TINY_LOSS = {"DiceCELoss": {"to_onehot_y": True, "softmax": True}}
TINY_SIZE = 16


@pytest.fixture(scope="session")
def demo_spec_path() -> Path:
    return DEMO_SPEC


@pytest.fixture
def demo_data() -> dict:
    """The demo spec as a plain (mutable) mapping."""
    return yaml.safe_load(DEMO_SPEC.read_text())


@pytest.fixture(scope="session")
def tiny_spec():
    """The demo spec with a tiny UNet and a 16^3 spatial size, fp32."""
    from voxelflow.config import validate_spec

    data = yaml.safe_load(DEMO_SPEC.read_text())
    for item in data["preprocess"]["transforms"]:
        for kwargs in item.values():
            if "spatial_size" in kwargs:
                kwargs["spatial_size"] = [TINY_SIZE] * 3
    data["train"]["network"] = copy.deepcopy(TINY_NETWORK)
    data["train"]["loss"] = copy.deepcopy(TINY_LOSS)
    data["train"]["precision"] = "fp32"
    data["promote"]["model_name"] = "tiny-unet"
    return validate_spec(data, "tiny")


@pytest.fixture(scope="session")
def tiny_model_config(tiny_spec) -> dict:
    """What ``voxelflow.pipeline.model_config`` makes for the tiny spec."""
    pre = tiny_spec.preprocess
    return {
        "network": copy.deepcopy(tiny_spec.train.network),
        "transforms": copy.deepcopy(pre.transforms),
        "spatial_size": list(pre.spatial_size),
        "precision": tiny_spec.train.precision,
    }


@pytest.fixture(scope="session")
def tiny_weights():
    """Safetensors bytes of two untrained tiny UNets with different seeds."""
    import torch

    from voxelflow.train import build_network, state_dict_bytes

    out = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        out.append(state_dict_bytes(build_network(copy.deepcopy(TINY_NETWORK))))
    return out


@pytest.fixture(scope="session")
def synth_source(tmp_path_factory) -> Path:
    """Three 24^3 labelled synthetic cases in the Decathlon layout (read-only for the tests)."""
    from voxelflow.synthetic import make_decathlon

    return make_decathlon(tmp_path_factory.mktemp("synth") / "incoming", n_cases=3, size=24)


@pytest.fixture(scope="session")
def ingested(synth_source, tmp_path_factory):
    """The synthetic cases ingested into a raw store; returns (layout, report)."""
    from voxelflow.config import DataSpec
    from voxelflow.ingest import ingest
    from voxelflow.storage import Layout

    layout = Layout(tmp_path_factory.mktemp("ingested") / "home", "p")
    report = ingest(DataSpec(source=str(synth_source), layout="decathlon"), layout, str(synth_source))
    assert len(report.ingested) == 3, report.summary()
    return layout, report
