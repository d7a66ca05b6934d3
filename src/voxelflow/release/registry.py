"""MLflow tracking and registry: runs with lineage, the model logged as a safe pyfunc, gated promotion."""

from __future__ import annotations

import json
import subprocess
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from voxelflow import __version__
from voxelflow.core import redact, transient
from voxelflow.core.mlflow_client import client
from voxelflow.release import policy
from voxelflow.release.policy import Decision
from voxelflow.spec.config import Gates, PipelineSpec

CHAMPION, PREVIOUS, CHALLENGER = "champion", "previous", "challenger"


def code_version() -> str:
    """Package version plus the git commit when running from a checkout."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def flatten(prefix: str, obj: Any, out: dict[str, str]) -> dict[str, str]:
    if isinstance(obj, dict):
        for key, value in obj.items():
            flatten(f"{prefix}.{key}" if prefix else str(key), value, out)
    else:
        out[prefix] = str(obj)[:500]
    return out


def start_run(tracking_uri: str, artifact_root: str, spec: PipelineSpec, lineage: dict[str, str]) -> str:
    """Create the lifecycle's MLflow run with the spec as params and lineage as tags."""
    from mlflow.exceptions import MlflowException

    mc = client(tracking_uri)
    exp = mc.get_experiment_by_name(spec.name)
    if exp is not None:
        exp_id = exp.experiment_id
    else:
        server = tracking_uri.startswith(("http://", "https://", "databricks"))
        try:  # on a tracking server, the server decides where artifacts live
            exp_id = mc.create_experiment(spec.name, **({} if server else {
                "artifact_location": f"{artifact_root}/{spec.name}"}))
        except MlflowException:  # another lifecycle created it at the same moment: use that one
            exp = mc.get_experiment_by_name(spec.name)
            if exp is None:
                raise
            exp_id = exp.experiment_id
    tags = {f"voxelflow.{k}": v for k, v in lineage.items()}
    tags["voxelflow.code_version"] = code_version()
    run = mc.create_run(exp_id, tags=tags, run_name=f"{spec.name}-{lineage.get('dataset_digest', '')[:8]}")
    params = flatten("", spec.model_dump(mode="json", include={"preprocess", "train", "evaluate"}), {})
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        mc.log_batch(run.info.run_id, params=items[i : i + 100])
    if lineage.get("dataset_digest"):  # the data set as the run's input: MLflow's UI lists it by digest
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=spec.name, digest=lineage["dataset_digest"][:36], source_type="voxelflow",
                          source=json.dumps({"dataset_digest": lineage["dataset_digest"], "layout": spec.data.layout}))
        inputs = [DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])]
        for attempt in range(3):
            try:
                mc.log_inputs(run.info.run_id, datasets=inputs)
                break
            except MlflowException as exc:
                # two lifecycles of one dataset at once: MLflow's get-or-create of the dataset row races, and
                # the loser's insert breaks its unique key; the row exists now, so a retry links to it
                if attempt == 2 or not any(w in str(exc) for w in ("UNIQUE", "unique", "duplicate key")):
                    raise
    return run.info.run_id


@contextmanager
def system_metrics(tracking_uri: str, run_id: str, interval_s: float = 10.0):
    """CPU, memory, disk, network (and GPU, where pynvml sees one) logged to the run while the block runs."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, tracking_uri=tracking_uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def log_metrics(tracking_uri: str, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    log_metric_steps(tracking_uri, run_id, [(step, metrics)])


def log_metric_steps(tracking_uri: str, run_id: str, rows: list[tuple[int, dict[str, float]]]) -> None:
    """Metrics of several steps in as few requests as MLflow allows (1000 metrics a batch)."""
    import math
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for step, metrics in rows for k, v in metrics.items()
             if v is not None and math.isfinite(v)]
    for i in range(0, len(items), 1000):
        client(tracking_uri).log_batch(run_id, metrics=items[i:i + 1000])


def log_bytes(tracking_uri: str, run_id: str, name: str, data: bytes) -> None:
    """Log an in-memory file (a picture, a report) as a run artifact; ``name`` may name a folder (``steps/qc/a.png``)."""
    folder, _, base = name.rpartition("/")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / base
        path.write_bytes(data)
        client(tracking_uri).log_artifact(run_id, str(path), folder or None)


# What the logged model imports to load and predict, as distributions published on PyPI. voxelflow
# itself is not published: its code travels inside the model (``code_paths``), so an environment
# made from the model's requirements.txt (`mlflow models serve` without `--env-manager local`) can
# load it. MLflow's own inference would name `voxelflow` and prune its dependencies (torch, monai).
# nibabel is an optional dependency of MONAI that its Orientation(d) transform needs; scikit-image one that
# the post transforms of evaluate.postprocess (KeepLargestConnectedComponent, RemoveSmallObjects) need.
MODEL_REQUIREMENTS = ("mlflow", "torch", "monai", "nibabel", "numpy", "safetensors", "fsspec", "pyyaml",
                      "pydantic", "pydantic-settings", "scikit-image")


def model_requirements() -> list[str]:
    """:data:`MODEL_REQUIREMENTS` pinned to the installed versions (local tags such as ``+cpu`` dropped)."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in MODEL_REQUIREMENTS]


