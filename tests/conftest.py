"""Shared fixtures: one real Prefect server per test process (make test runs two), started on 127.0.0.1 on first use."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.server import local_prefect_server

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def pytest_configure(config):
    """GPUs are hidden from the suite (this process, its xdist workers and every subprocess they start)
    unless it runs the ``gpu`` tests alone (``pytest -m gpu``): on a GPU node the CPU tests then give the
    results they give here, instead of training on the GPU because no device was named."""
    if config.getoption("markexpr", "").strip() != "gpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    # the warm-start servers the suite's flow runs start (voxelflow.core.warm) live in a folder of this process's,
    # ended with it
    if "VOXELFLOW_WARM_DIR" not in os.environ:
        import tempfile

        os.environ["VOXELFLOW_WARM_DIR"] = tempfile.mkdtemp(prefix="voxelflow-warm-")
        config._voxelflow_warm_dir = os.environ["VOXELFLOW_WARM_DIR"]
    # MLflow's schema template (voxelflow.core.mlflow_schema): one for the suite, made by whichever test needs it
    # first, shared by the xdist workers and their subprocesses, never the user's own cache
    if "VOXELFLOW_CACHE_DIR" not in os.environ:
        import tempfile

        os.environ["VOXELFLOW_CACHE_DIR"] = tempfile.mkdtemp(prefix="voxelflow-cache-")
        config._voxelflow_cache_dir = os.environ["VOXELFLOW_CACHE_DIR"]


def pytest_unconfigure(config):
    """End the warm-start servers this process's flow runs started (each ends when its socket goes), and remove the
    suite's cache."""
    import shutil

    for where in (getattr(config, "_voxelflow_warm_dir", None), getattr(config, "_voxelflow_cache_dir", None)):
        if where:
            shutil.rmtree(where, ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory) -> str:
    """The API URL of a `prefect server start` that lives as long as the test session."""
    # a run waiting for its deployment's slot is tried again after 2 s, not Prefect's 30 s: queued lifecycles
    # in the tests start soon after the one before them ends
    with local_prefect_server(tmp_path_factory.mktemp("prefect-home"),
                              settings={"PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "2"}) as url:
        yield url


@pytest.fixture
def prefect_env(prefect_api, tmp_path) -> dict[str, str]:
    """Environment for subprocesses (CLI, worker) that talk to the session's Prefect server."""
    return client_env(prefect_api, tmp_path)


def client_env(api_url: str, tmp: Path) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")},  # the test's name is not theirs
        "PREFECT_API_URL": api_url,
        "PREFECT_HOME": str(tmp / "prefect-client"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "VOXELFLOW_HOME": str(tmp / "home"),
        "PYTHONWARNINGS": "ignore",
    }


def run_cli(args: list[str], env: dict[str, str], timeout: float = 600, cwd: Path = REPO):
    """Run a console script of this venv and capture what it prints."""
    return subprocess.run([str(BIN / args[0]), *args[1:]], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """A real Orthanc PACS on loopback for one test module (tests/orthanc.py); skips where it is not installed."""
    from tests.orthanc import running_orthanc

    with running_orthanc(tmp_path_factory.mktemp("orthanc")) as pacs:
        yield pacs
