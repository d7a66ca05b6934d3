"""A person's answer to a candidate that passed the gates under ``promote.approval: manual``.

The lifecycle asks (the flow pauses for input in the Prefect UI: ``flows/release.py``); this module
acts on the answer. Only the gated challenger waiting for approval can be approved (anything else
is refused with the reason and audited). An approval moves ``champion`` by the same compare-and-set
as an automatic promotion: if another lifecycle (or a rollback) moved ``champion`` while the question
was open, the candidate is scored against the new champion and the gates are applied again before
anything moves. A rejection, or no answer in time, leaves the aliases alone. Every answer is tagged
on the version and written to the audit log by :mod:`voxelflow.release.promotion`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from voxelflow.core import audit
from voxelflow.release import policy, registry
from voxelflow.release.promotion import NotApprovable, approval_tags, approve, decision_tags, reject
from voxelflow.spec.config import PromoteSpec
from voxelflow.stages.context import Context
from voxelflow.stages.evaluate import Evaluation
from voxelflow.stages.promote import Promotion, candidate_behaviour, rescored
from voxelflow.stages.train import TrainOutcome


@dataclass(frozen=True)
class Answer:
    decision: Literal["approve", "reject", "expired"]
    reason: str
    approver: str


def awaiting(spec: PromoteSpec, promotion: Promotion) -> bool:
    """Whether the candidate passed every gate and waits, approval being manual, for a person."""
    return (spec.approval == "manual" and not promotion.promoted and bool(promotion.gates)
            and all(g["passed"] for g in promotion.gates))


def answer_stage(
    spec: PromoteSpec, ctx: Context, promotion: Promotion, evaluation: Evaluation, outcome: TrainOutcome,
    run_id: str, tags: dict[str, str], answer: Answer,
    rescore: Callable[[Context, str, str, Evaluation], dict[str, Any]] | None = None,
) -> Promotion:
    """Act on ``answer`` for the candidate ``promotion`` registered; returns the promotion as it now stands."""
    uri, db, name, version = ctx.tracking_uri, ctx.db, spec.model_name, promotion.version
    if answer.decision != "approve":
        reject(uri, db, name, version, answer.approver, answer.reason, expired=answer.decision == "expired")
        said = "nobody answered in time" if answer.decision == "expired" else f"rejected by {answer.approver}"
        return replace(promotion, promoted=False, reasons=[*promotion.reasons, f"{said}: {answer.reason}"],
                       champion=registry.alias_version(uri, name))
    approved = f"approved by {answer.approver}: {answer.reason}"
    compared, gates = evaluation.champion_version, promotion.gates
    for _ in range(5):
        try:
            previous = approve(uri, db, name, version, answer.approver, answer.reason, expected=compared, check=True)
        except NotApprovable as refused:  # no longer what the gates let through (a newer challenger, say)
            return _refused(spec, ctx, promotion, answer, str(refused))
        except registry.ChampionMoved as moved:  # scored against the new champion outside the lock
            compared = moved.current
            champion_scores, champion_cases = (None, None) if compared is None else rescored(
                ctx, name, compared, evaluation, rescore)
            decision = policy.decide(evaluation.candidate, champion_scores, spec.gates,
                                     candidate_behaviour(spec, ctx, outcome, evaluation), {**tags, "run_id": run_id},
                                     evaluation.directions, evaluation.candidate_cases, champion_cases)
            gates = decision.rows()
            if not decision.promote:
                return _refused_after_approval(spec, ctx, promotion, evaluation, answer, compared, decision)
            registry.tag_version(uri, name, version, {"voxelflow.compared_with": compared or "none", **decision.tags()})
            continue
        return replace(promotion, promoted=True, reasons=[*promotion.reasons, approved], champion=version,
                       previous=previous, gates=gates)
    raise RuntimeError(f"champion of {name} kept moving while version {version} was being approved")


def _refused_after_approval(spec: PromoteSpec, ctx: Context, promotion: Promotion, evaluation: Evaluation,
                            answer: Answer, compared: str | None, decision: policy.Decision) -> Promotion:
    """A person approved, but ``champion`` changed meanwhile and the candidate fails the gates against
    the new one: nothing moves; the approval, the new comparison and the refusal are all recorded."""
    uri, name, version = ctx.tracking_uri, spec.model_name, promotion.version
    reasons = [f"approved by {answer.approver}, but champion became {compared or 'unset'} while waiting (it was "
               f"{evaluation.champion_version or 'unset'}) and the gates fail against it: {'; '.join(decision.reasons)}"]
    with ctx.db.locked(f"register:{name}"):
        registry.tag_version(uri, name, version, {**approval_tags("approved", answer.approver, answer.reason),
                                                  **decision_tags(replace(decision, reasons=reasons), False, compared)})
    entry = audit.append(ctx.db, "model.rejected", "voxelflow", model=name, version=version, compared_with=compared,
                         metrics=evaluation.candidate, reasons=reasons, approved_by=answer.approver,
                         approval_reason=answer.reason)
    audit.anchor_in_mlflow(uri, name, version, entry)
    return replace(promotion, promoted=False, reasons=[*promotion.reasons, *reasons],
                   champion=registry.alias_version(uri, name), gates=decision.rows())


def _refused(spec: PromoteSpec, ctx: Context, promotion: Promotion, answer: Answer, refusal: str) -> Promotion:
    """A person approved a version that is no longer approvable: nothing moves; the refusal is audited."""
    uri, name, version = ctx.tracking_uri, spec.model_name, promotion.version
    entry = audit.append(ctx.db, "model.approval_refused", answer.approver, model=name, version=version,
                         reason=answer.reason, refused=refusal)
    audit.anchor_in_mlflow(uri, name, version, entry)
    return replace(promotion, promoted=False, reasons=[*promotion.reasons, f"approval by {answer.approver} refused: "
                                                       f"{refusal}"], champion=registry.alias_version(uri, name))
