"""Retries that end where one clean run ends: a promotion, an approval and a rollback cut off after
each of their registry writes, then retried, leave the aliases, the version tags and the audit log
exactly as an uninterrupted run does; and no scoring happens while the model's lock is held."""

from __future__ import annotations

import pytest

from voxelflow.core import audit
from voxelflow.release import registry
from voxelflow.spec.config import Settings

WRITES = ("create_registered_model", "create_model_version", "set_registered_model_alias",
          "delete_registered_model_alias", "set_model_version_tag", "delete_model_version_tag")
TAGS = {"pipeline": "tiny", "dataset_digest": "d" * 16, "spec_digest": "s" * 16}
CASES = [f"case-{i}" for i in range(6)]


class InjectedFailure(RuntimeError):
    """What the registry raises once, right after the write it was told to fail after."""


class Faults:
    """Counts the registry writes made while ``armed``; raises once after write number ``fail_after``."""

    def __init__(self) -> None:
        self.armed, self.count, self.fail_after, self.writes = False, 0, None, []

    def arm(self, fail_after: int | None) -> None:
        self.armed, self.count, self.fail_after, self.writes = True, 0, fail_after, []


class FlakyClient:
    """A real MlflowClient whose write calls report to :class:`Faults` after they have been made."""

    def __init__(self, real, faults: Faults) -> None:
        self._real, self._faults = real, faults

    def __getattr__(self, attr: str):
        value = getattr(self._real, attr)
        if attr not in WRITES:
            return value
        faults = self._faults

        def write(*args, **kwargs):
            out = value(*args, **kwargs)
            if faults.armed:
                faults.count += 1
                faults.writes.append(f"{attr}{args[1:3]}")
                if faults.count == faults.fail_after:
                    faults.fail_after = None  # once
                    raise InjectedFailure(f"injected after registry write {faults.count}: {attr}")
            return out

        return write


@pytest.fixture
def faults(monkeypatch) -> Faults:
    found, real = Faults(), registry.client
    for module in (registry, audit):  # the audit log's anchors are registry writes too
        monkeypatch.setattr(module, "client", lambda uri: FlakyClient(real(uri), found))
    return found


@pytest.fixture
def home(tmp_path):
    from voxelflow.pipeline import Context, ensure_tracking

    ctx = Context(Settings(home=tmp_path / "home"), "tiny")
    ensure_tracking(ctx)
    return ctx


def bare_model(ctx, name: str, versions: int) -> None:
    mc = registry.client(ctx.tracking_uri)
    mc.create_registered_model(name)
    for _ in range(versions):
        mc.create_model_version(name, str(ctx.settings.home))


def state(ctx, name: str) -> dict:
    """Aliases, every version's tags and the model's audit records, free of what differs between models;
    the anchor on each version must be the hash of a record of this model."""
    uri = ctx.tracking_uri
    records = [e for e in audit.entries(ctx.db) if isinstance(e["details"], dict) and e["details"].get("model") == name]
    by_seq = {e["seq"]: e["hash"] for e in records}
    versions = {}
    for mv in registry.client(uri).search_model_versions(f"name = '{name}'"):
        tags = dict(mv.tags)
        seq, digest = tags.pop(audit.ANCHOR_SEQ, None), tags.pop(audit.ANCHOR_HASH, None)
        if seq is not None:
            assert by_seq.get(int(seq)) == digest, f"version {mv.version}'s anchor is no record of {name}"
            tags["anchored"] = [e["event"] for e in records if e["seq"] == int(seq)][0]
        versions[str(mv.version)] = tags
    return {"aliases": {a: registry.alias_version(uri, name, a)
                        for a in (registry.CHAMPION, registry.PREVIOUS, registry.CHALLENGER)},
            "versions": versions,
            "audit": [(e["event"], e["actor"], {**e["details"], "model": "-"}) for e in records]}


def retried(faults: Faults, count: int, step) -> list[str]:
    """Run ``step(k)`` cut off after write k, then again, for every k; returns what each first attempt wrote."""
    cut = []
    for k in range(1, count + 1):
        faults.arm(k)
        with pytest.raises(InjectedFailure):
            step(k)
        cut.append(faults.writes[-1])
        faults.arm(None)
        step(k)
    faults.armed = False
    return cut


# ---------------------------------------------------------------- promotion


