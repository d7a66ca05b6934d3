"""Promotion and deployment as one Prefect transaction: a deployment that fails after `champion`
moved puts `champion` and `previous` back, and the audit log says so (real Prefect server, MLflow on
SQLite). The deployment fails for real: `deploy.target: kubernetes` with no cluster configured."""

from __future__ import annotations

import time
import uuid

import pytest

from tests.flows.conftest import release_flow, settings_for


def bare_versions(home, model: str, n: int):
    from voxelflow.release import registry

    uri = settings_for(home).tracking_uri
    mc = registry.client(uri)
    mc.create_registered_model(model)
    for _ in range(n):
        mc.create_model_version(model, str(home))
    return uri, mc


def events_of(home, model: str) -> list[dict]:
    from voxelflow.core import audit
    from voxelflow.core.db import connect

    return [e for e in audit.entries(connect(settings_for(home).database))
            if isinstance(e["details"], dict) and e["details"].get("model") == model]


@pytest.fixture
def no_cluster(monkeypatch, tmp_path):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))


def test_a_failed_deployment_puts_the_aliases_back(prefect_here, release_home, no_cluster):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from voxelflow.core import audit
    from voxelflow.core.db import connect
    from voxelflow.release import registry

    model = f"txn-{uuid.uuid4().hex[:6]}"
    uri, mc = bare_versions(release_home, model, 2)
    registry.promote(uri, model, "1")
    registry.promote(uri, model, "2")  # champion 2, previous 1; the candidate will be version 3
    state = release_flow.with_options(flow_run_name=f"txn-{model}")(
        str(release_home), model, 0.9, ("2", 0.5), [], {}, {"target": "kubernetes"}, return_state=True)
    assert state.is_failed()
    with pytest.raises(RuntimeError, match="no Kubernetes cluster is configured"):
        state.result()
    deadline, seen = time.monotonic() + 30, {}
    with get_client(sync_client=True) as client:  # task run states reach the server as events: wait for them
        while seen != {"deploy": "Failed", "champion-moved": "RolledBack"} and time.monotonic() < deadline:
            time.sleep(0.2)
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
            seen = {r.name.rsplit("-", 1)[0]: r.state.name for r in runs
                    if r.state and r.name.startswith(("deploy", "champion-moved"))}
    assert seen == {"deploy": "Failed", "champion-moved": "RolledBack"}
    assert [r.run_count for r in runs if r.name.startswith("deploy")] == [1]  # no retries of a hopeless deploy

    assert (registry.alias_version(uri, model), registry.alias_version(uri, model, registry.PREVIOUS)) == ("2", "1")
    tags = mc.get_model_version(model, "3").tags
    assert tags["voxelflow.decision"] == "reverted"
    assert "no Kubernetes cluster is configured" in tags["voxelflow.reverted"]
    events = events_of(release_home, model)
    assert [e["event"] for e in events] == ["model.promoted", "model.promotion_reverted"]
    reverted = events[-1]["details"]
    assert (reverted["version"], reverted["champion"], reverted["previous"]) == ("3", "2", "1")
    assert reverted["reason"].startswith("deployment failed: RuntimeError: no Kubernetes cluster is configured")
    verdict = audit.verify(connect(settings_for(release_home).database), audit.mlflow_anchors(uri))
    assert verdict.ok and verdict.anchor.seq == events[-1]["seq"]


def test_a_revert_moves_nothing_once_champion_moved_again_and_removes_an_alias_that_was_not_there(release_home):
    from voxelflow.core import audit
    from voxelflow.core.db import connect
    from voxelflow.release import registry

    db = connect(settings_for(release_home).database)
    model = f"revert-{uuid.uuid4().hex[:6]}"
    uri, mc = bare_versions(release_home, model, 3)
    registry.promote(uri, model, "1")  # the first champion: nothing before it
    assert registry.revert_promotion(uri, db, model, "1", "voxelflow", "deployment failed: test", audit.Sink(db, uri))
    assert registry.alias_version(uri, model) is None and registry.alias_version(uri, model, registry.PREVIOUS) is None
    registry.promote(uri, model, "1")
    registry.promote(uri, model, "2")
    registry.promote(uri, model, "3")  # another release moved champion on before 2's revert ran
    assert not registry.revert_promotion(uri, db, model, "2", "voxelflow", "deployment failed: test", audit.Sink(db, uri))
    assert (registry.alias_version(uri, model), registry.alias_version(uri, model, registry.PREVIOUS)) == ("3", "2")
    last = events_of(release_home, model)[-1]
    assert last["event"] == "model.promotion_not_reverted" and last["details"]["champion"] == "3"
    assert "voxelflow.reverted" not in mc.get_model_version(model, "2").tags
