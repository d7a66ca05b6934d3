"""voxelflow.core.mlflow_schema: a new SQLite tracking database gets MLflow's schema copied in, the same as MLflow's
own migrations make (tables, revision, default experiment), and a run, a model version and an alias work on it; an
existing file is never touched; a template that does not read as its revision is made again; a cache folder others
may write to is refused and, like one that cannot be made, leaves the database to MLflow; two seeders at once leave
one whole database."""

from __future__ import annotations

import re
import sqlite3
import threading

import pytest

from voxelflow.core import mlflow_schema
from voxelflow.core.mlflow_client import client


@pytest.fixture
def cache(tmp_path, monkeypatch):
    where = tmp_path / "cache"
    monkeypatch.setenv("VOXELFLOW_CACHE_DIR", str(where))
    monkeypatch.setattr(mlflow_schema, "_checked", set())
    return where


def schema(path) -> list[tuple]:
    """Every table, index and trigger with its definition's clauses as a set: Alembic's batch migrations rebuild a
    table with its constraints in an order that differs from one process to the next (MLflow's own runs differ so)."""
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")
        return sorted((kind, name, frozenset(re.split(r",\s*\n\t", sql or ""))) for kind, name, sql in rows)


def experiments(uri: str) -> list[tuple]:
    return [(e.experiment_id, e.name, e.lifecycle_stage) for e in client(uri).search_experiments()]


def test_a_seeded_database_is_what_mlflow_makes_and_works(cache, tmp_path):
    import mlflow

    seeded, own = tmp_path / "seeded" / "mlflow.db", tmp_path / "own" / "mlflow.db"
    assert mlflow_schema.seed(f"sqlite:///{seeded}")
    assert seeded.exists() and list(cache.glob("mlflow-*.db"))
    own.parent.mkdir()
    mlflow.MlflowClient(f"sqlite:///{own}").search_experiments()  # MLflow's own migrations, no seeding
    assert schema(seeded) == schema(own)
    assert mlflow_schema.revision_of(seeded) == mlflow_schema.revision_of(own) is not None
    assert experiments(f"sqlite:///{seeded}") == experiments(f"sqlite:///{own}") == [("0", "Default", "active")]

    c = client(f"sqlite:///{seeded}")
    exp = c.create_experiment("e", artifact_location=str(tmp_path / "artifacts"))
    run = c.create_run(exp)
    c.log_metric(run.info.run_id, "dice", 0.9)
    c.create_registered_model("m")
    version = c.create_model_version("m", f"runs:/{run.info.run_id}/model", run.info.run_id)
    c.set_registered_model_alias("m", "champion", version.version)
    assert str(c.get_model_version_by_alias("m", "champion").version) == "1"


def test_an_existing_file_is_never_touched(cache, tmp_path):
    empty = tmp_path / "mlflow.db"
    empty.write_bytes(b"")
    assert not mlflow_schema.seed(f"sqlite:///{empty}")
    assert empty.read_bytes() == b""
    assert not mlflow_schema.seed("postgresql+psycopg://postgres@127.0.0.1:5432/mlflow")
    assert not mlflow_schema.seed("sqlite:///:memory:")


def test_a_template_that_does_not_read_as_its_revision_is_made_again(cache, tmp_path):
    assert mlflow_schema.seed(f"sqlite:///{tmp_path / 'a.db'}")
    [made] = cache.glob("mlflow-*.db")
    made.write_bytes(b"not a database")
    mlflow_schema._checked.clear()
    assert mlflow_schema.seed(f"sqlite:///{tmp_path / 'b.db'}")
    assert mlflow_schema.revision_of(made) == mlflow_schema.revision_of(tmp_path / "b.db") is not None
    assert experiments(f"sqlite:///{tmp_path / 'b.db'}") == [("0", "Default", "active")]


def test_a_cache_others_may_write_to_is_refused_and_mlflow_makes_the_database(tmp_path, monkeypatch, caplog):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("VOXELFLOW_CACHE_DIR", str(shared))
    monkeypatch.setattr(mlflow_schema, "_checked", set())
    with pytest.raises(PermissionError, match="only this user can use"):
        mlflow_schema.cache_folder()
    db = tmp_path / "mlflow.db"
    with caplog.at_level("INFO", logger="voxelflow.core.mlflow_schema"):
        assert experiments(f"sqlite:///{db}") == [("0", "Default", "active")]  # MLflow's own migrations
    assert "MLflow's migrations make it" in caplog.text and not list(shared.iterdir())

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("VOXELFLOW_CACHE_DIR", str(blocked / "cache"))  # cannot be made
    assert not mlflow_schema.seed(f"sqlite:///{tmp_path / 'other.db'}")
    assert experiments(f"sqlite:///{tmp_path / 'other.db'}") == [("0", "Default", "active")]


def test_two_seeders_at_once_leave_one_whole_database(cache, tmp_path):
    mlflow_schema.template(mlflow_schema.cache_folder())  # made once, so that both threads race on the copy
    target = tmp_path / "mlflow.db"
    start, results = threading.Barrier(2), []

    def seeding() -> None:
        start.wait()
        mlflow_schema._checked.discard(f"sqlite:///{target}")
        results.append(mlflow_schema.seed(f"sqlite:///{target}"))

    threads = [threading.Thread(target=seeding) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, True]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == ["mlflow.db"]  # no part left
    assert experiments(f"sqlite:///{target}") == [("0", "Default", "active")]


def test_a_database_deleted_under_the_process_is_opened_again(cache, tmp_path):
    """A home removed under a live process (a notebook starting over): MLflow's engine and stores for the URI would
    still point at the deleted file and refuse every write; client() lets MLflow open the new file, seeded, and
    leaves a file that is still there on the engine it has."""
    import shutil

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    home = tmp_path / "home"
    uri = f"sqlite:///{home / 'mlflow.db'}"
    c = client(uri)
    first = c.create_run(c.create_experiment("e", artifact_location=str(tmp_path / "a1"))).info.run_id
    engine = SqlAlchemyStore._engine_map[uri]
    client(uri).get_run(first)
    assert SqlAlchemyStore._engine_map[uri] is engine  # nothing changed: nothing reopened

    shutil.rmtree(home)
    c = client(uri)
    assert (home / "mlflow.db").exists() and SqlAlchemyStore._engine_map.get(uri) is not engine
    run = c.create_run(c.create_experiment("e", artifact_location=str(tmp_path / "a2"))).info.run_id
    c.create_registered_model("m")
    c.create_model_version("m", f"runs:/{run}/model", run)
    with sqlite3.connect(home / "mlflow.db") as db:  # written to the file on disk, and only the new run
        assert db.execute("SELECT run_uuid FROM runs").fetchall() == [(run,)]
        assert db.execute("SELECT name, version FROM model_versions").fetchall() == [("m", 1)]
