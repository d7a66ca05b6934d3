"""Announcements that cannot be lost, against the session's real Prefect server: the ``ingest-arrived``
flow sends voxelflow.dataset.updated before it records it, fails when the event was not delivered, and
a rerun sends the same event id again, so ``lifecycle/demo-spheres`` (its trigger as deployments/prefect.yaml
ships it) gets exactly one run, not zero and not two. A triggered run takes its spec from its deployment;
an event that names one is refused, and audited.

The lifecycle runs are created by the server's automation and never executed here (no work pool).
Once the announcement's run exists, a sentinel event is sent and its run awaited: the repeated event, sent
before it, had its chance to start a second run.
"""

from __future__ import annotations

import time
import uuid

import pytest
import yaml

from tests.conftest import REPO
from tests.triggers import trigger_deployment

DATA_KEYS = ["cases", "dataset_digest", "new_cases", "source"]


@pytest.fixture
def pipeline(prefect_here, tmp_path, monkeypatch) -> tuple[str, str, str]:
    """(pipeline name, spec path, source) of two labelled cases, in a home of this test's own."""
    from voxelflow.data.synthetic import make_decathlon

    monkeypatch.setenv("VOXELFLOW_HOME", str(tmp_path / "home"))
    source = make_decathlon(tmp_path / "incoming", n_cases=2, size=16)
    spec = yaml.safe_load((REPO / "deployments/specs/demo.yaml").read_text())
    spec["name"] = f"announce-{uuid.uuid4().hex[:8]}"
    spec["data"].update(source=str(source), retrain_after=1)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return spec["name"], str(path), str(source)


def runs_of(deployment_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))


def announced_ids(deployment_id) -> list[str]:
    return sorted(r.parameters["announcement"]["id"] for r in runs_of(deployment_id))


def sentinel(pipeline: str, deployment_id) -> str:
    """Send one more voxelflow.dataset.updated and wait for its run: every event sent before it was handled."""
    from flows.announce import send
    from voxelflow.data.watch import DATASET_UPDATED

    event_id = uuid.uuid4()
    send(DATASET_UPDATED, pipeline, {"source": "sentinel", "new_cases": 0, "cases": 0, "dataset_digest": ""}, event_id)
    deadline = time.monotonic() + 60
    while str(event_id) not in announced_ids(deployment_id):
        assert time.monotonic() < deadline, "the sentinel event created no lifecycle run"
        time.sleep(0.2)
    return str(event_id)


def db():
    from voxelflow.core.db import connect
    from voxelflow.spec.config import Settings

    return connect(Settings().database)


def check_the_one_lifecycle(pipeline: str, spec: str, source: str, deployment_id, before: str) -> None:
    from voxelflow.data.watch import DATASET_UPDATED

    deadline = time.monotonic() + 60  # the run of the dataset's event: not zero
    while len(announced_ids(deployment_id)) < 2:
        assert time.monotonic() < deadline, "the announcement created no lifecycle run"
        time.sleep(0.2)
    after = sentinel(pipeline, deployment_id)  # sent after the repeat, its run seen: the repeat made none
    ids = announced_ids(deployment_id)
    assert len(ids) == 3 and {before, after} < set(ids), ids  # one run for the dataset's event, not zero, not two
    (announced,) = set(ids) - {before, after}
    assert uuid.UUID(announced).version == 5  # derived from what it announces
    (run,) = [r for r in runs_of(deployment_id) if r.parameters["announcement"]["id"] == announced]
    assert run.parameters["spec"] == spec  # the deployment's, not the event's
    assert run.parameters["sets"] == [f"data.source={source}"]
    got = run.parameters["announcement"]
    assert {**got, "keys": sorted(got["keys"])} == {"id": announced, "event": DATASET_UPDATED,
                                                    "resource": f"voxelflow.dataset.{pipeline}", "keys": DATA_KEYS}


