"""A model built from a user's own network and transform classes carries their package: it loads with
``mlflow.pyfunc.load_model`` in a process where that package cannot be imported, and lineage names
the package's version."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest

from voxelflow.core import user_code

NETS = '''
import torch


class Net(torch.nn.Module):
    def __init__(self, in_channels: int = 1, out_channels: int = 2):
        super().__init__()
        self.conv = torch.nn.Conv3d(in_channels, out_channels, 1)

    def forward(self, x):
        return self.conv(x)
'''

TRANSFORMS = '''
from monai.transforms import MapTransform


class Shift(MapTransform):
    def __call__(self, data):
        return {k: (v + 0.5 if k in self.keys else v) for k, v in data.items()}
'''


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """``vf_usernet`` (a network and a transform) importable here only, and allowed."""
    root = tmp_path / "userpkgs"
    pkg = root / "vf_usernet"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('__version__ = "1.4.2"\n')
    (pkg / "nets.py").write_text(textwrap.dedent(NETS))
    (pkg / "transforms.py").write_text(textwrap.dedent(TRANSFORMS))
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("VOXELFLOW_ALLOWED_IMPORTS", "monai,torch,voxelflow,vf_usernet")
    yield pkg
    for name in [m for m in sys.modules if m.split(".")[0] == "vf_usernet"]:
        del sys.modules[name]


LOAD = '''
import importlib.util, json, sys
import mlflow, numpy as np
assert importlib.util.find_spec("vf_usernet") is None, "the user's package must not be importable here"
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
out = model.predict(np.zeros((8, 8, 8), np.float32))
print(json.dumps({"shape": list(out.shape), "dtype": str(out.dtype)}))
'''


def test_a_model_with_a_users_classes_loads_where_their_package_is_not_installed(
        user_package, tiny_model_config, tmp_path):
    from mlflow import MlflowClient

    from voxelflow.learn.train import build_network, state_dict_bytes
    from voxelflow.release import registry
    from voxelflow.spec.config import validate_spec  # noqa: F401 - the spec machinery accepts these paths

    config = copy.deepcopy(tiny_model_config)
    config["network"] = {"vf_usernet.nets:Net": {"in_channels": 1, "out_channels": 2}}
    config["transforms"] = [*config["transforms"], {"vf_usernet.transforms:Shift": {"keys": ["image"]}}]
    assert user_code.packages(config) == ["vf_usernet"]
    assert user_code.code_paths(config) == [str(user_package)]
    weights = state_dict_bytes(build_network(config["network"]))

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mc = MlflowClient(tracking_uri=uri)
    exp = mc.create_experiment("user-code", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = mc.create_run(exp).info.run_id
    model_uri = registry.log_model(uri, run_id, config, weights)

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VOXELFLOW_ALLOWED_IMPORTS")}
    done = subprocess.run([sys.executable, "-c", LOAD, uri, model_uri], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"shape": [8, 8, 8], "dtype": "uint8"}


def test_lineage_names_the_users_package_and_its_version(user_package, demo_data):
    from voxelflow import pipeline
    from voxelflow.spec.config import validate_spec

    demo_data["train"]["network"] = {"vf_usernet.nets:Net": {"out_channels": 2}}
    spec = validate_spec(demo_data, "demo")
    entry = pipeline.lineage(spec, "d" * 16)["user_code"]
    assert entry.startswith("vf_usernet=1.4.2+src.")
    # an edit to the package's source shows in lineage even when its version stays
    (user_package / "nets.py").write_text(textwrap.dedent(NETS) + "\n# tuned\n")
    assert pipeline.lineage(spec, "d" * 16)["user_code"] != entry
    plain = validate_spec({**demo_data, "train": {**demo_data["train"], "network": {"UNet": {
        "spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2]}}}}, "demo")
    assert "user_code" not in pipeline.lineage(plain, "d" * 16)


def test_an_installed_distribution_is_named_by_its_version():
    from importlib.metadata import version

    assert user_code.version_of("yaml").startswith(f"PyYAML=={version('PyYAML')}+src.")
