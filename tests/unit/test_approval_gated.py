"""A person approves only what the gates let through: `voxelflow approve` and the paused lifecycle's
answer accept the challenger decided `awaiting_approval` with every gate passed, refuse anything else
with the reason, and promote anyway only with `--override "why"`, recorded as an override."""

from __future__ import annotations

import pytest

from voxelflow.core import audit
from voxelflow.release import registry
from voxelflow.spec.config import Settings

TAGS = {"pipeline": "tiny", "dataset_digest": "d" * 16, "spec_digest": "s" * 16}
CASES = [f"case-{i}" for i in range(6)]


@pytest.fixture
def lifecycle(tmp_path, tiny_spec, tiny_model_config, tiny_weights):
    """Candidates registered by the lifecycle's own register stage under manual approval (no champion
    yet): versions 1 and 3 pass the gates and wait, version 2 fails its dice gate; 3 holds `challenger`."""
    from voxelflow.pipeline import Context, Evaluation, TrainOutcome, ensure_tracking, register_stage

    ctx = Context(Settings(home=tmp_path / "home"), tiny_spec.name)
    ensure_tracking(ctx)
    ctx.store.write_bytes("models/w.safetensors", tiny_weights[0])
    outcome = TrainOutcome("models/w.safetensors", tiny_model_config, [], 0, 0.0, None, "")
    spec = tiny_spec.promote.model_copy(update={"model_name": "m", "approval": "manual", "gates": tiny_spec.promote
                                                .gates.model_copy(update={"min_dice": 0.5})})
    decided = []
    for dice in (0.9, 0.2, 0.8):
        run_id = registry.start_run(ctx.tracking_uri, ctx.settings.artifact_root, tiny_spec, {"dataset_digest": "d" * 16})
        evaluation = Evaluation({"dice": dice}, None, None, "", CASES, ["dice"], 2)
        decided.append(register_stage(spec, ctx, run_id, outcome, evaluation, TAGS))
    assert [p.version for p in decided] == ["1", "2", "3"] and not any(p.promoted for p in decided)
    tags = registry.client(ctx.tracking_uri).get_model_version("m", "2").tags
    assert tags["voxelflow.decision"] == "rejected" and tags["voxelflow.gate.min_dice"].startswith("fail")
    return ctx, spec, outcome, decided


def cli(ctx, *args: str) -> tuple[int, str]:
    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(app, ["approve", "m", *args], env={"VOXELFLOW_HOME": str(ctx.settings.home),
                                                                  "USER": "dr-reviewer"})
    return result.exit_code, " ".join(result.output.split())


def test_each_version_the_gates_did_not_let_through_is_refused_with_its_reason(lifecycle):
    ctx, *_ = lifecycle
    uri, mc = ctx.tracking_uri, registry.client(ctx.tracking_uri)
    mc.create_model_version("m", str(ctx.settings.home))  # version 4: registered by hand, never evaluated
    registry.client(uri).set_registered_model_alias("m", registry.CHALLENGER, "3")
    refusals = {
        "1": "it does not hold 'challenger' (version 3 does)",  # passed, but a newer candidate came since
        "2": "its decision is 'rejected', not 'awaiting_approval'; gate min_dice did not pass",
        "4": "the gates never decided on it (no voxelflow.decision tag); it carries no gate results",
    }
    for version, why in refusals.items():
        code, out = cli(ctx, version, "--reason", "looks fine to me")
        assert code == 1 and f"version {version} of m cannot be approved:" in out and why in out, out
        assert "--override" in out
    registry.tag_version(uri, "m", "3", {"voxelflow.gate.lineage": "fail: lineage misses spec_digest"})
    code, out = cli(ctx, "3", "--reason", "looks fine")  # a gate failing on the waiting challenger
    assert code == 1 and "gate lineage did not pass" in out
    code, out = cli(ctx, "9", "--reason", "no such version")
    assert code == 1 and "model 'm' has no version 9" in out
    code, out = cli(ctx, "3", "--reason", " ")
    assert code == 1 and "needs a reason" in out
    assert registry.alias_version(uri, "m") is None  # nothing moved
    assert [e["event"] for e in audit.entries(ctx.db) if e["event"].startswith("model.approv")] == []


