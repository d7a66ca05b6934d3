"""`promote.approval: manual`: the flow pauses for a typed answer, given here through Prefect's API
(what the UI's Resume form sends), against a real Prefect server and a real MLflow."""

from __future__ import annotations

import uuid
from dataclasses import replace

import pytest

from tests.flows.conftest import candidate, make_spec, release_flow, running, settings_for, wait_for_state

MANUAL = {"approval": "manual", "approval_timeout_s": 120, "approval_poll_s": 0.5}


def registered(home, model: str, versions: int):
    """``versions`` bare versions of ``model`` (no model files: they are never loaded here)."""
    from voxelflow.release import registry

    uri = settings_for(home).tracking_uri
    mc = registry.client(uri)
    mc.create_registered_model(model)
    for _ in range(versions):
        mc.create_model_version(model, str(home))
    return uri, mc


def audit_of(home, model: str) -> list[dict]:
    from voxelflow.core import audit
    from voxelflow.core.db import connect

    return [e for e in audit.entries(connect(settings_for(home).database))
            if isinstance(e["details"], dict) and e["details"].get("model") == model]


def test_a_person_approves_in_the_paused_run_and_the_champion_moves(prefect_here, release_home, release_case):
    from prefect.flow_runs import resume_flow_run

    from voxelflow.core import audit
    from voxelflow.core.db import connect
    from voxelflow.release import registry

    model = f"approve-{uuid.uuid4().hex[:6]}"
    uri, mc = registered(release_home, model, 1)  # version 1 is champion; the candidate will be version 2
    registry.promote(uri, model, "1")
    name = f"approve-{uuid.uuid4().hex[:8]}"
    flow_fn = release_flow.with_options(flow_run_name=name)
    with running(flow_fn, str(release_home), model, 0.9, ("1", 0.5), release_case, MANUAL, {}) as out:
        paused = wait_for_state(name, "PAUSED")
        # while the question is open the candidate is registered, waiting, and nothing moved
        assert mc.get_model_version(model, "2").tags["voxelflow.decision"] == "awaiting_approval"
        assert registry.alias_version(uri, model) == "1"
        assert registry.alias_version(uri, model, registry.CHALLENGER) == "2"
        with pytest.raises(RuntimeError, match="reason"):  # the server checks the answer against the form
            resume_flow_run(paused.id, run_input={"decision": "approve", "reason": "  ", "approver": "Dr. Ada"})
        assert wait_for_state(name, "PAUSED")
        resume_flow_run(paused.id, run_input={"decision": "approve", "reason": "overlays of 20 cases reviewed",
                                              "approver": "Dr. Ada"})
    assert "error" not in out, out.get("error")
    assert wait_for_state(name, "COMPLETED")
    promotion, deployment = out["value"]["promotion"], out["value"]["deployment"]
    assert promotion["promoted"] and promotion["champion"] == "2" and promotion["previous"] == "1"
    assert (registry.alias_version(uri, model), registry.alias_version(uri, model, registry.PREVIOUS)) == ("2", "1")
    assert deployment["model_version"] == "2"  # the release went on to deploy what was approved
    tags = mc.get_model_version(model, "2").tags
    assert tags["voxelflow.decision"] == "promoted"
    assert (tags["voxelflow.approval.decision"], tags["voxelflow.approval.by"], tags["voxelflow.approval.reason"]) \
        == ("approved", "Dr. Ada", "overlays of 20 cases reviewed")
    events = audit_of(release_home, model)
    assert [e["event"] for e in events][:2] == ["model.awaiting_approval", "model.approved"]
    approved = events[1]
    assert approved["actor"] == "Dr. Ada" and approved["details"]["reason"] == "overlays of 20 cases reviewed"
    assert approved["details"]["previous"] == "1"
    assert audit.verify(connect(settings_for(release_home).database), audit.mlflow_anchors(uri)).ok


def test_a_person_rejects_in_the_paused_run_and_nothing_moves(prefect_here, release_home):
    from prefect.flow_runs import resume_flow_run

    from voxelflow.release import registry

    model = f"reject-{uuid.uuid4().hex[:6]}"
    uri = settings_for(release_home).tracking_uri
    name = f"reject-{uuid.uuid4().hex[:8]}"
    flow_fn = release_flow.with_options(flow_run_name=name)
    with running(flow_fn, str(release_home), model, 0.9, None, [], MANUAL, {}) as out:
        paused = wait_for_state(name, "PAUSED")
        resume_flow_run(paused.id, run_input={"decision": "reject", "reason": "misses small lesions on scanner B",
                                              "approver": "Dr. Grace"})
    assert "error" not in out, out.get("error")
    assert wait_for_state(name, "COMPLETED")
    promotion = out["value"]["promotion"]
    assert not promotion["promoted"] and promotion["champion"] is None and out["value"]["deployment"] is None
    assert "rejected by Dr. Grace: misses small lesions on scanner B" in promotion["reasons"]
    assert registry.alias_version(uri, model) is None
    tags = registry.client(uri).get_model_version(model, "1").tags
    assert tags["voxelflow.decision"] == "rejected"
    assert (tags["voxelflow.approval.decision"], tags["voxelflow.approval.by"]) == ("rejected", "Dr. Grace")
    rejected = audit_of(release_home, model)[-1]
    assert rejected["event"] == "model.approval_rejected" and rejected["actor"] == "Dr. Grace"
    assert rejected["details"]["reason"] == "misses small lesions on scanner B"


