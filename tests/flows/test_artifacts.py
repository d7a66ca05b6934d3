"""Artifacts are sent in the background while the next step runs (``tasks.artifacts``), against the session's real
Prefect server: when a flow returns, each artifact it made exists, belongs to the task run that made it and
progress ends at 100 %; an artifact the API refuses fails the flow with its name; a lost progress update does not."""

from __future__ import annotations

import logging
import threading
import uuid

import pytest


def _read(key: str | None = None, flow_run_id=None):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        if key is not None:
            return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
        return client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[flow_run_id])))


def test_a_flows_artifacts_exist_when_it_returns_each_in_its_own_task_run(prefect_here):
    from prefect import flow, task

    from tasks import artifacts
    from tasks.progress import reporter

    key = f"rows-{uuid.uuid4().hex[:8]}"
    callers: list[str] = []

    @task
    def make_rows(n: int) -> int:
        report = reporter("rows", "making rows")
        for i in range(n):
            report(i + 1, n)
        artifacts.table([{"i": i, "square": i * i} for i in range(n)], key=key, description="squares")
        callers.append(threading.current_thread().name)
        return n

    @flow
    def two_tasks() -> int:
        with artifacts.flushing():
            return make_rows(5) + make_rows(3)

    state = two_tasks(return_state=True)
    assert state.is_completed() and state.result() == 8
    assert all(not name.startswith("voxelflow-artifacts") for name in callers)  # made on the task's thread
    made = _read(flow_run_id=state.state_details.flow_run_id)
    tables = [a for a in made if a.type == "table"]
    progress = [a for a in made if a.type == "progress"]
    assert len(tables) == 2 and len(progress) == 2  # the same key twice: two versions of one artifact
    assert len({a.task_run_id for a in tables}) == 2 and None not in {a.task_run_id for a in tables}
    assert sorted(a.data for a in progress) == [100.0, 100.0]
    assert {a.task_run_id for a in progress} == {a.task_run_id for a in tables}
    [latest] = _read(key=key)[:1]
    assert "square" in str(latest.data)


def test_an_artifact_the_api_refuses_fails_the_flow_with_its_name(prefect_here):
    from prefect import flow

    from tasks import artifacts

    key = f"broken-{uuid.uuid4().hex[:8]}"

    @flow
    def refused() -> str:
        with artifacts.flushing():
            artifacts.table([{"value": object()}], key=key)  # cannot be encoded: fails in the sender
            return "returned"

    state = refused(return_state=True)
    assert state.is_failed()
    with pytest.raises(artifacts.ArtifactNotSent, match=f"table artifact '{key}'"):
        state.result()


def test_a_lost_progress_update_is_logged_and_the_flow_completes(prefect_here, caplog):
    from prefect import flow

    from tasks import artifacts

    def unreachable() -> None:
        raise ConnectionError("the API went away")

    @flow
    def goes_on() -> str:
        with artifacts.flushing():
            artifacts.send("progress artifact of test", unreachable, strict=False)
            return "done"

    with caplog.at_level(logging.WARNING, logger="tasks.artifacts"):
        state = goes_on(return_state=True)
    assert state.is_completed() and state.result() == "done"
    assert "progress artifact of test not sent: the API went away" in caplog.text


def test_flush_outside_a_flow_raises_what_failed():
    from tasks import artifacts

    def refused() -> None:
        raise ValueError("bad table")

    artifacts.send("table artifact 'x'", refused)
    with pytest.raises(artifacts.ArtifactNotSent, match="table artifact 'x': ValueError: bad table"):
        artifacts.flush()
    artifacts.flush()  # nothing left: a second flush has nothing to report
