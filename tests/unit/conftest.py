"""Shared fixtures of the unit tests: the demo spec, a tiny network, a tiny synthetic dataset,
a fresh database (SQLite; PostgreSQL when ``VOXELFLOW_TEST_DATABASE_URL`` names a server) and an
S3 bucket served by moto on loopback."""

from __future__ import annotations

import copy
import os
import uuid
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
    from voxelflow.spec.config import validate_spec

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
        "sliding_window": {"roi_size": list(pre.spatial_size), "overlap": 0.25, "sw_batch_size": 4,
                           "mode": "constant"},
        "precision": tiny_spec.train.precision,
    }


@pytest.fixture(scope="session")
def tiny_weights():
    """Safetensors bytes of two untrained tiny UNets with different seeds."""
    import torch

    from voxelflow.learn.train import build_network, state_dict_bytes

    out = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        out.append(state_dict_bytes(build_network(copy.deepcopy(TINY_NETWORK))))
    return out


@pytest.fixture(scope="module")
def segmenter(tiny_model_config, tiny_weights):
    """The tiny network as the service's segmenter, on the CPU."""
    from voxelflow.learn.model import Segmenter

    return Segmenter(tiny_model_config, tiny_weights[0], device="cpu")


@pytest.fixture(scope="session")
def synth_source(tmp_path_factory) -> Path:
    """Three 24^3 labelled synthetic cases in the Decathlon layout (read-only for the tests)."""
    from voxelflow.data.synthetic import make_decathlon

    return make_decathlon(tmp_path_factory.mktemp("synth") / "incoming", n_cases=3, size=24)


@pytest.fixture(scope="session")
def ingested(synth_source, tmp_path_factory):
    """The synthetic cases ingested into a raw store (home/voxelflow.db holds the ledger); returns (layout, report)."""
    from voxelflow.core.db import Database
    from voxelflow.core.storage import Layout, Store
    from voxelflow.data.ingest import ingest
    from voxelflow.spec.config import DataSpec

    home = tmp_path_factory.mktemp("ingested") / "home"
    layout = Layout(Store(home), "p")
    db = Database(f"sqlite:///{home / 'voxelflow.db'}")
    report = ingest(DataSpec(source=str(synth_source), layout="decathlon"), layout, db, str(synth_source))
    db.dispose()
    assert len(report.ingested) == 3, report.summary()
    return layout, report


# ---------------------------------------------------------------- databases

PG_ENV = "VOXELFLOW_TEST_DATABASE_URL"


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    """The URL of a fresh SQLite file (not created yet)."""
    return f"sqlite:///{tmp_path / 'db' / 'voxelflow.db'}"


@pytest.fixture
def db(sqlite_url):
    """A migrated :class:`~voxelflow.core.db.Database` on a fresh SQLite file."""
    from voxelflow.core.db import Database

    database = Database(sqlite_url)
    yield database
    database.dispose()


@pytest.fixture
def pg_url() -> str:
    """A fresh PostgreSQL database on the server of ``$VOXELFLOW_TEST_DATABASE_URL``, dropped afterwards.

    The variable names a database on that server to connect to (for example
    ``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``); the test is skipped when it is unset.
    """
    from tests.services import fresh_postgres

    admin_url = os.environ.get(PG_ENV)
    if not admin_url:
        pytest.skip(f"{PG_ENV} is not set: no PostgreSQL server to test against "
                    "(e.g. postgresql+psycopg://postgres@127.0.0.1:5432/postgres)")
    with fresh_postgres(admin_url) as url:
        yield url


# ---------------------------------------------------------------- S3 (moto on loopback)


@pytest.fixture(scope="session")
def s3_store_url(tmp_path_factory) -> str:
    """``s3://bucket/prefix`` on a moto S3 server on 127.0.0.1, for the whole session.

    The AWS_* variables that point clients (s3fs, botocore) at it are set in ``os.environ`` and
    restored when the session ends; the server is stopped then too.
    """
    from tests.services import moto_s3, scoped_environ

    with moto_s3(tmp_path_factory.mktemp("moto"), bucket="voxelflow-test") as env, scoped_environ(env):
        yield "s3://voxelflow-test/unit"


@pytest.fixture
def s3_store(s3_store_url):
    """A :class:`~voxelflow.core.storage.Store` under a prefix of its own in the session's bucket."""
    from voxelflow.core.storage import Store

    return Store(f"{s3_store_url}/{uuid.uuid4().hex[:12]}")


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: bit-exact comparisons between runs in and out of processes."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
