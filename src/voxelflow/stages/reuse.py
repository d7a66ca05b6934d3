"""Reuse of finished work: each step's result recorded in the database under a key of its inputs, and found
again by a later lifecycle whose inputs are the same.

A key is a digest of the step's id, its spec section (after overlays and ``--set``), the digests of the
references it reads and the code version (voxelflow's version and the source digest of every user
component the step uses). Ingestion always runs (new data must be seen); evaluation's key also holds the
champion version it compared against; ``promote``, ``deploy`` and the user steps after ``promote`` always
run, against the registry as it is now. A recorded result is reused only while what it points at still
exists (a preprocessed store, trained weights, an MLflow run, a step's artifacts): otherwise it is
computed again. ``fresh`` ignores recorded results (and still records the new ones); ``resume``
continues the latest failed lifecycle of the pipeline: what it finished is reused by key, and training
goes on in its MLflow run, from the newest checkpoint it left.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import asdict, dataclass, is_dataclass, replace
from typing import Any

from sqlalchemy import insert, select, update

from voxelflow.core import db as vdb
from voxelflow.core import user_code
from voxelflow.core.storage import digest_json
from voxelflow.data.preprocess import PreprocessReport, transform_digest
from voxelflow.release import registry
from voxelflow.stages.context import Context, from_dict
from voxelflow.stages.evaluate import Evaluation
from voxelflow.stages.steps import StepRecord
from voxelflow.stages.train import TrainOutcome, model_config

log = logging.getLogger(__name__)
REUSABLE = ("preprocess", "train", "evaluate")  # built-in stages whose results are recorded and reused
TYPES: dict[str, type] = {"preprocess": PreprocessReport, "train": TrainOutcome, "evaluate": Evaluation}


class NothingToResume(ValueError):
    """``resume`` was asked for, and the pipeline's latest lifecycle did not fail (or there is none)."""


def digest(obj: Any) -> str:
    """The digest of ``obj``'s canonical JSON form (a dataclass as its fields)."""
    return digest_json(asdict(obj) if is_dataclass(obj) and not isinstance(obj, type) else obj)


def section(part: Any) -> dict[str, Any]:
    """A spec section as it is hashed: every key but where it runs (``work_pool``)."""
    dumped = part.model_dump(mode="json", by_alias=True)
    dumped.pop("work_pool", None)
    return dumped


def code_version(packages: list[str]) -> str:
    """voxelflow's version and the digest of each user package's source (an edit, or another installed version,
    changes it)."""
    from voxelflow import __version__

    return "; ".join([f"voxelflow={__version__}",
                      *(f"{p}=src.{v}" for p, v in user_code.source_digests(packages).items())])


def _tops(paths: list[str]) -> list[str]:
    return sorted({p.partition(":")[0].split(".")[0] for p in paths if ":" in p} - set(user_code.CORE))


def ref_digest(name: str, ref: Any) -> str:
    """The digest of a reference as an input: what it holds, not how long it took or how much was new."""
    if name == "dataset":
        return digest({"dataset": ref.dataset_digest, "cases": sorted(ref.case_ids)})
    if name == "preprocessed":
        return digest({"store": ref.store, "failed": ref.failed, "shapes": ref.shapes})
    return digest(_as_read(ref))


def _as_read(ref: Any) -> Any:
    """A reference as it reads back from its record (an int where the type says float is a float): a result
    made now and the same one reused hash alike."""
    return from_dict(type(ref), json.loads(json.dumps(asdict(ref), default=str)))


def stage_key(sid: str, spec: Any, state: Any) -> str:
    """The key of a built-in stage's result: its id, section, input references and code version."""
    if sid == "preprocess":
        parts = {"section": section(spec.preprocess), "dataset": ref_digest("dataset", state.ingested),
                 "code": code_version(user_code.packages({"transforms": spec.preprocess.transforms}))}
    elif sid == "train":
        parts = {"section": section(spec.train), "model": model_config(spec), "split": ref_digest("split", state.split),
                 "preprocessed": ref_digest("preprocessed", state.prep), "code": code_version(user_code.spec_packages(spec))}
    elif sid == "evaluate":
        metrics = [m.function for m in spec.evaluate.custom_metrics.values()]
        parts = {"section": section(spec.evaluate), "model_name": spec.promote.model_name,
                 "candidate": ref_digest("candidate", state.outcome), "test": sorted(state.split.test),
                 "code": code_version(sorted(set(_tops(metrics)) | set(user_code.packages(
                     {"postprocess": spec.evaluate.postprocess}))))}
    else:
        raise KeyError(sid)
    return digest({"step": sid, **parts})