def test_no_answer_before_the_timeout_counts_as_rejected(prefect_here, release_home):
    from voxelflow.release import registry

    model = f"expire-{uuid.uuid4().hex[:6]}"
    uri = settings_for(release_home).tracking_uri
    name = f"expire-{uuid.uuid4().hex[:8]}"
    flow_fn = release_flow.with_options(flow_run_name=name)
    promote = {**MANUAL, "approval_timeout_s": 2}
    with running(flow_fn, str(release_home), model, 0.9, None, [], promote, {}) as out:
        wait_for_state(name, "PAUSED")
    assert type(out.get("error")).__name__ == "ApprovalExpired", out
    assert wait_for_state(name, "FAILED")
    assert registry.alias_version(uri, model) is None
    tags = registry.client(uri).get_model_version(model, "1").tags
    assert (tags["voxelflow.decision"], tags["voxelflow.approval.decision"]) == ("rejected", "expired")
    expired = audit_of(release_home, model)[-1]
    assert expired["event"] == "model.approval_expired" and expired["details"]["reason"] == "no answer within 2 s"


# ---------------------------------------------------------------- the champion moved while the question was open


@pytest.mark.parametrize("new_champion_dice, promoted", [(0.95, False), (0.4, True)])
def test_an_approval_is_checked_against_the_champion_of_the_moment(release_home, new_champion_dice, promoted):
    """Another lifecycle made version 2 champion while version 3 waited for its approval (compared with
    version 1): the approval scores 3 against 2 and applies the gates again before anything moves."""
    from voxelflow.pipeline import Context, Promotion, lineage
    from voxelflow.release import registry
    from voxelflow.stages.approval import Answer, answer_stage

    model = f"moved-{uuid.uuid4().hex[:6]}"
    spec = make_spec(model, MANUAL)
    ctx = Context(settings_for(release_home), spec.name)
    uri, mc = registered(release_home, model, 3)
    registry.promote(uri, model, "1")
    run_id, outcome, evaluation = candidate(ctx, spec, 0.9, ("1", 0.5), [])
    cases = [f"case-{i}" for i in range(6)]  # the relative gate pairs the test cases one by one
    evaluation = replace(evaluation, test_ids=cases, candidate_cases={"dice": dict.fromkeys(cases, 0.9)},
                         champion_cases={"dice": dict.fromkeys(cases, 0.5)})
    registry.tag_version(uri, model, "3", {  # what the lifecycle leaves on a candidate that passed its gates
        "voxelflow.gate.min_dice": "pass: dice 0.9000 meets the gate 0.5000",
        "voxelflow.gate.vs_champion_dice": "pass: beats version 1", "voxelflow.compared_with": "1",
        "voxelflow.reasons": "all gates passed", "voxelflow.decision": "awaiting_approval"})
    mc.set_registered_model_alias(model, registry.CHALLENGER, "3")
    registry.promote(uri, model, "2")  # meanwhile
    waiting = Promotion("3", False, ["all gates passed"], "1", None, f"models:/{model}/3")
    rescored = []

    def rescore(_ctx, name, version, _evaluation):
        rescored.append((name, version))
        return {"dice": dict.fromkeys(cases, new_champion_dice)}

    result = answer_stage(spec.promote, ctx, waiting, evaluation, outcome, run_id, lineage(spec, "d" * 16),
                          Answer("approve", "reviewed", "Dr. Ada"), rescore=rescore)
    assert rescored == [(model, "2")]
    assert result.promoted is promoted
    assert registry.alias_version(uri, model) == ("3" if promoted else "2")
    tags = mc.get_model_version(model, "3").tags
    assert tags["voxelflow.compared_with"] == "2" and tags["voxelflow.approval.by"] == "Dr. Ada"
    assert tags["voxelflow.decision"] == ("promoted" if promoted else "rejected")
    assert tags["voxelflow.gate.vs_champion_dice"].startswith("pass" if promoted else "fail")
    last = audit_of(release_home, model)[-1]
    assert last["event"] == ("model.approved" if promoted else "model.rejected")
    if promoted:
        assert registry.alias_version(uri, model, registry.PREVIOUS) == "2"
    else:
        assert last["details"]["approved_by"] == "Dr. Ada" and "champion became 2" in last["details"]["reasons"][0]