def test_a_promotion_cut_off_after_any_registry_write_and_retried_ends_as_one_clean_run(
        home, faults, tiny_spec, tiny_model_config, tiny_weights):
    """With ``beat_champion_by`` > 0: a retry that finds the candidate already champion neither scores
    it against itself nor tags the live champion rejected."""
    from voxelflow.pipeline import Evaluation, TrainOutcome, register_stage

    ctx, uri = home, home.tracking_uri
    home.store.write_bytes("models/w.safetensors", tiny_weights[0])
    outcome = TrainOutcome("models/w.safetensors", tiny_model_config, [], 0, 0.0, None, "")
    gates = tiny_spec.promote.gates.model_copy(update={"min_dice": 0.5, "beat_champion_by": 0.05})
    run_id = registry.start_run(uri, ctx.settings.artifact_root, tiny_spec, {"dataset_digest": "d" * 16})
    evaluation = Evaluation({"dice": 0.9}, {"dice": 0.5}, "2", "", CASES, ["dice"], 2,
                            candidate_cases={"dice": dict.fromkeys(CASES, 0.9)},
                            champion_cases={"dice": dict.fromkeys(CASES, 0.5)})
    rescored = []

    def promote(name: str):
        spec = tiny_spec.promote.model_copy(update={"model_name": name, "approval": "auto", "gates": gates})
        return register_stage(spec, ctx, run_id, outcome, evaluation, TAGS,
                              rescore=lambda *args: rescored.append(args) or {})

    def scenario(name: str) -> None:
        bare_model(ctx, name, 2)
        registry.promote(uri, name, "1")
        registry.promote(uri, name, "2")  # champion 2, previous 1: the candidate will be version 3

    scenario("clean")
    faults.arm(None)
    clean = promote("clean")
    count = faults.count
    assert clean.promoted and (clean.version, clean.champion, clean.previous) == ("3", "3", "2")
    expected = state(ctx, "clean")
    assert expected["aliases"] == {"champion": "3", "previous": "2", "challenger": "3"}
    assert expected["versions"]["3"]["voxelflow.decision"] == "promoted"
    assert count >= 10  # the version, its alias, what it replaces, two aliases, the decision, the anchor

    names = [f"cut-{k}" for k in range(1, count + 1)]
    for name in names:
        scenario(name)
    results = {}

    def step(k: int) -> None:
        results[k] = promote(names[k - 1])

    cut = retried(faults, count, step)
    assert any("champion" in w for w in cut) and any("voxelflow.decision" in w for w in cut)
    for k, name in enumerate(names, 1):
        assert state(ctx, name) == expected, f"cut off after {cut[k - 1]}"
        assert (results[k].promoted, results[k].previous, results[k].reasons) == (True, "2", clean.reasons), k
    assert rescored == []  # never scored again: not against itself, not at all


def test_a_promotion_cut_off_before_its_challenger_alias_sets_it_on_the_retry(home, faults, tiny_spec,
                                                                              tiny_model_config, tiny_weights):
    from voxelflow.pipeline import Evaluation, TrainOutcome, register_stage

    ctx, uri = home, home.tracking_uri
    home.store.write_bytes("models/w.safetensors", tiny_weights[0])
    outcome = TrainOutcome("models/w.safetensors", tiny_model_config, [], 0, 0.0, None, "")
    run_id = registry.start_run(uri, ctx.settings.artifact_root, tiny_spec, {"dataset_digest": "d" * 16})
    spec = tiny_spec.promote.model_copy(update={"model_name": "first", "approval": "manual"})
    evaluation = Evaluation({"dice": 0.95}, None, None, "", CASES, ["dice"], 2)
    faults.arm(2)  # creating the registered model, then the version: cut off there
    with pytest.raises(InjectedFailure, match="create_model_version"):
        register_stage(spec, ctx, run_id, outcome, evaluation, TAGS)
    faults.arm(None)
    waiting = register_stage(spec, ctx, run_id, outcome, evaluation, TAGS)
    assert waiting.version == "1" and not waiting.promoted
    assert registry.alias_version(uri, "first", registry.CHALLENGER) == "1"
    assert registry.client(uri).get_model_version("first", "1").tags["voxelflow.decision"] == "awaiting_approval"


# ---------------------------------------------------------------- rollback


