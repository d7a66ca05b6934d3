"""A placed stage refuses to start on a worker whose database or MLflow differs from the lifecycle's,
naming which differs and never printing either address; equal places spelled differently agree."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.stages import context_for, peers_of
from tests.flows.conftest import make_spec
from voxelflow.core import addresses
from voxelflow.pipeline import Context
from voxelflow.spec.config import Settings


@pytest.fixture
def worker_env(monkeypatch, tmp_path):
    """The worker's settings: a home of its own, with the store the lifecycle uses."""
    for var in ("VOXELFLOW_DATABASE_URL", "VOXELFLOW_MLFLOW_TRACKING_URI", "VOXELFLOW_STORE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("VOXELFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VOXELFLOW_STORE", str(tmp_path / "store"))
    return monkeypatch


def lifecycle_ctx(tmp_path: Path, **settings) -> Context:
    return Context(Settings(home=tmp_path / "home", store=str(tmp_path / "store"), **settings), "p")


def test_a_worker_on_the_lifecycles_services_starts(worker_env, tmp_path):
    lifecycle = lifecycle_ctx(tmp_path)
    ctx = context_for(make_spec("agree"), lifecycle.store.url, peers_of(lifecycle))
    assert ctx.settings.database == lifecycle.settings.database


@pytest.mark.parametrize("which, named", [("database", "database (VOXELFLOW_DATABASE_URL)"),
                                          ("tracking", "MLflow tracking URI (VOXELFLOW_MLFLOW_TRACKING_URI)")])
def test_a_worker_on_another_database_or_mlflow_is_refused_naming_which(worker_env, tmp_path, which, named):
    secret = "s3cr3t-pw"
    other = f"postgresql+psycopg://voxelflow:{secret}@db.example:5432/voxelflow"
    lifecycle = lifecycle_ctx(tmp_path, **({"database_url": other} if which == "database"
                                           else {"mlflow_tracking_uri": f"http://ml:{secret}@mlflow.example:5000"}))
    with pytest.raises(RuntimeError) as refused:
        context_for(make_spec("agree"), lifecycle.store.url, peers_of(lifecycle))
    message = str(refused.value)
    assert named in message and "differ from the lifecycle's" in message
    assert secret not in message and "example" not in message
    other_name = next(n for k, n in addresses.NAMES.items() if k != which)
    assert other_name not in message


def test_one_place_spelled_two_ways_is_one_digest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    db = addresses.digest
    assert db("database", "postgresql+psycopg://u:a@DB.example/v") == db("database", "postgresql://u:b@db.example:5432/v")
    assert db("database", "postgresql://db.example/v") != db("database", "postgresql://db.example/w")
    assert db("database", "sqlite:///x.db") == db("database", f"sqlite:///{tmp_path / 'x.db'}")
    assert db("tracking", "http://mlflow:5000/") == db("tracking", "http://user:pw@MLFLOW:5000")
    assert db("tracking", "http://mlflow:5000") != db("tracking", "http://mlflow:5001")
    assert db("tracking", "sqlite:///mlflow.db") == db("tracking", f"sqlite:///{tmp_path / 'mlflow.db'}")