def log_model(tracking_uri: str, run_id: str, config: dict[str, Any], weights: bytes) -> str:
    """Log the segmenter as an MLflow pyfunc (weights in safetensors, voxelflow's code with it); returns the model URI.

    The signature takes one 3-D float32 volume and gives a uint8 mask of its shape; its params
    ``affine`` (16 floats, row by row) or ``spacing`` (3 floats, mm) say where the voxels lie, as a
    NIfTI header does for voxelflow's service (:class:`~voxelflow.learn.model.SegmentationModel`).
    """
    import mlflow
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    from voxelflow.core import user_code

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1))]),
        params=ParamSchema([ParamSpec("affine", "double", [], (-1,)), ParamSpec("spacing", "double", [], (-1,))]),
    )
    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        files = _write_model_files(Path(tmp), config, weights)
        with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(Path(__file__).with_name("mlflow_model.py")),
                artifacts=files,
                signature=signature,
                code_paths=[str(Path(__file__).parents[1]), *user_code.code_paths(config)],  # and the user's packages
                pip_requirements=model_requirements(),
            )
    # leaving start_run's block marked the run FINISHED: it stays open until the lifecycle ends (end_run)
    client(tracking_uri).update_run(run_id, status="RUNNING")
    return info.model_uri


def end_run(tracking_uri: str, run_id: str, status: str) -> None:
    """Close the lifecycle's run: ``FINISHED`` when the lifecycle completed, ``FAILED`` or ``KILLED`` otherwise."""
    retrying("end run", lambda: client(tracking_uri).set_terminated(run_id, status=status))


def _write_model_files(path: Path, config: dict[str, Any], weights: bytes) -> dict[str, str]:
    import json

    (path / "model.json").write_text(json.dumps(config, indent=2))
    (path / "weights.safetensors").write_bytes(weights)
    return {"model.json": str(path / "model.json"), "weights.safetensors": str(path / "weights.safetensors")}


class RegistryError(RuntimeError):
    """The registry failed (after retries): never read as "no champion"."""


_ABSENT = ("RESOURCE_DOES_NOT_EXIST",)


def _absent(exc: Exception) -> bool:
    """A missing model or alias: the only errors that mean "nothing there"."""
    code = getattr(exc, "error_code", "")
    text = str(exc)
    return code in _ABSENT or (code == "INVALID_PARAMETER_VALUE" and "alias" in text and "not found" in text)


def _transient(exc: Exception) -> bool:
    return transient.is_transient(exc)


def retrying(what: str, fn, attempts: int = 3, first_delay: float = 0.5):
    """Call ``fn()``; transient registry errors are retried with backoff, others raise at once."""
    import time

    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            if _absent(exc) or not _transient(exc) or attempt == attempts - 1:
                redact.scrub(exc)  # MLflow's errors embed the tracking URI, password and all
                raise
            time.sleep(first_delay * 2**attempt)
    raise AssertionError("unreachable")


def find_version(tracking_uri: str, name: str, run_id: str) -> str | None:
    """The version registered from ``run_id`` (its tag), if a previous attempt made one."""
    found = retrying("find version", lambda: client(tracking_uri).search_model_versions(
        f"name = '{name}' and run_id = '{run_id}'"))
    versions = sorted(int(mv.version) for mv in found)
    return str(versions[0]) if versions else None


