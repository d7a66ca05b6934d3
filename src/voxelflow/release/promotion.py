"""Moving ``champion`` to a registered candidate: by its gates (:func:`settle`) or by a person's
approval (:func:`approve`), each a compare-and-set that a retry completes instead of repeating.

Nothing is scored under the model's lock: the lock covers reading ``champion``, comparing it with the
version the candidate was judged against and writing the aliases and the decision's tags. If
``champion`` moved meanwhile, the candidate is scored against the new one outside the lock and judged
again, a bounded number of times. A retry that finds the candidate already champion takes the move
as done: nothing is scored again, and tags an earlier attempt finished stay as they are. Each
decision's audit record is written once, however often the step is retried.

A person approves only what the gates let through: the version holding ``challenger``, decided
``awaiting_approval``, every gate passed. Anything else is refused with the reason, unless the
approval is an override, which says why and is recorded as one on the version and in the audit log.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from voxelflow.core import audit
from voxelflow.release import registry
from voxelflow.release.policy import Decision

DECISION, GATE = "voxelflow.decision", "voxelflow.gate."
DECIDED = ("model.promoted", "model.rejected", "model.awaiting_approval")
OVERRIDE, OVERRIDDEN = "voxelflow.approval.override", "voxelflow.approval.overridden"


@dataclass
class Settled:
    """How a candidate's promotion ended: the decision, against which champion, what it replaced."""

    decision: Decision
    awaiting: bool
    compared: str | None
    previous: str | None


def decision_tags(decision: Decision, awaiting: bool, compared: str | None) -> dict[str, str]:
    """The version's record of its decision; ``voxelflow.decision`` comes last: it says the rest is there."""
    return {**decision.tags(), "voxelflow.compared_with": compared or "none",
            "voxelflow.reasons": "; ".join(decision.reasons)[:5000],
            DECISION: "promoted" if decision.promote else "awaiting_approval" if awaiting else "rejected"}


def settle(tracking_uri: str, db, name: str, version: str, compared: str | None, champion: Any,
           judge: Callable[[Any], tuple[Decision, bool]], rescore: Callable[[str], Any],
           attempts: int = 5) -> Settled:
    """Decide on ``version`` against the champion and move ``champion`` when the gates pass.

    ``champion`` is what ``judge`` needs of the version ``compared`` (None: no champion); ``judge``
    returns the decision and whether it waits for a person; ``rescore(v)`` scores another champion.
    Both run outside the lock. The decision is recorded only against the champion of that moment.
    """
    for _ in range(attempts):
        decision, awaiting = judge(champion)
        with db.locked(f"register:{name}"):
            current = registry.alias_version(tracking_uri, name)
            if current == compared:
                previous = (registry.promote(tracking_uri, name, version, expected=compared, check=True)
                            if decision.promote else None)
                registry.tag_version(tracking_uri, name, version, decision_tags(decision, awaiting, compared))
                return Settled(decision, awaiting, compared, previous)
        if current == version:  # an earlier attempt of this promotion made the move
            return _already_champion(tracking_uri, db, name, version, compared, decision, judge, rescore)
        compared, champion = current, None if current is None else rescore(current)
    raise RuntimeError(f"champion of {name} kept moving while version {version} was being promoted")


def _already_champion(tracking_uri: str, db, name: str, version: str, compared: str | None, decision: Decision,
                      judge: Callable[[Any], tuple[Decision, bool]], rescore: Callable[[str], Any]) -> Settled:
    """The move is done: finish the record the earlier attempt may have left unwritten, change nothing else."""
    tags = _tags(tracking_uri, name, version)
    replaced = tags.get(registry.REPLACED_CHAMPION)
    replaced = None if replaced in (None, "none") else replaced
    if replaced != compared:  # the earlier attempt had met another champion: its decision was against that one
        decision, _ = judge(None if replaced is None else rescore(replaced))
    if DECISION not in tags:
        with db.locked(f"register:{name}"):
            if registry.alias_version(tracking_uri, name) == version:
                registry.tag_version(tracking_uri, name, version, decision_tags(decision, False, replaced))
    return Settled(decision, False, replaced, replaced)


def record_decision(db, tracking_uri: str, name: str, version: str, settled: Settled, metrics: dict[str, float]) -> dict:
    """The decision's audit record, written once (a retry finds its own), anchored on the version."""
    d = settled.decision
    event = "model.promoted" if d.promote else "model.awaiting_approval" if settled.awaiting else "model.rejected"
    details: dict[str, Any] = {"model": name, "version": version, "compared_with": settled.compared,
                               "metrics": metrics, "reasons": d.reasons}
    if d.promote:
        details["previous"] = settled.previous
    entry = audit.find(db, DECIDED, model=name, version=version) or audit.append(db, event, "voxelflow",
                                                                                       **details)
    audit.anchor_in_mlflow(tracking_uri, name, version, entry)  # the chain's head, where the log's writer cannot reach
    return entry


# ---------------------------------------------------------------- a person's answer


class NotApprovable(ValueError):
    """The version is not one the gates let through to a person; the message says why."""


def approval_tags(decision: str, actor: str, reason: str, override: str | None = None) -> dict[str, str]:
    """A person's answer on the version: ``voxelflow.approval.{decision,by,reason}`` (what lineage shows),
    and ``.override`` (why) when the approval overrode the gates."""
    tags = {"voxelflow.approval.decision": decision, "voxelflow.approval.by": actor[:250],
            "voxelflow.approval.reason": reason[:5000]}
    return {**tags, OVERRIDE: override[:5000]} if override else tags


