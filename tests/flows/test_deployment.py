"""The README's deployment sequence, run for real: work pool, deploy, worker, deployment run --watch."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, run_cli
from tests.services import prefect_worker

pytestmark = pytest.mark.slow


def test_deployment_run_completes(prefect_env, tmp_path):
    env = {**prefect_env, "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "5"}
    data = run_cli(["voxelflow", "demo", "--data-only", "--cases", "8"], env)
    assert data.returncode == 0, data.stderr

    pool = run_cli(["prefect", "work-pool", "create", "voxelflow-process", "--type", "process"], env)
    assert pool.returncode == 0 or "already exists" in pool.stdout, pool.stdout + pool.stderr
    deploy = run_cli(["prefect", "--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml",
                      "--name", "lifecycle/demo"], env)
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]

    inspect = run_cli(["prefect", "deployment", "inspect", "lifecycle/demo", "--output", "json"], env)
    assert inspect.returncode == 0, inspect.stderr
    info = json.loads(inspect.stdout)
    assert info["parameters"]["spec"] == "deployments/specs/demo.yaml"
    assert [s["active"] for s in info["schedules"]] == [False]

    with prefect_worker("voxelflow-process", env, tmp_path / "worker.log", REPO):  # killed if it will not stop
        run = run_cli(["prefect", "deployment", "run", "lifecycle/demo",
                       "--param", 'overlays=["deployments/params/quick.yaml"]',
                       "--watch", "--watch-timeout", "480"], env, timeout=540)
    log = (tmp_path / "worker.log").read_text()
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:] + log[-4000:]
    assert "Completed" in run.stdout + run.stderr, run.stdout[-2000:]
    assert "HTTP prediction dice" in log

    from voxelflow.release import registry
    from voxelflow.spec.config import Settings

    assert registry.alias_version(Settings(home=tmp_path / "home").tracking_uri, "demo-spheres") == "1"