def register(tracking_uri: str, model_uri: str, name: str, run_id: str, tags: dict[str, str]) -> str:
    """Register the run's model once: a retry finds the version the first attempt made.

    Call it under the model's registration lock (two registrations at once collide on numbers).
    The new version gets the ``challenger`` alias.
    """
    mc = client(tracking_uri)
    existing = find_version(tracking_uri, name, run_id)
    if existing is not None:  # an earlier attempt registered it; it may have failed before the alias
        mv = retrying("read version", lambda: mc.get_model_version(name, existing))
        holder = alias_version(tracking_uri, name, CHALLENGER)
        if "voxelflow.decision" not in (mv.tags or {}) and (holder is None or int(holder) < int(existing)):
            retrying("alias", lambda: mc.set_registered_model_alias(name, CHALLENGER, existing))
        return existing
    try:
        retrying("read model", lambda: mc.get_registered_model(name))
    except Exception as exc:  # noqa: BLE001
        if not _absent(exc):
            raise
        retrying("create model", lambda: mc.create_registered_model(name))
    tags = {f"voxelflow.{k}": v for k, v in {**tags, "run_id": run_id}.items()}
    # a logged model's URI (models:/m-…) must name its model id too: an `mlflow server` refuses it otherwise
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    mv = retrying("register", lambda: mc.create_model_version(name, model_uri, run_id=run_id, tags=tags,
                                                              model_id=model_id))
    retrying("alias", lambda: mc.set_registered_model_alias(name, CHALLENGER, str(mv.version)))
    return str(mv.version)


def alias_version(tracking_uri: str, name: str, alias: str = CHAMPION) -> str | None:
    """The version behind ``name@alias``; None only when the model or the alias does not exist.

    Any other failure (registry down, a server error after retries) raises: reading "no champion"
    from an outage would promote on the absolute gate alone and lose ``previous``.
    """
    try:
        mv = retrying("read alias", lambda: client(tracking_uri).get_model_version_by_alias(name, alias))
    except Exception as exc:  # noqa: BLE001 - classified here
        if _absent(exc):
            return None
        raise RegistryError(redact.redact(f"cannot read {name}@{alias} from the registry at {tracking_uri}: {exc}")
                            ) from redact.scrub(exc)
    return str(mv.version)


def should_promote(candidate: dict[str, float], champion: dict[str, float] | None, gates: Gates,
                   candidate_cases: dict[str, dict[str, float]] | None = None,
                   champion_cases: dict[str, dict[str, float]] | None = None) -> Decision:
    """The metric gates alone (absolute and relative), as a pure function of the scores: the means
    (``candidate``, ``champion``) for the absolute gates, the per-case test scores (metric -> case ->
    value) for the relative one. The full policy, with behaviour and lineage, is :func:`policy.decide`."""
    return policy.decide(candidate, champion, gates.model_copy(update={"require_lineage": [], "flip_tolerance": None}),
                         candidate_cases=candidate_cases, champion_cases=champion_cases)


class ChampionMoved(RuntimeError):
    """``champion`` no longer points where the candidate was compared: score again, then retry."""

    def __init__(self, expected: str | None, current: str | None) -> None:
        super().__init__(f"champion moved from {expected} to {current} since the candidate was compared")
        self.expected, self.current = expected, current


def promote(tracking_uri: str, name: str, version: str, expected: str | None = None,
            check: bool = False) -> str | None:
    """Point ``champion`` at ``version``; the old champion stays reachable as ``previous``.

    With ``check``, a compare-and-set: it moves only if ``champion`` is still ``expected`` (the
    version the candidate was compared with; None for none), else raises :class:`ChampionMoved`.
    Call it under the model's registration lock so nothing moves between the read and the write.
    """
    mc = client(tracking_uri)
    old = alias_version(tracking_uri, name, CHAMPION)
    if check and old != expected:
        raise ChampionMoved(expected, old)
    if old != version:  # what the move replaces, kept on the version so that it can be undone
        tags = retrying("read version", lambda: mc.get_model_version(name, version)).tags or {}
        was = alias_version(tracking_uri, name, PREVIOUS) or "none"
        # a retry of this move keeps what its first attempt saw (``previous`` may already be ``old``);
        # the champion's tag goes last, so that its presence says both were written
        seen = tags.get(REPLACED_CHAMPION) == (old or "none") and tags.get(REPLACED_PREVIOUS) is not None and (
            was == old or tags[REPLACED_PREVIOUS] == was)
        if not seen:
            tag_version(tracking_uri, name, version, {REPLACED_PREVIOUS: was, REPLACED_CHAMPION: old or "none"})
    if old is not None and old != version:
        retrying("alias", lambda: mc.set_registered_model_alias(name, PREVIOUS, old))
    retrying("alias", lambda: mc.set_registered_model_alias(name, CHAMPION, version))
    return old


