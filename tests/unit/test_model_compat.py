"""A model registered before the library was laid out by concern (its MLflow entry file imports
``voxelflow.model``, its code copy is the flat layout) still loads and scores: through voxelflow's own loader
and as an MLflow pyfunc in a process that has today's voxelflow imported, with the mask it gave then."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import numpy as np
import pytest

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "model-registered-before-the-layout.tar.gz"
# what that model gave, computed with the code that registered it, on volume() with 1.5 mm voxels
EXPECTED_SUM, EXPECTED_SHA = 3159, "b8574bbd7c62c1b5"


def volume() -> np.ndarray:
    rng = np.random.default_rng(7)
    vol = rng.random((20, 18, 22), dtype=np.float32)
    vol[6:14, 5:13, 7:15] += 1.0
    return vol


def digest(mask: np.ndarray) -> tuple[int, str]:
    return int(mask.sum()), hashlib.sha256(np.ascontiguousarray(mask).tobytes()).hexdigest()[:16]


@pytest.fixture(scope="module")
def old_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("old-model")
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(out, filter="data")
    return out / "model"


def test_voxelflow_loads_and_scores_a_model_registered_before_the_layout(old_model):
    from voxelflow.learn.model import Segmenter

    mask = Segmenter.from_dir(old_model / "artifacts").segment(volume(), np.diag([1.5, 1.5, 1.5, 1.0]))
    assert digest(mask) == (EXPECTED_SUM, EXPECTED_SHA)


def test_mlflow_loads_it_beside_todays_voxelflow(old_model):
    import mlflow

    import voxelflow.learn.model  # noqa: F401 - today's layout is imported first, as in a running service

    model = mlflow.pyfunc.load_model(str(old_model))
    mask = model.predict(volume(), params={"spacing": [1.5, 1.5, 1.5]})
    assert digest(np.asarray(mask, dtype=np.uint8)) == (EXPECTED_SUM, EXPECTED_SHA)
