"""The release part of the lifecycle (register → approval → deploy, one transaction) run as a flow
against the session's real Prefect server, with a real MLflow on SQLite and the real database.

Training is not what these tests are about: a tiny untrained network is logged as the candidate
and its held-out scores are given, so that the gates decide as the test needs.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect import flow

from flows.release import release
from flows.stages import current_lifecycle_id
from tests.conftest import REPO

PIPELINE = "release-test"
TINY_NETWORK = {"UNet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2],
                         "num_res_units": 0}}


def settings_for(home: str | Path):
    from voxelflow.spec.config import Settings

    return Settings(home=Path(home), store=None, database_url=None, mlflow_tracking_uri=None)


def make_spec(model: str, promote: dict[str, Any] | None = None, deploy: dict[str, Any] | None = None):
    """The demo spec with a tiny UNet on 16^3 and the given ``promote`` and ``deploy`` sections merged in."""
    from voxelflow.spec.config import validate_spec

    data = yaml.safe_load((REPO / "deployments/specs/demo.yaml").read_text())
    data["name"] = PIPELINE
    for item in data["preprocess"]["transforms"]:
        for kwargs in item.values():
            if "spatial_size" in kwargs:
                kwargs["spatial_size"] = [16, 16, 16]
    data["train"].update(network=copy.deepcopy(TINY_NETWORK), precision="fp32")
    data["evaluate"]["metrics"] = ["dice"]
    data["promote"] = {**data["promote"], "model_name": model, **(promote or {})}
    data["deploy"] = {**data["deploy"], **(deploy or {})}
    return validate_spec(data, "release-test")


def candidate(ctx, spec, dice: float, champion: tuple[str, float] | None, val_ids: list[str]):
    """An MLflow run holding a tiny untrained UNet, and its evaluation: ``dice`` on the held-out
    cases, compared with ``champion`` (version, its dice) or with none."""
    import torch

    from voxelflow.learn.train import build_network, state_dict_bytes
    from voxelflow.pipeline import Evaluation, TrainOutcome, model_config, start_run

    torch.manual_seed(0)
    run_id = start_run(spec, ctx, "d" * 16)
    key = f"models/{run_id}/weights.safetensors"
    ctx.store.write_bytes(key, state_dict_bytes(build_network(copy.deepcopy(TINY_NETWORK))))
    outcome = TrainOutcome(key, model_config(spec), [], 0, 0.0, None, "")
    cases = [f"case-{i}" for i in range(6)]  # per test case, as the relative gate pairs them
    evaluation = Evaluation({"dice": dice}, None if champion is None else {"dice": champion[1]},
                            None if champion is None else champion[0], "", val_ids, ["dice"], 2,
                            candidate_cases={"dice": dict.fromkeys(cases, dice)},
                            champion_cases=None if champion is None else {"dice": dict.fromkeys(cases, champion[1])})
    return run_id, outcome, evaluation


@flow(name="release-under-test")
def release_flow(home: str, model: str, dice: float, champion: tuple[str, float] | None, val_ids: list[str],
                 promote: dict[str, Any], deploy: dict[str, Any]) -> dict:
    """What the lifecycle does after evaluation (:func:`flows.release.release`), on a prepared candidate."""
    from voxelflow.pipeline import Context, lineage

    spec = make_spec(model, promote, deploy)
    ctx = Context(settings_for(home), spec.name)
    run_id, outcome, evaluation = candidate(ctx, spec, dice, champion, val_ids)
    promotion, deployment = release(spec, ctx, current_lifecycle_id(), run_id, outcome, evaluation,
                                    lineage(spec, "d" * 16), val_ids[0] if val_ids else "")
    return {"promotion": asdict(promotion), "deployment": asdict(deployment) if deployment else None}


@pytest.fixture(scope="session")
def prefect_here(prefect_api):
    """Prefect in this process talks to the session's server; flows skip the heartbeat wait."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_api, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield prefect_api
        # send what the flows logged while the server is still there: at exit it would be retried for minutes
        APILogWorker.drain_all(timeout=10)
        EventsWorker.drain_all(timeout=10)


@pytest.fixture(scope="session")
def release_home(tmp_path_factory) -> Path:
    """One home for the session's release flows (each test uses its own model name): MLflow's schema
    and the database are made once."""
    from voxelflow.pipeline import Context, ensure_tracking

    home = tmp_path_factory.mktemp("release") / "home"
    ensure_tracking(Context(settings_for(home), PIPELINE))
    return home


@pytest.fixture(scope="session")
def release_case(release_home) -> list[str]:
    """One synthetic case ingested into the home, for the deploy stage's smoke test: its id."""
    from voxelflow.data.synthetic import make_decathlon
    from voxelflow.pipeline import Context, ingest_stage
    from voxelflow.spec.config import DataSpec

    source = make_decathlon(release_home.parent / "incoming", n_cases=1, size=24)
    ctx = Context(settings_for(release_home), PIPELINE)
    return ingest_stage(DataSpec(source=str(source), layout="decathlon"), ctx).case_ids


@contextlib.contextmanager
def running(fn, *args, **kwargs):
    """Run ``fn`` in a thread (with this context: Prefect's settings) while the test acts as the person."""
    out: dict[str, Any] = {}

    def target():
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    thread = threading.Thread(target=contextvars.copy_context().run, args=(target,), daemon=True)
    thread.start()
    try:
        yield out
    finally:
        thread.join(timeout=120)
        assert not thread.is_alive(), "the flow did not finish"


def wait_for_state(name: str, state: str, timeout: float = 60):
    """The flow run called ``name`` once it is in state type ``state`` (polling the server)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
            if runs and runs[0].state and runs[0].state.type.value == state:
                return runs[0]
            assert time.monotonic() < deadline, f"flow run {name} not {state}: {runs[0].state if runs else 'absent'}"
            time.sleep(0.2)