def step_key(step: Any, inputs: Any) -> str:
    """The key of a user step's record: its spec, its inputs (not which lifecycle asks) and its code."""
    given = inputs.model_dump(mode="json")
    given.pop("lifecycle_id", None)
    return digest({"step": step.id, "spec": step.model_dump(mode="json", by_alias=True), "inputs": given,
                   "code": code_version(_tops([step.uses]))})


@dataclass
class Found:
    result: Any
    run_id: str | None


class Memo:
    """One lifecycle's view of the recorded results of its pipeline, and its own row among the lifecycles."""

    def __init__(self, ctx: Context, spec: Any, lifecycle_id: str = "", fresh: bool = False,
                 resume: bool = False) -> None:
        if fresh and resume:
            raise ValueError("--fresh and --resume contradict each other: --resume reuses the failed lifecycle's "
                             "finished steps, --fresh ignores every recorded result")
        self.ctx, self.spec, self.fresh = ctx, spec, fresh
        self.id = lifecycle_id or uuid.uuid4().hex
        self.reused: list[str] = []
        self.resumed: dict[str, Any] | None = None
        db = ctx.db
        with db.transaction() as conn:
            if resume:
                row = conn.execute(select(vdb.lifecycles).where(vdb.lifecycles.c.pipeline == spec.name)
                                   .order_by(vdb.lifecycles.c.started.desc()).limit(1)).mappings().first()
                if row is None or row["status"] != "failed":
                    why = "it has none" if row is None else f"its latest one ({row['id']}) is {row['status']}"
                    raise NothingToResume(f"nothing to resume for pipeline {spec.name}: {why}; run it without "
                                          "--resume")
                self.resumed = dict(row)
                conn.execute(update(vdb.lifecycles).where(vdb.lifecycles.c.id == row["id"])
                             .values(status="resumed", ended=row["ended"] or vdb.now()))
            conn.execute(insert(vdb.lifecycles).values(
                id=self.id, pipeline=spec.name, spec_digest=spec.digest(), status="running",
                resumes=self.resumed["id"] if self.resumed else None, started=vdb.now()))
        if self.resumed:
            log.info("resuming lifecycle %s of %s, which failed in %s", self.resumed["id"], spec.name,
                     self.resumed["failed_step"])

    # ------------------------------------------------------------------ the lifecycle's own row

    def _set(self, **values: Any) -> None:
        with self.ctx.db.transaction() as conn:
            conn.execute(update(vdb.lifecycles).where(vdb.lifecycles.c.id == self.id).values(**values))

    def opened(self, run_id: str) -> None:
        self._set(run_id=run_id)

    def failed(self, step: str, exc: BaseException) -> None:
        self._set(status="failed", failed_step=step, reason=f"{type(exc).__name__}: {exc}"[:2000], ended=vdb.now())

    def finished(self) -> None:
        self._set(status="finished", ended=vdb.now())

    def resume_run(self) -> str | None:
        """The MLflow run of the failed lifecycle being resumed, while it exists and the spec is the one it ran:
        training goes on there, from its checkpoints. A spec changed since trains anew in a run of its own (its
        checkpoints were made by another configuration); what the failed lifecycle finished is still reused by key."""
        run_id = (self.resumed or {}).get("run_id")
        if run_id and self.resumed["spec_digest"] != self.spec.digest():
            log.warning("the spec of %s changed since lifecycle %s failed: training does not go on in its run %s",
                        self.spec.name, self.resumed["id"], run_id)
            return None
        return run_id if run_id and self._run_exists(run_id) else None

    # ------------------------------------------------------------------ recorded results

    def _find(self, step: str, key: str, champion: Any = ..., any_champion: bool = False) -> list[dict[str, Any]]:
        t = vdb.step_results
        q = select(t).where(t.c.pipeline == self.spec.name, t.c.step == step, t.c.key == key)
        if champion is not ... and not any_champion:
            q = q.where(t.c.champion.is_(None) if champion is None else t.c.champion == champion)
        with self.ctx.db.transaction() as conn:
            return [dict(r) for r in conn.execute(q.order_by(t.c.id.desc()).limit(5)).mappings()]

    def record(self, step: str, key: str, result: Any, run_id: str | None, champion: str | None = None) -> None:
        with self.ctx.db.transaction() as conn:
            conn.execute(insert(vdb.step_results).values(
                pipeline=self.spec.name, step=step, key=key, champion=champion, lifecycle=self.id, run_id=run_id,
                result=json.dumps(asdict(result), sort_keys=True, default=str), at=vdb.now()))

    def stage(self, sid: str, spec: Any, state: Any) -> Found | None:
        """A recorded result of the built-in stage ``sid`` for these inputs whose things still exist, or None."""
        if self.fresh:
            return None
        key = stage_key(sid, spec, state)
        if sid == "evaluate":
            uri, name = self.ctx.tracking_uri, spec.promote.model_name
            champion = registry.alias_version(uri, name)
            # the candidate is the champion already (an unchanged rerun): the comparison that made it one stands
            own = champion is not None and registry.find_version(uri, name, state.run_id) == champion
            rows = self._find(sid, key, champion, any_champion=own)
        else:
            rows = self._find(sid, key)
        for row in rows:
            result = from_dict(TYPES[sid], json.loads(row["result"]))
            why = self._missing(sid, spec, state, result, row["run_id"])
            if why:
                log.info("%s: the recorded result of lifecycle %s is not reused: %s", sid, row["lifecycle"], why)
                continue
            if sid == "preprocess":  # nothing was processed this time
                result = replace(result, processed=0, skipped=result.processed + result.skipped, bytes_written=0,
                                 seconds={})
            self.reused.append(sid)
            return Found(result, row["run_id"])
        return None

    def keep(self, sid: str, spec: Any, state: Any, result: Any) -> None:
        champion = result.champion_version if sid == "evaluate" else None
        self.record(sid, stage_key(sid, spec, state), result, state.run_id, champion)

    def step(self, step: Any, inputs: Any) -> StepRecord | None:
        if self.fresh:
            return None
        for row in self._find(step.id, step_key(step, inputs)):
            rec = from_dict(StepRecord, json.loads(row["result"]))
            if all(self.ctx.store.exists(k) for k in rec.artifacts):
                self.reused.append(step.id)
                return rec
        return None

    def keep_step(self, step: Any, inputs: Any, record: StepRecord) -> None:
        self.record(step.id, step_key(step, inputs), record, inputs.run_id)

    # ------------------------------------------------------------------ do its things still exist?

    def _run_exists(self, run_id: str | None) -> bool:
        if not run_id:
            return False
        try:
            run = registry.client(self.ctx.tracking_uri).get_run(run_id)
        except Exception as exc:  # noqa: BLE001 - a run MLflow does not know is one to compute again
            if "RESOURCE_DOES_NOT_EXIST" in str(exc) or "not found" in str(exc).lower():
                return False
            raise
        return run.info.lifecycle_stage != "deleted"

    def _missing(self, sid: str, spec: Any, state: Any, result: Any, run_id: str | None) -> str:
        """What of the recorded result no longer exists ('' when all of it does)."""
        store = self.ctx.store
        if sid == "preprocess":
            out = self.ctx.layout.preprocessed(transform_digest(spec.preprocess))
            if result.store != store.url_of(out.prefix):
                return f"it is in another store ({result.store})"
            failed = {f["case"] for f in result.failed}
            missing = set(state.ingested.case_ids) - failed - set(out.committed())
            return f"{len(missing)} preprocessed cases are gone from {result.store}" if missing else ""
        if not self._run_exists(run_id):
            return f"its MLflow run {run_id} is gone"
        key = result.weights_key if sid == "train" else result.overlay_key
        return "" if store.exists(key) else f"{key} is gone from the store"

