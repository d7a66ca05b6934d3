"""The README's deployment sequence, run for real: work pool, deploy, worker, deployment run --watch."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import REPO, run_cli
from tests.services import prefect_worker
from tests.unit.test_shipped_steps import Receiver

pytestmark = pytest.mark.slow


def test_deployment_run_completes(prefect_env, tmp_path):
    env = {**prefect_env, "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "5"}
    data = run_cli(["voxelflow", "demo", "--data-only", "--cases", "8"], env)
    assert data.returncode == 0, data.stderr

    pool = run_cli(["prefect", "work-pool", "create", "voxelflow-process", "--type", "process"], env)
    assert pool.returncode == 0 or "already exists" in pool.stdout, pool.stdout + pool.stderr
    deploy = run_cli(["prefect", "--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml",
                      "--name", "lifecycle/demo-spheres"], env)
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]

    # read through the API: `prefect deployment inspect` fails on a deployment with triggers
    api = env["PREFECT_API_URL"]
    info = httpx.get(f"{api}/deployments/name/lifecycle/demo-spheres").raise_for_status().json()
    try:
        run_the_deployment(env, tmp_path, api, info)
    finally:  # its trigger would start lifecycles of demo-spheres on later tests' workers
        httpx.delete(f"{api}/automations/owned-by/prefect.deployment.{info['id']}", timeout=30)
        httpx.delete(f"{api}/deployments/{info['id']}", timeout=30)


def run_the_deployment(env: dict[str, str], tmp_path, api: str, info: dict) -> None:
    """The deployment as made, then two runs of it: the demo spec, and another spec as its parameter."""
    assert info["parameters"] == {"spec": "deployments/specs/demo.yaml", "overlays": []}
    assert [s["active"] for s in info["schedules"]] == [False]
    assert info["global_concurrency_limit"]["limit"] == 1
    assert info["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    [automation] = httpx.get(f"{api}/automations/related-to/prefect.deployment.{info['id']}").json()
    assert automation["trigger"]["expect"] == ["voxelflow.dataset.updated"]

    webhook = Receiver()  # notify_webhook's destination, in the worker's environment
    env["VOXELFLOW_WEBHOOK_URL"] = f"{webhook.base}/hooks/lifecycle"
    env["VOXELFLOW_WARM_DIR"] = str(tmp_path / "warm")  # this worker's warm-start server alone
    with prefect_worker("voxelflow-process", env, tmp_path / "worker.log", REPO, warm=True):  # killed if it will not stop
        run = run_cli(["prefect", "deployment", "run", "lifecycle/demo-spheres",
                       "--param", 'overlays=["deployments/params/quick.yaml"]',
                       "--watch", "--watch-timeout", "480"], env, timeout=540)
        log = (tmp_path / "worker.log").read_text()
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:] + log[-4000:]
        assert "Completed" in run.stdout + run.stderr, run.stdout[-2000:]
        assert "HTTP prediction dice" in log

        # the spec with steps of its own, as the same `lifecycle` deployment runs it (its spec a parameter)
        custom = run_cli(["prefect", "deployment", "run", "lifecycle/demo-spheres",
                          "--param", "spec=deployments/specs/custom-steps.yaml",
                          "--param", 'overlays=["deployments/params/quick.yaml"]',
                          "--param", 'sets=["promote.gates.min_test_cases=2"]',
                          "--watch", "--watch-timeout", "480"], env, timeout=540)
        log = (tmp_path / "worker.log").read_text()
        assert custom.returncode == 0, custom.stdout[-2000:] + custom.stderr[-2000:] + log[-4000:]
        # `voxelflow worker` started the server its runs used: none of them started another (a key of their own)
        servers = [json.loads(line) for p in (tmp_path / "warm").glob("*.log") for line in p.read_text().splitlines()
                   if '"warm.serving"' in line]
        assert len(list((tmp_path / "warm").glob("*.lock"))) == 1 and len(servers) == 1, servers
        assert servers[0]["missing"] == [], servers
    webhook.close()

    from voxelflow.release import registry
    from voxelflow.spec.config import Settings

    uri = Settings(home=tmp_path / "home").tracking_uri
    assert registry.alias_version(uri, "demo-spheres") == "1"
    assert registry.alias_version(uri, "custom-steps") == "1"

    # its steps are tasks of the flow run, named by their ids (the run graph), beside the built-in stages
    [flow_run] = httpx.post(f"{api}/flow_runs/filter", json={"sort": "EXPECTED_START_TIME_DESC", "limit": 1}).json()
    assert flow_run["parameters"]["spec"] == "deployments/specs/custom-steps.yaml"
    tasks = httpx.post(f"{api}/task_runs/filter", json={"flow_runs": {"id": {"any_": [flow_run["id"]]}}}).json()
    names = {t["name"]: t["state"]["type"] for t in tasks}
    assert {"label_check", "intensities", "notify"} <= set(names), sorted(names)
    assert names["label_check"] == names["intensities"] == names["notify"] == "COMPLETED", names
    # ... their metrics in MLflow under <id>.<name>, and the webhook told of the new champion
    mc = registry.client(uri)
    version = mc.get_model_version_by_alias("custom-steps", "champion")
    metrics = mc.get_run(version.run_id).data.metrics
    assert metrics["label_check.outliers"] == 0 and "intensities.mean_c0" in metrics, sorted(metrics)
    [(path, _, body)] = webhook.requests
    assert path == "/hooks/lifecycle" and json.loads(body)["pipeline"] == "custom-steps"