def test_the_gated_challenger_is_approved_and_then_cannot_be_approved_again(lifecycle):
    ctx, *_ = lifecycle
    uri, mc = ctx.tracking_uri, registry.client(ctx.tracking_uri)
    code, out = cli(ctx, "3", "--reason", "reviewed the overlays of 20 cases")
    assert code == 0 and "champion is version 3 (previous: none)" in out
    tags = mc.get_model_version("m", "3").tags
    assert (tags["voxelflow.decision"], tags["voxelflow.approval.decision"], tags["voxelflow.approval.by"]) == (
        "promoted", "approved", "dr-reviewer")
    assert "voxelflow.approval.override" not in tags
    (entry,) = [e for e in audit.entries(ctx.db) if e["event"] == "model.approved"]
    assert entry["details"] == {"model": "m", "version": "3", "previous": None,
                                "reason": "reviewed the overlays of 20 cases"}
    assert audit.verify(ctx.db, audit.mlflow_anchors(uri)).anchor.seq == entry["seq"]
    code, out = cli(ctx, "3", "--reason", "once more")
    assert code == 1 and "already champion" in out
    registry.promote(uri, "m", "1")  # champion 1, previous 3
    registry.rollback(uri, ctx.db, "m", "ops", audit.Sink(ctx.db, uri), "bad on scanner B")  # 3 is champion again, 1 rolled back
    code, out = cli(ctx, "1", "--reason", "again")
    assert code == 1 and "it was rolled back (replaced by 3: bad on scanner B)" in out


def test_an_override_promotes_a_version_the_gates_rejected_and_says_who_why_and_what_it_overrode(lifecycle):
    ctx, *_ = lifecycle
    uri, mc = ctx.tracking_uri, registry.client(ctx.tracking_uri)
    code, out = cli(ctx, "2", "--override", "the dice gate is wrong for paediatric scans; board decision 14")
    assert code == 0 and "champion is version 2 (previous: none) by override" in out
    assert registry.alias_version(uri, "m") == "2"
    tags = mc.get_model_version("m", "2").tags
    assert tags["voxelflow.approval.decision"] == "override" and tags["voxelflow.approval.by"] == "dr-reviewer"
    assert tags["voxelflow.approval.override"] == "the dice gate is wrong for paediatric scans; board decision 14"
    assert tags["voxelflow.approval.overridden"] == ("it does not hold 'challenger' (version 3 does); its decision "
                                                     "is 'rejected', not 'awaiting_approval'; gate min_dice did not pass")
    assert tags["voxelflow.decision"] == "promoted"
    (entry,) = [e for e in audit.entries(ctx.db) if e["event"] == "model.approved"]
    assert entry["actor"] == "dr-reviewer"
    assert entry["details"]["override"] == "the dice gate is wrong for paediatric scans; board decision 14"
    assert entry["details"]["overridden"] == tags["voxelflow.approval.overridden"].split("; ")
    assert audit.verify(ctx.db, audit.mlflow_anchors(uri)).anchor.seq == entry["seq"]  # anchored on version 2


def test_the_paused_lifecycle_s_approval_of_a_version_no_longer_gated_is_refused_and_audited(lifecycle):
    """The lifecycle that registered version 1 waited; version 3 took `challenger` since: approving 1
    in its paused run moves nothing and says why."""
    from voxelflow.pipeline import Evaluation
    from voxelflow.stages.approval import Answer, answer_stage

    ctx, spec, outcome, decided = lifecycle
    evaluation = Evaluation({"dice": 0.9}, None, None, "", CASES, ["dice"], 2)
    result = answer_stage(spec, ctx, decided[0], evaluation, outcome, "run", TAGS,
                          Answer("approve", "reviewed", "Dr. Ada"))
    assert not result.promoted and registry.alias_version(ctx.tracking_uri, "m") is None
    assert "approval by Dr. Ada refused: version 1 of m cannot be approved: it does not hold 'challenger' " \
           "(version 3 does)" in result.reasons[-1]
    refused = [e for e in audit.entries(ctx.db) if e["event"] == "model.approval_refused"]
    assert [(e["actor"], e["details"]["version"]) for e in refused] == [("Dr. Ada", "1")]
    waiting = answer_stage(spec, ctx, decided[2], evaluation, outcome, "run", TAGS,
                           Answer("approve", "reviewed", "Dr. Ada"))
    assert waiting.promoted and registry.alias_version(ctx.tracking_uri, "m") == "3"
