"""Data arrival for real: files copied into a watched folder end in a completed ingest flow run that stored them.

`voxelflow watch` emits voxelflow.data.arrived to a real Prefect server; the ``ingest-arrived/on-arrival``
deployment's trigger (deployments/prefect.yaml) creates a run that a process worker executes. Nobody
starts the ingest by hand.
"""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from tests.conftest import BIN, REPO, run_cli
from tests.services import prefect_worker

pytestmark = pytest.mark.slow

FAST_WORKER = {"PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "5"}


def ingest_runs(api_url: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["on-arrival"])))


def test_files_dropped_into_a_watched_folder_are_ingested_by_a_triggered_run(prefect_api, prefect_env, tmp_path):
    from voxelflow.synthetic import make_decathlon

    env = {**prefect_env, **FAST_WORKER}
    pool = run_cli(["prefect", "work-pool", "create", "voxelflow-process", "--type", "process"], env)
    assert pool.returncode == 0 or "already exists" in pool.stdout, pool.stdout + pool.stderr
    deploy = run_cli(["prefect", "--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml",
                      "--name", "*/on-arrival"], env)
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]

    incoming = tmp_path / "incoming"
    incoming.mkdir()
    staged = make_decathlon(tmp_path / "staged", n_cases=3, size=24)
    with prefect_worker("voxelflow-process", env, tmp_path / "worker.log", REPO), \
            open(tmp_path / "watch.log", "w") as watch_log:
        watcher = subprocess.Popen([str(BIN / "voxelflow"), "watch", str(incoming), "--spec",
                                    "deployments/specs/demo.yaml", "--settle", "1", "--poll", "0.5"],
                                   env=env, cwd=REPO, stdout=watch_log, stderr=subprocess.STDOUT)
        try:
            time.sleep(2)  # the watcher is up before anything lands
            shutil.copytree(staged, incoming, dirs_exist_ok=True)
            deadline, runs = time.monotonic() + 150, []
            while time.monotonic() < deadline:
                runs = ingest_runs(prefect_api)
                if runs and all(r.state and r.state.is_final() for r in runs):
                    break
                time.sleep(1)
        finally:
            watcher.terminate()
            watcher.wait(timeout=30)
    logs = (tmp_path / "watch.log").read_text() + (tmp_path / "worker.log").read_text()
    assert len(runs) == 1, f"{len(runs)} ingest runs\n{logs[-4000:]}"  # one settled batch, one event, one run
    assert runs[0].state.is_completed(), f"{runs[0].state}\n{logs[-4000:]}"
    assert runs[0].parameters["source"] == str(incoming)

    from voxelflow.config import Settings
    from voxelflow.db import connect
    from voxelflow.ingest import read_ledger

    ledger = read_ledger(connect(Settings(home=tmp_path / "home").database), "demo-spheres")
    assert len(ledger) == 6 and {r["state"] for r in ledger} == {"ingested"}, ledger
    assert "synth_000" not in (tmp_path / "worker.log").read_text()  # logs carry case ids and hashes only
