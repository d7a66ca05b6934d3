"""`voxelflow worker`: the warm-start server it starts is the one its flow runs ask for (the same key as the
environment Prefect's process worker gives a run), and it then is `prefect worker start`."""

from __future__ import annotations

import os
import uuid

from flows.deploy_steps import ENGINE_PRELOAD
from flows.worker import run_environment
from voxelflow.core import warm


def test_the_server_it_warms_is_the_one_its_runs_ask_for(monkeypatch):
    from prefect.client.schemas.objects import FlowRun
    from prefect.workers.process import ProcessJobConfiguration

    monkeypatch.setenv("PREFECT_WORKER_QUERY_SECONDS", "0.5")  # a setting in the environment, as README's worker
    preload = warm.preload_names(dict(os.environ), ENGINE_PRELOAD)
    config = ProcessJobConfiguration(command="python -m voxelflow.core.warm prefect.engine")
    for worker in ("first", "second"):  # each run's identity differs; the key does not
        config.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="run"), worker_name=worker,
                                    worker_id=uuid.uuid4())
        given = {k: v for k, v in config.env.items() if v is not None}
        assert given["PREFECT__FLOW_RUN_ID"] and given["PREFECT__WORKER_NAME"] == worker
        assert warm.key_of(given, preload) == warm.key_of(run_environment(dict(os.environ)), preload)
        config.env = {}
    # a setting the runs would have otherwise is another server: the worker's environment is part of the key
    assert warm.key_of({**run_environment(dict(os.environ)), "PREFECT_LOGGING_LEVEL": "DEBUG"}, preload) != \
        warm.key_of(run_environment(dict(os.environ)), preload)


def test_it_warms_then_becomes_prefect_worker_start(tmp_path, monkeypatch):
    """The command's own steps, up to the exec: the server is started for the runs' key, then the process becomes
    `prefect worker start --type process --pool P` with the other options passed on."""
    from typer.testing import CliRunner

    import flows.worker
    from flows.cli import app

    monkeypatch.setenv("VOXELFLOW_WARM_DIR", str(tmp_path / "warm"))
    monkeypatch.delenv("VOXELFLOW_WARM_START", raising=False)
    monkeypatch.setattr(warm, "cuda_may_be_visible", lambda env: False)  # a GPU machine's runs start cold
    started, became = [], []
    monkeypatch.setattr(warm, "start_server", lambda where, key, env, idle=None, owner=None, extra=(): started.append(
        (key, owner, extra)))
    monkeypatch.setattr(flows.worker.os, "execv", lambda path, argv: became.append(argv))
    result = CliRunner().invoke(app, ["worker", "--pool", "cpu", "--limit", "2"])
    assert result.exit_code == 0, result.output
    preload = warm.preload_names(dict(os.environ), ENGINE_PRELOAD)
    [(key, owner, extra)] = started
    assert key == warm.key_of(run_environment(dict(os.environ)), preload) and owner == os.getpid()
    assert extra == ENGINE_PRELOAD
    [argv] = became
    assert argv[argv.index("worker") + 1:] == ["start", "--type", "process", "--pool", "cpu", "--limit", "2"]


def test_another_worker_type_is_refused():
    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(app, ["worker", "--pool", "k8s-cpu", "--type", "kubernetes"])
    assert result.exit_code == 2 and "process worker" in result.output