def test_a_rollback_cut_off_after_any_registry_write_and_retried_ends_as_one_clean_run(home, faults):
    ctx, uri = home, home.tracking_uri

    def scenario(name: str) -> None:
        bare_model(ctx, name, 3)
        for v in ("1", "2", "3"):
            registry.promote(uri, name, v)  # champion 3, previous 2

    scenario("clean")
    faults.arm(None)
    assert registry.rollback(uri, ctx.db, "clean", "ops", audit.Sink(ctx.db, uri), "worse on scanner B", operation="op-1") == ("2", "3")
    count = faults.count
    expected = state(ctx, "clean")
    assert expected["aliases"] == {"champion": "2", "previous": None, "challenger": None}
    assert expected["versions"]["3"][registry.ROLLED_BACK] == "replaced by 2: worse on scanner B"
    assert expected["versions"]["3"][registry.ROLLED_BACK_OPERATION] == "op-1"
    assert registry.ROLLED_BACK not in expected["versions"]["2"]  # today's retry marked the restored version
    (record,) = [e for e in expected["audit"] if e[0] == "model.rolled_back"]
    assert record[2] == {"model": "-", "version": "2", "replaced": "3", "reason": "worse on scanner B",
                         "operation": "op-1"}

    names = [f"cut-{k}" for k in range(1, count + 1)]
    for name in names:
        scenario(name)
    cut = retried(faults, count, lambda k: registry.rollback(uri, ctx.db, names[k - 1], "ops", audit.Sink(ctx.db, uri), "worse on scanner B",
                                                             operation="op-1"))
    assert any("set_registered_model_alias" in w for w in cut) and any("delete" in w for w in cut)
    for k, name in enumerate(names, 1):
        assert state(ctx, name) == expected, f"cut off after {cut[k - 1]}"
    # run once more after it completed: the same answer, nothing written twice
    assert registry.rollback(uri, ctx.db, names[0], "ops", audit.Sink(ctx.db, uri), "worse on scanner B", operation="op-1") == ("2", "3")
    assert state(ctx, names[0]) == expected


def test_a_rollback_retried_after_the_aliases_moved_again_changes_nothing(home):
    ctx, uri = home, home.tracking_uri
    bare_model(ctx, "m", 4)
    for v in ("1", "2", "3"):
        registry.promote(uri, "m", v)
    assert registry.rollback(uri, ctx.db, "m", "ops", audit.Sink(ctx.db, uri), "bad", operation="op-a") == ("2", "3")
    registry.promote(uri, "m", "4")  # champion 4, previous 2
    with pytest.raises(registry.AliasesMoved, match="op-a"):
        registry.rollback(uri, ctx.db, "m", "ops", audit.Sink(ctx.db, uri), "bad", operation="op-a")
    assert (registry.alias_version(uri, "m"), registry.alias_version(uri, "m", registry.PREVIOUS)) == ("4", "2")
    with pytest.raises(registry.AliasesMoved, match="not 3, 2"):  # a compare-and-set on the pair
        registry.rollback(uri, ctx.db, "m", "ops", audit.Sink(ctx.db, uri), "bad", expected=("3", "2"))
    assert registry.rollback(uri, ctx.db, "m", "ops", audit.Sink(ctx.db, uri), "bad", expected=("4", "2")) == ("2", "4")
    with pytest.raises(ValueError, match="operation id"):
        registry.rollback(uri, ctx.db, "m", "ops", audit.Sink(ctx.db, uri), "bad", operation="x' or name like '%")
    assert [e["event"] for e in audit.entries(ctx.db)].count("model.rolled_back") == 2


# ---------------------------------------------------------------- approval


def awaiting_version(ctx, name: str, version: str) -> None:
    """Tag ``version`` as the lifecycle does a candidate that passed the gates under manual approval."""
    registry.tag_version(ctx.tracking_uri, name, version, {
        "voxelflow.gate.min_dice": "pass: dice 0.9000 meets the gate 0.5000",
        "voxelflow.gate.lineage": "pass: lineage complete", "voxelflow.compared_with": "1",
        "voxelflow.reasons": "all gates passed", "voxelflow.decision": "awaiting_approval"})
    registry.client(ctx.tracking_uri).set_registered_model_alias(name, registry.CHALLENGER, version)


def test_an_approval_cut_off_after_any_registry_write_and_retried_ends_as_one_clean_run(home, faults):
    from voxelflow.release import promotion

    ctx, uri = home, home.tracking_uri

    def scenario(name: str) -> None:
        bare_model(ctx, name, 2)
        registry.promote(uri, name, "1")
        awaiting_version(ctx, name, "2")

    def approve(name: str) -> str | None:
        return promotion.approve(uri, ctx.db, name, "2", "Dr. Ada", "reviewed 20 overlays", expected="1", check=True)

    scenario("clean")
    faults.arm(None)
    assert approve("clean") == "1"
    count = faults.count
    expected = state(ctx, "clean")
    assert expected["aliases"] == {"champion": "2", "previous": "1", "challenger": "2"}
    names = [f"cut-{k}" for k in range(1, count + 1)]
    for name in names:
        scenario(name)
    cut = retried(faults, count, lambda k: approve(names[k - 1]))
    for k, name in enumerate(names, 1):
        assert state(ctx, name) == expected, f"cut off after {cut[k - 1]}"
    assert approve(names[0]) == "1" and state(ctx, names[0]) == expected  # once more: nothing twice