def test_an_undelivered_announcement_fails_the_run_and_the_rerun_starts_one_lifecycle(pipeline, monkeypatch):
    from prefect.events.clients import PrefectEventsClient

    from flows.ingest import ingest
    from flows.lifecycle import lifecycle

    name, spec, source = pipeline
    with trigger_deployment(lifecycle, "demo-spheres", name, spec) as deployment_id:
        before = sentinel(name, deployment_id)  # the automation is live

        def refused(*args, **kwargs):
            raise ConnectionRefusedError("the Prefect API is away")

        async def refused_async(*args, **kwargs):
            refused()

        with monkeypatch.context() as away:  # whichever way events go: posted, or over the events websocket
            away.setattr("flows.announce.post", refused, raising=False)
            away.setattr(PrefectEventsClient, "_emit", refused_async)
            state = ingest(spec, return_state=True)
        assert state.is_failed(), f"{state}: the announcement was lost and the run {state.name}"
        assert announced_ids(deployment_id) == [before]
        assert ingest(spec)["announced"] == 2  # nothing was recorded: the rerun announces the two cases
        assert ingest(spec)["announced"] == 0  # and now they are recorded
        check_the_one_lifecycle(name, spec, source, deployment_id, before)


def test_a_run_that_dies_between_announcing_and_recording_is_rerun_into_one_lifecycle(pipeline, monkeypatch):
    from flows.ingest import ingest
    from flows.lifecycle import lifecycle
    from voxelflow.data import watch

    name, spec, source = pipeline
    record = watch.set_cursor

    def dies_once(db, cursor, value, conn=None):
        if cursor.startswith("dataset-announced:"):
            monkeypatch.setattr(watch, "set_cursor", record)
            raise RuntimeError("killed between sending and recording")
        return record(db, cursor, value, conn)

    with trigger_deployment(lifecycle, "demo-spheres", name, spec) as deployment_id:
        before = sentinel(name, deployment_id)
        monkeypatch.setattr(watch, "set_cursor", dies_once)
        state = ingest(spec, return_state=True)
        assert state.is_failed() and "killed between" in state.message, state
        assert ingest(spec)["announced"] == 2  # the same announcement, the same event id: Prefect runs it once
        check_the_one_lifecycle(name, spec, source, deployment_id, before)


def test_an_arrival_naming_a_spec_is_refused_and_audited(pipeline, tmp_path):
    """Through the shipped ingest-arrived trigger: the run gets the deployment's spec whatever the event says,
    and the event's payload keys, and refuses to act on an event that names a spec."""
    from prefect.flow_engine import run_flow

    from flows.announce import send
    from flows.ingest import ingest
    from voxelflow.core import audit
    from voxelflow.data.ingest import read_ledger
    from voxelflow.data.watch import DATA_ARRIVED, ROUTE_LABEL, ROUTE_SOURCE

    name, spec, source = pipeline
    evil = tmp_path / "evil.yaml"
    evil.write_text((REPO / "deployments/specs/demo.yaml").read_text())
    with trigger_deployment(ingest, "demo-spheres", name, spec) as deployment_id:
        event_id = uuid.uuid4()
        send(DATA_ARRIVED, name, {"source": source, "objects": [], "count": 0, "spec": str(evil)}, event_id,
             {ROUTE_LABEL: ROUTE_SOURCE})
        deadline, runs = time.monotonic() + 60, []
        while not runs:
            assert time.monotonic() < deadline, "the event created no ingest run"
            time.sleep(0.2)
            runs = runs_of(deployment_id)
        (run,) = runs
        assert run.parameters["spec"] == spec and run.parameters["source"] == source
        got = run.parameters["announcement"]
        assert {**got, "keys": sorted(got["keys"])} == {"id": str(event_id), "event": DATA_ARRIVED,
                                                        "resource": f"voxelflow.dataset.{name}",
                                                        "keys": ["count", "objects", "source", "spec"]}
        state = run_flow(ingest, flow_run=run, parameters=run.parameters, return_type="state")  # as a worker would
    assert state.is_failed() and "names spec" in state.message, state
    assert read_ledger(db(), name) == []  # refused before anything was read
    (entry,) = [e for e in audit.entries(db()) if e["event"] == "announcement.refused"
                and e["details"]["pipeline"] == name]
    assert entry["details"]["event_id"] == str(event_id) and "spec" in entry["details"]["reason"]
