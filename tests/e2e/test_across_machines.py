"""One lifecycle spread over processes that share only an object store, a database and the Prefect API.

The README's "Across machines" commands, run for real on loopback: moto's S3 server is the store,
PostgreSQL (when ``VOXELFLOW_TEST_DATABASE_URL`` is set; SQLite in a shared folder otherwise) the
database and MLflow's backend, a `dask scheduler` with two `dask worker` processes preprocesses, and two
process work pools run the stages: the lifecycle on ``cpu``, training as its own flow run on ``gpu``.
"""

from __future__ import annotations

import contextlib
import os

import pytest

from tests.conftest import REPO, run_cli
from tests.services import dask_cluster, fresh_postgres, moto_s3, prefect_worker, scoped_environ

pytestmark = pytest.mark.slow

PIPELINE_FILES = ("datasets", "checkpoints", "models", "reports", "runs", "voxelflow.db", "mlflow.db", "mlartifacts")


@contextlib.contextmanager
def shared_database(tmp_path):
    admin = os.environ.get("VOXELFLOW_TEST_DATABASE_URL")
    if admin:
        with fresh_postgres(admin) as url:
            yield url, url  # voxelflow's tables and MLflow's live side by side in one PostgreSQL database
    else:
        shared = tmp_path / "shared-database"
        shared.mkdir()
        yield f"sqlite:///{shared / 'voxelflow.db'}", f"sqlite:///{shared / 'mlflow.db'}"


def test_lifecycle_across_pools_with_s3_and_a_shared_database(prefect_env, tmp_path):
    import fsspec

    from voxelflow.data.synthetic import make_decathlon

    homes = {name: tmp_path / f"home-{name}" for name in ("cli", "cpu", "gpu")}
    with moto_s3(tmp_path) as s3, shared_database(tmp_path) as (db_url, mlflow_url):
        addresses = {**s3, "VOXELFLOW_STORE": "s3://voxelflow/lifecycle", "VOXELFLOW_DATABASE_URL": db_url,
                     "VOXELFLOW_MLFLOW_TRACKING_URI": mlflow_url}
        base = {**prefect_env, **addresses, "PREFECT_WORKER_QUERY_SECONDS": "1",
                "PREFECT_WORKER_PREFETCH_SECONDS": "5", "PREFECT_RUNNER_POLL_FREQUENCY": "1"}

        # the data arrives in the object store
        local = make_decathlon(tmp_path / "arrived", n_cases=8)
        with scoped_environ(s3):
            fsspec.filesystem("s3").put(str(local), "voxelflow/incoming", recursive=True)

        with dask_cluster(tmp_path, {**base, "VOXELFLOW_HOME": str(tmp_path / "home-dask")}) as scheduler:
            cli = {**base, "VOXELFLOW_HOME": str(homes["cli"])}
            for pool in ("cpu", "gpu"):
                made = run_cli(["prefect", "work-pool", "create", pool, "--type", "process"], cli)
                assert made.returncode == 0 or "already exists" in made.stdout, made.stdout + made.stderr
            # the deployments this lifecycle calls (the README deploys every */cpu and */gpu one: each costs
            # seconds of flow loading, and tests/infra/test_work_pools.py checks them all offline)
            deployed = run_cli(["prefect", "--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml",
                                "--name", "lifecycle/cpu", "--name", "train_flow/gpu", "--name", "step_flow/gpu"], cli)
            assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]

            cpu_env = {**base, "VOXELFLOW_HOME": str(homes["cpu"]), "VOXELFLOW_DASK_SCHEDULER": scheduler}
            gpu_env = {**base, "VOXELFLOW_HOME": str(homes["gpu"])}
            with prefect_worker("cpu", cpu_env, tmp_path / "worker-cpu.log", REPO, warm=True), \
                    prefect_worker("gpu", gpu_env, tmp_path / "worker-gpu.log", REPO):
                run = run_cli(["prefect", "deployment", "run", "lifecycle/cpu",
                               "--param", 'overlays=["deployments/params/gpu-pool.yaml", "deployments/params/quick.yaml", '
                               '"tests/e2e/specs/step-on-gpu.yaml"]',
                               "--param", 'sets=["data.source=s3://voxelflow/incoming"]',
                               "--watch", "--watch-interval", "1", "--watch-timeout", "420"], cli, timeout=480)
            logs = {p: (tmp_path / f"worker-{p}.log").read_text() for p in ("cpu", "gpu")}
            assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:] + logs["cpu"][-4000:] + logs["gpu"][-4000:]

        # training ran on the gpu pool's worker, as a flow run of its own; the rest on the cpu pool's
        assert "train" in logs["gpu"] and "Completed" in logs["gpu"], logs["gpu"][-3000:]
        # the spec's own step placed on the gpu pool ran there, as a flow run of its own (step/gpu)
        assert "label_check" in logs["gpu"], logs["gpu"][-3000:]
        assert "HTTP prediction dice" in logs["cpu"], logs["cpu"][-3000:]

        # everything a later stage needs is in the store and the database
        with scoped_environ(addresses):
            from voxelflow.core import audit
            from voxelflow.core.db import Database
            from voxelflow.core.storage import Store
            from voxelflow.data.ingest import read_ledger
            from voxelflow.release import registry
            from voxelflow.spec.config import Settings

            store = Store("s3://voxelflow/lifecycle")
            files = store.files()
            assert any(f.startswith("datasets/demo-spheres/raw/") for f in files)
            assert any(f.startswith("datasets/demo-spheres/preprocessed/") for f in files)
            assert any(f.startswith("models/demo-spheres/") and f.endswith("weights.safetensors") for f in files)
            assert any(f.startswith("reports/demo-spheres/") and f.endswith(".png") for f in files)
            assert any(f.startswith("mlflow-artifacts/") for f in files), "MLflow's model files live in the store"
            assert not any(f.startswith("checkpoints/") for f in files), "a finished run's checkpoints are removed"

            db = Database(db_url)
            ledger = read_ledger(db, "demo-spheres")
            assert len(ledger) == 16 and {r["state"] for r in ledger} == {"ingested"}
            assert audit.verify(db).ok
            settings = Settings(home=tmp_path / "nowhere", mlflow_tracking_uri=mlflow_url)
            assert registry.alias_version(settings.tracking_uri, "demo-spheres") == "1"
            db.dispose()

    # no pipeline data on any machine's local disk
    for name, home in homes.items():
        left = sorted(p.name for p in home.iterdir()) if home.exists() else []
        assert not set(left) & set(PIPELINE_FILES), f"{name} home holds {left}"