# ---------------------------------------------------------------- no scoring under the lock


def lock_free(db, name: str) -> bool:
    """Whether another connection can take the lock ``name`` right now (it does not wait for it)."""
    from sqlalchemy.exc import OperationalError

    from voxelflow.core.db import Database

    other = Database(db.url)
    try:
        with other.engine.begin() as conn:
            conn.exec_driver_sql("PRAGMA busy_timeout=200" if other.sqlite else "SET LOCAL lock_timeout = '1s'")
            with other.locked_in(conn, name):
                return True
    except OperationalError:
        return False
    finally:
        other.dispose()


def test_the_champion_is_scored_outside_the_registry_lock(home, tiny_spec, tiny_model_config, tiny_weights):
    """Another lifecycle made version 2 champion after this candidate was compared with version 1: the
    candidate is scored against 2 while any other connection can take the model's lock, then promoted."""
    from voxelflow.pipeline import Evaluation, TrainOutcome, register_stage

    ctx, uri = home, home.tracking_uri
    bare_model(ctx, "m", 2)
    registry.promote(uri, "m", "1")
    registry.promote(uri, "m", "2")  # meanwhile
    home.store.write_bytes("models/w.safetensors", tiny_weights[0])
    outcome = TrainOutcome("models/w.safetensors", tiny_model_config, [], 0, 0.0, None, "")
    run_id = registry.start_run(uri, ctx.settings.artifact_root, tiny_spec, {"dataset_digest": "d" * 16})
    evaluation = Evaluation({"dice": 0.9}, {"dice": 0.5}, "1", "", CASES, ["dice"], 2,
                            candidate_cases={"dice": dict.fromkeys(CASES, 0.9)},
                            champion_cases={"dice": dict.fromkeys(CASES, 0.5)})
    seen = []

    def rescore(ctx_, name, version, _evaluation):
        seen.append((version, lock_free(ctx_.db, f"register:{name}")))
        return {"dice": dict.fromkeys(CASES, 0.6)}

    spec = tiny_spec.promote.model_copy(update={"model_name": "m", "approval": "auto", "gates": tiny_spec.promote.gates
                                                .model_copy(update={"min_dice": 0.5, "beat_champion_by": 0.05})})
    promoted = register_stage(spec, ctx, run_id, outcome, evaluation, TAGS, rescore=rescore)
    assert seen == [("2", True)]
    assert promoted.promoted and (promoted.champion, promoted.previous) == ("3", "2")
    assert registry.client(uri).get_model_version("m", "3").tags["voxelflow.compared_with"] == "2"
    assert lock_free(ctx.db, "register:m")


def test_a_rollback_cut_off_between_its_alias_writes_is_completed_by_a_plain_retry(home, faults):
    """Run again without the operation id (a person retrying the command): the restored version is
    not marked rolled back, the replaced one is, and the audit log has one record."""
    ctx, uri = home, home.tracking_uri
    for name in ("probe", "m"):
        bare_model(ctx, name, 3)
        for v in ("1", "2", "3"):
            registry.promote(uri, name, v)
    faults.arm(None)
    registry.rollback(uri, ctx.db, "probe", "ops", audit.Sink(ctx.db, uri), "bad")
    move = next(i for i, w in enumerate(faults.writes, 1) if w.startswith("set_registered_model_alias"))
    faults.arm(move)  # cut off right after `champion` moved, before `previous` is removed
    with pytest.raises(InjectedFailure, match="set_registered_model_alias"):
        registry.rollback(uri, ctx.db, "m", "ops", audit.Sink(ctx.db, uri), "bad")
    faults.arm(None)
    assert registry.rollback(uri, ctx.db, "m", "ops", audit.Sink(ctx.db, uri), "bad") == ("2", "3")
    assert (registry.alias_version(uri, "m"), registry.alias_version(uri, "m", registry.PREVIOUS)) == ("2", None)
    mc = registry.client(uri)
    assert registry.ROLLED_BACK not in mc.get_model_version("m", "2").tags
    assert mc.get_model_version("m", "3").tags[registry.ROLLED_BACK] == "replaced by 2: bad"
    records = [e for e in audit.entries(ctx.db) if e["event"] == "model.rolled_back" and e["details"]["model"] == "m"]
    assert [(r["details"]["version"], r["details"]["replaced"]) for r in records] == [("2", "3")]
