"""The spec's own steps in the lifecycle flow, against the session's real Prefect server: each step a task
run named by its id, with a table artifact of its metrics; a gate that fails ends the flow run Failed before
training, with its reason in the run's summary artifact."""

from __future__ import annotations

import uuid

import pytest
import yaml

from tests.conftest import REPO


@pytest.fixture(autouse=True)
def tests_allowed(monkeypatch):
    monkeypatch.setenv("VOXELFLOW_ALLOWED_IMPORTS", "monai,torch,voxelflow,tests")


def test_steps_are_tasks_named_by_their_id_and_a_failed_gate_fails_the_flow(prefect_here, tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

    from flows.lifecycle import lifecycle
    from voxelflow.data.synthetic import make_decathlon

    monkeypatch.setenv("VOXELFLOW_HOME", str(tmp_path / "home"))
    source = make_decathlon(tmp_path / "incoming", n_cases=12, size=16)
    spec = yaml.safe_load((REPO / "deployments/specs/demo.yaml").read_text())
    spec["name"] = f"steps-{uuid.uuid4().hex[:8]}"
    spec["data"]["source"] = str(source)
    spec["steps"] = [
        {"id": "count", "uses": "tests.unit.step_fns:count_cases", "after": "ingest"},
        {"id": "qc", "uses": "voxelflow.steps:label_volume_check", "after": "preprocess", "gate": True,
         "with": {"min_ml": 1.0e6}},
    ]
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))

    state = lifecycle(str(path), return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="gate qc did not pass"):
        state.result()
    with get_client(sync_client=True) as client:
        flow_run_id = state.state_details.flow_run_id
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        names = {t.name: t for t in tasks}
        assert {"count", "qc"} <= set(names), sorted(names)
        assert not any(n.startswith("train") for n in names)  # the gate stopped the lifecycle before training
        key = "lifecycle-" + "".join(c if c.isalnum() else "-" for c in spec["name"].lower())
        [summary] = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
        assert "Stopped by gate `qc`" in summary.data and "| qc (gate) | failed |" in summary.data
        step_key = f"step-{spec['name']}-count".lower().replace("_", "-")
        [table] = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[step_key])))
        assert '"n"' in table.data or "'n'" in table.data or "n" in str(table.data)
