"""Promotion, a person's approval and deployment of a candidate, as one Prefect transaction.

``promote.approval: manual``: a candidate that passes the gates is registered with ``challenger``
and the lifecycle pauses (:func:`pause_flow_run` with :class:`ApprovalInput`) until a person answers
in the Prefect UI (the run's Resume form: approve or reject, a reason, their name), or until
``promote.approval_timeout_s`` passes, which counts as a rejection.

The promotion and the deployment that follows it succeed or fail together: the ``champion-moved``
task holds the move of ``champion`` in the transaction, and when deployment fails its rollback
hook puts ``champion`` and ``previous`` back and writes that to the audit log.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict
from typing import Literal

from prefect.artifacts import create_markdown_artifact
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.transactions import transaction
from pydantic import Field

from flows.announce import notify_champion
from flows.stages import placed
from tasks.deploy import deploy
from tasks.registry import answer_candidate, champion_moved, register_and_promote
from voxelflow.pipeline import Context, Deployment, Evaluation, Promotion, TrainOutcome
from voxelflow.spec.config import PipelineSpec, PromoteSpec
from voxelflow.stages.approval import Answer, answer_stage, awaiting


class ApprovalInput(RunInput):
    """The Resume form of a lifecycle paused for approval."""

    decision: Literal["approve", "reject"] = Field(
        description="approve: this version becomes champion (if it still passes the gates against the champion "
                    "of that moment); reject: the champion stays")
    reason: str = Field(min_length=1, max_length=5000, pattern=r"\S",
                        description="why: kept on the model version and in the audit log")
    approver: str = Field(min_length=1, max_length=250, pattern=r"\S",
                          description="your name, as it is to stand on the model version and in the audit log")


class ApprovalExpired(TimeoutError):
    """Nobody answered in ``promote.approval_timeout_s``: the candidate was recorded as rejected."""


def question(spec: PromoteSpec, promotion: Promotion, evaluation: Evaluation) -> str:
    """What the person is asked, as markdown: the candidate, what it was compared with, each gate."""
    rows = [f"| {g['gate']} | {'pass' if g['passed'] else 'fail'} | {g['detail']} |" for g in promotion.gates]
    scores = ", ".join(f"{k} {v:.4f}" for k, v in evaluation.candidate.items())
    champ = (f"version {evaluation.champion_version} (" + ", ".join(f"{k} {v:.4f}" for k, v in
                                                                   (evaluation.champion or {}).items()) + ")"
             if evaluation.champion_version else "none yet")
    return "\n".join([
        f"# Approve {spec.model_name} version {promotion.version}?", "",
        f"Held-out scores: {scores}. Compared with champion: {champ}.", "",
        "| gate | result | detail |", "|---|---|---|", *rows, "",
        f"Answer with **Resume** on this flow run within {spec.approval_timeout_s} s (decision, reason, your "
        "name); no answer by then counts as rejected. An approval is applied to the champion of that moment: "
        "if it changed meanwhile, the candidate is scored against it and the gates decide again.",
    ]) + "\n"


def ask(spec: PromoteSpec, promotion: Promotion, evaluation: Evaluation) -> Answer:
    """Pause this flow run until a person answers (or the time runs out: an ``expired`` answer)."""
    create_markdown_artifact(question(spec, promotion, evaluation), key="approval-" + "".join(
        c if c.isalnum() else "-" for c in spec.model_name.lower()),
        description=f"{spec.model_name} version {promotion.version} waits for approval")
    try:
        got = pause_flow_run(wait_for_input=ApprovalInput, timeout=spec.approval_timeout_s,
                             poll_interval=spec.approval_poll_s, key=f"approval-{promotion.version}")
    except FlowPauseTimeout:
        return Answer("expired", f"no answer within {spec.approval_timeout_s} s", "prefect")
    return Answer(got.decision, got.reason.strip(), got.approver.strip())


def approval(spec: PromoteSpec, ctx: Context, promotion: Promotion, evaluation: Evaluation, outcome: TrainOutcome,
             run_id: str, tags: dict[str, str]) -> Promotion:
    """Ask, then act on the answer; an expired question is recorded as a rejection and fails the run."""
    answer = ask(spec, promotion, evaluation)
    if answer.decision == "expired":
        # past the pause's deadline the server lets no task of this run start: record it here, then stop
        answer_stage(spec, ctx, promotion, evaluation, outcome, run_id, tags, answer)
        raise ApprovalExpired(f"{spec.model_name} version {promotion.version}: {answer.reason}; recorded as rejected")
    return answer_candidate(spec, ctx, promotion, evaluation, outcome, run_id, tags, answer)


def settled(spec: PipelineSpec, ctx: Context, promotion: Promotion, evaluation: Evaluation, outcome: TrainOutcome,
            run_id: str, tags: dict[str, str]) -> Promotion:
    """The promotion once a person has answered, when ``promote.approval: manual`` made it wait."""
    if awaiting(spec.promote, promotion):
        return approval(spec.promote, ctx, promotion, evaluation, outcome, run_id, tags)
    return promotion


@contextlib.contextmanager
def released(ctx: Context, model_name: str, promotion: Promotion) -> Iterator[None]:
    """The release transaction: the move of ``champion`` is held open while the block runs (deployment, gate
    steps after promote); if the block raises, the transaction rolls back and the aliases go back."""
    with transaction() as txn:
        try:
            if promotion.promoted:
                champion_moved(ctx, model_name, promotion.version)
            yield
        except BaseException as exc:
            txn.set("failure", f"{type(exc).__name__}: {exc}"[:2000])
            raise
    if promotion.promoted:  # committed: services following the champion swap it in now, not at their next poll
        notify_champion(model_name, promotion.version)


def release(spec: PipelineSpec, ctx: Context, lifecycle_id: str, run_id: str, outcome: TrainOutcome,
            evaluation: Evaluation, tags: dict[str, str], case_id: str) -> tuple[Promotion, Deployment | None]:
    """Register and promote the candidate (asking a person first when approval is manual), then deploy
    the champion; the move of ``champion`` and the deployment are one transaction: a failed deployment
    puts the aliases back as they were. (The lifecycle runs the same pieces from its graph.)

    Registration and approval stay outside the transaction: Prefect rolls a transaction back as soon
    as any task attempt in it fails, even one that a retry then completes, so only tasks that do not
    retry (``champion-moved``; ``deploy`` and the spec's own steps retry transient errors themselves)
    run inside it.
    """
    name = spec.promote.model_name
    promotion = placed("register-and-promote", spec.promote.work_pool, ctx, spec, lifecycle_id,
                       lambda: register_and_promote(spec.promote, ctx, run_id, outcome, evaluation, tags),
                       run_id=run_id, outcome=asdict(outcome), evaluation=asdict(evaluation), tags=tags)
    promotion = settled(spec, ctx, promotion, evaluation, outcome, run_id, tags)
    deployment = None
    with released(ctx, name, promotion):
        if promotion.champion is not None:
            deployment = placed("deploy", spec.deploy.work_pool, ctx, spec, lifecycle_id,
                                lambda: deploy(spec.deploy, name, ctx, case_id), case_id=case_id)
    return promotion, deployment