def refusals(tags: dict[str, str], version: str, challenger: str | None) -> list[str]:
    """Why ``version`` (its tags) may not be approved: empty when it is the gated, waiting challenger."""
    out = []
    if registry.ROLLED_BACK in tags:
        out.append(f"it was rolled back ({tags[registry.ROLLED_BACK]})")
    if challenger != version:
        out.append(f"it does not hold 'challenger' ({f'version {challenger} does' if challenger else 'no version does'})")
    decided = tags.get(DECISION)
    if decided != "awaiting_approval":
        out.append("the gates never decided on it (no voxelflow.decision tag)" if decided is None
                   else f"its decision is {decided!r}, not 'awaiting_approval'")
    gates = {k.removeprefix(GATE): v for k, v in tags.items() if k.startswith(GATE)}
    failed = sorted(g for g, v in gates.items() if not v.startswith("pass"))
    if not gates:
        out.append("it carries no gate results")
    elif failed:
        out.append(f"gate{'s' if len(failed) > 1 else ''} {', '.join(failed)} did not pass")
    return out


def approve(tracking_uri: str, db, name: str, version: str, actor: str, reason: str, *, override: str | None = None,
            expected: str | None = None, check: bool = False) -> str | None:
    """A person's decision to make ``version`` the champion (``promote.approval: manual``); returns the
    replaced champion.

    Only the version holding ``challenger``, decided ``awaiting_approval`` with every gate passed, is
    accepted; anything else raises :class:`NotApprovable` with the reasons, unless ``override`` says
    why to promote it anyway (kept as ``voxelflow.approval.override`` on the version and in the audit
    record, with what it overrode). A version that does not exist, or is already champion, is refused
    either way. Under the model's lock: the old champion keeps ``previous``; the version is tagged with
    who approved it and why; ``model.approved`` goes to the audit log, anchored on the version. With
    ``check`` the move is the compare-and-set of :func:`registry.promote`: :class:`registry.ChampionMoved`
    when ``champion`` is no longer ``expected``. A retry of an approval that moved ``champion`` completes
    its record and moves nothing.
    """
    override = (override or "").strip() or None
    reason = reason.strip() or override or ""
    if not reason:
        raise ValueError("an approval needs a reason (--reason)")
    mc = registry.client(tracking_uri)
    mine = approval_tags("override" if override else "approved", actor, reason, override)
    overridden: list[str] = []
    with db.locked(f"register:{name}"):
        try:
            tags = registry.retrying("read version", lambda: mc.get_model_version(name, version)).tags or {}
        except Exception as exc:  # noqa: BLE001 - classified here
            if registry._absent(exc):
                raise NotApprovable(f"model {name!r} has no version {version}") from exc
            raise
        champion = registry.alias_version(tracking_uri, name)
        if champion == version:
            if any(tags.get(k) != v for k, v in mine.items()):
                raise NotApprovable(f"version {version} of {name} is already champion: nothing to approve")
            old = tags.get(registry.REPLACED_CHAMPION)  # an earlier attempt of this approval made the move
            old = None if old in (None, "none") else old
            overridden = [r for r in tags.get(OVERRIDDEN, "").split("; ") if r]
        else:
            if check and champion != expected:
                raise registry.ChampionMoved(expected, champion)
            overridden = refusals(tags, version, registry.alias_version(tracking_uri, name, registry.CHALLENGER))
            if overridden and not override:
                raise NotApprovable(f"version {version} of {name} cannot be approved: {'; '.join(overridden)} "
                                    "(only the gated challenger waiting for approval can; --override \"why\" "
                                    "promotes it anyway, recorded as an override)")
            # who and why before the move: a retry recognises its own approval by them
            registry.tag_version(tracking_uri, name, version, {**mine, **({OVERRIDDEN: "; ".join(overridden)[:5000]}
                                                                          if override else {})})
            old = registry.promote(tracking_uri, name, version)
        registry.tag_version(tracking_uri, name, version, {
            "voxelflow.approval": "approved", "voxelflow.approved_by": actor, "voxelflow.approval_reason": reason[:5000],
            DECISION: "promoted"})
    details: dict[str, Any] = {"model": name, "version": str(version), "previous": old, "reason": reason}
    if override:
        details.update(override=override, overridden=overridden)
    entry = audit.find(db, ("model.approved",), **details) or audit.append(db, "model.approved", actor,
                                                                                 **details)
    audit.anchor_in_mlflow(tracking_uri, name, str(version), entry)
    return old


def reject(tracking_uri: str, db, name: str, version: str, actor: str, reason: str, expired: bool = False) -> None:
    """A person's refusal of ``version`` (or, ``expired``, nobody's answer in time): aliases stay as
    they are; the version is tagged ``voxelflow.decision: rejected`` with who and why, and
    ``model.approval_rejected`` (``model.approval_expired``) goes to the audit log, anchored on it."""
    if not reason.strip():
        raise ValueError("a rejection needs a reason")
    decision = "expired" if expired else "rejected"
    mc = registry.client(tracking_uri)
    with db.locked(f"register:{name}"):
        registry.retrying("read version", lambda: mc.get_model_version(name, version))  # it exists, or this raises
        registry.tag_version(tracking_uri, name, str(version), {
            "voxelflow.approval": decision, **approval_tags(decision, actor, reason), DECISION: "rejected"})
    entry = audit.append(db, f"model.approval_{decision}", actor, model=name, version=str(version), reason=reason)
    audit.anchor_in_mlflow(tracking_uri, name, str(version), entry)


def _tags(tracking_uri: str, name: str, version: str) -> dict[str, str]:
    mc = registry.client(tracking_uri)
    return registry.retrying("read version", lambda: mc.get_model_version(name, version)).tags or {}