#: tags :func:`promote` leaves on the version it makes champion: what ``champion`` and ``previous`` were
REPLACED_CHAMPION, REPLACED_PREVIOUS = "voxelflow.replaced_champion", "voxelflow.replaced_previous"


def tag_version(tracking_uri: str, name: str, version: str, tags: dict[str, str]) -> None:
    mc = client(tracking_uri)
    for key, value in tags.items():
        retrying("tag", lambda k=key, v=value: mc.set_model_version_tag(name, version, k, v))


def download_model(tracking_uri: str, model_uri: str, dest: Path) -> Path:
    """Fetch a model's artifacts (``models:/name@alias`` or a run URI) into ``dest``."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dest))
    return Path(local)


def load_segmenter(tracking_uri: str, name: str, cache_dir: Path, alias: str = CHAMPION, device: str | None = None):
    """The model behind ``name@alias`` as a ready :class:`~voxelflow.learn.model.Segmenter`, and its version."""
    version = alias_version(tracking_uri, name, alias)
    if version is None:
        raise LookupError(f"model {name!r} has no {alias!r} alias yet: run the lifecycle first")
    return load_version(tracking_uri, name, version, cache_dir, device), version


def load_version(tracking_uri: str, name: str, version: str, cache_dir: Path, device: str | None = None):
    """One registered version as a ready :class:`~voxelflow.learn.model.Segmenter`."""
    from voxelflow.learn.model import Segmenter

    local = download_model(tracking_uri, f"models:/{name}/{version}", cache_dir / name / version)
    return Segmenter.from_dir(local / "artifacts", device=device)


class NoPrevious(LookupError):
    """Nothing to roll back to."""


class AuditSink(Protocol):
    """Where a registry move records itself (:class:`voxelflow.core.audit.Sink` writes the audit log): the
    registry is given one, it does not import the audit log."""

    def record(self, event: str, actor: str, anchor: str, once: dict[str, Any] | None = None,
               **details: Any) -> Any:
        """Record ``event`` once (a record matching ``once`` is a retry's), anchored on version ``anchor``."""


def revert_promotion(tracking_uri: str, db, name: str, version: str, actor: str, reason: str,
                     sink: AuditSink) -> bool:
    """Undo the promotion of ``version``: ``champion`` and ``previous`` go back to what they were
    before it (kept on the version by :func:`promote`; an alias that did not exist is removed).

    A compare-and-set under the model's lock: only while ``champion`` is still ``version``. If it has
    moved since (another promotion, a rollback), nothing is changed and that is what gets recorded.
    Either way ``sink`` records it (``model.promotion_reverted`` / ``model.promotion_not_reverted``),
    anchored on the version. Returns whether the aliases were restored.
    """
    mc = client(tracking_uri)
    with db.locked(f"register:{name}"):
        current = alias_version(tracking_uri, name, CHAMPION)
        restored = current == version
        if restored:
            tags = retrying("read version", lambda: mc.get_model_version(name, version)).tags or {}
            if REPLACED_CHAMPION not in tags or REPLACED_PREVIOUS not in tags:
                raise ValueError(f"version {version} of {name} does not say what it replaced: cannot revert it")
            before = {CHAMPION: tags[REPLACED_CHAMPION], PREVIOUS: tags[REPLACED_PREVIOUS]}
            for alias, was in before.items():
                now = version if alias == CHAMPION else alias_version(tracking_uri, name, alias)
                if was == "none" and now is not None:
                    retrying("alias", lambda a=alias: mc.delete_registered_model_alias(name, a))
                elif was not in ("none", now):
                    retrying("alias", lambda a=alias, v=was: mc.set_registered_model_alias(name, a, v))
            tag_version(tracking_uri, name, version, {"voxelflow.decision": "reverted",
                                                      "voxelflow.reverted": reason[:5000]})
    if restored:
        sink.record("model.promotion_reverted", actor, version, model=name, version=version,
                             champion=None if before[CHAMPION] == "none" else before[CHAMPION],
                             previous=None if before[PREVIOUS] == "none" else before[PREVIOUS], reason=reason)
    else:
        sink.record("model.promotion_not_reverted", actor, version, model=name, version=version, champion=current,
                    reason=f"{reason} (champion is now {current or 'unset'}: left as it is)")
    return restored


#: tags of a rollback: on the restored version, the operation and the champion it replaced (the pair
#: it moved from is (that champion, this version)); on the replaced version, the operation again
ROLLBACK_OPERATION, ROLLBACK_REPLACED = "voxelflow.rollback.operation", "voxelflow.rollback.replaced"
ROLLED_BACK, ROLLED_BACK_OPERATION = "voxelflow.rolled_back", "voxelflow.rolled_back.operation"


class AliasesMoved(RuntimeError):
    """``champion`` and ``previous`` are no longer the pair a rollback set out to move: nothing changed."""


def rollback(tracking_uri: str, db, name: str, actor: str, sink: AuditSink, reason: str = "",
             operation: str | None = None, expected: tuple[str | None, str | None] | None = None) -> tuple[str, str]:
    """Move ``champion`` back to ``previous``, under the model's lock; returns (restored, replaced).

    A compare-and-set on the pair (``champion``, ``previous``): with ``expected`` it moves only from
    that pair, else :class:`AliasesMoved`. ``operation`` (a fresh id when None) is tagged on both
    versions and kept in the audit record, so a retry with the same id recognises its own rollback,
    finished or cut off between writes, and completes it exactly as one clean run would.
    ``previous`` is then removed and the replaced version tagged ``voxelflow.rolled_back``, so a second
    rollback has nothing to go back to until the next promotion. ``sink`` records the move (once per
    operation), anchored on the restored version. A running service follows ``champion``.
    """
    import re
    import uuid

    op = operation or uuid.uuid4().hex
    if not re.fullmatch(r"[A-Za-z0-9._:-]{1,200}", op):
        raise ValueError(f"a rollback's operation id is letters, digits and ._:- (at most 200), not {op!r}")
    mc = client(tracking_uri)
    with db.locked(f"register:{name}"):
        current = alias_version(tracking_uri, name, CHAMPION)
        previous = alias_version(tracking_uri, name, PREVIOUS)
        started = retrying("find rollback", lambda: mc.search_model_versions(
            f"name = '{name}' and tags.`{ROLLBACK_OPERATION}` = '{op}'"))
        if not started and current is not None and current == previous:  # only a rollback cut off leaves this
            mv = retrying("read version", lambda: mc.get_model_version(name, current))
            if ROLLBACK_OPERATION in (mv.tags or {}):  # complete that one, whatever id this call was given
                started, op = [mv], mv.tags[ROLLBACK_OPERATION]
        if started:  # an earlier attempt of this operation tagged its target: the pair it moved from
            target, replaced = str(started[0].version), started[0].tags[ROLLBACK_REPLACED]
            pair = (None if replaced == "none" else replaced, target)
            if (current, previous) not in (pair, (target, target), (target, None)):
                raise AliasesMoved(f"rollback {op} of {name} set out from champion {pair[0]}, previous {target}; they "
                                   f"are now {current}, {previous}: changed since, left as they are")
            current = pair[0]
        else:
            if expected is not None and (current, previous) != expected:
                raise AliasesMoved(f"{name}: champion {current}, previous {previous}, not {expected[0]}, "
                                   f"{expected[1]} as the rollback expected: nothing changed")
            if previous is None:
                raise NoPrevious(f"model {name!r} has no 'previous' version to roll back to"
                                 + (f" (champion is version {current})" if current else " (and no champion)"))
            target = previous
            tag_version(tracking_uri, name, target, {ROLLBACK_REPLACED: current or "none", ROLLBACK_OPERATION: op})
        if alias_version(tracking_uri, name, CHAMPION) != target:
            retrying("alias", lambda: mc.set_registered_model_alias(name, CHAMPION, target))
        if alias_version(tracking_uri, name, PREVIOUS) is not None:
            retrying("alias", lambda: mc.delete_registered_model_alias(name, PREVIOUS))
        if current is not None:
            tag_version(tracking_uri, name, current, {ROLLED_BACK: f"replaced by {target}: {reason}"[:5000],
                                                      ROLLED_BACK_OPERATION: op})
    sink.record("model.rolled_back", actor, target, once={"model": name, "operation": op}, model=name,
                version=target, replaced=current, reason=reason, operation=op)
    return target, current or ""
