"""The pipeline spec (the DSL): :class:`PipelineSpec`, read and validated by :func:`load_spec`.

A spec is one YAML file validated by :class:`PipelineSpec`; overlays are merged
over it key by key. Secrets and endpoints never live in the spec: they come
from :class:`Settings` (``VOXELFLOW_*`` environment variables). The stage sections
live in :mod:`voxelflow.spec.sections`, the components they name in
:mod:`voxelflow.spec.components`; both are importable from here too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator

from voxelflow.core.settings import Settings
from voxelflow.spec import checked
from voxelflow.spec.candidates import Candidate, CandidatesSpec
from voxelflow.spec.components import (
    Component,
    Components,
    SpecError,
    allowed_imports,
    component_kind,
    lookup,
    resolve_callable,
    resolve_monai,
    takes_pair,
)
from voxelflow.spec.labels import LabelSpec, labels_problem
from voxelflow.spec.migrations import SpecMigrated, migrate
from voxelflow.spec.sections import (
    BUILTIN_METRICS,
    Adaptive,
    Autoscale,
    CustomMetric,
    DataSpec,
    DeploySpec,
    EvaluateSpec,
    Gates,
    KubernetesDeploy,
    PreprocessSpec,
    PromoteSpec,
    SlidingWindow,
    TrainSpec,
    _Section,
    metric_names,
    sides_problem,
)
from voxelflow.spec.step_spec import WORK_POOL, StepSpec, ValueAtKey
from voxelflow.spec.triggers import Triggers, move_retrain_after

__all__ = [  # what this module exported before the sections and components moved out: importable from here still
    "BUILTIN_METRICS", "LATER_KEYS", "WORK_POOL", "Adaptive", "Autoscale", "Component", "Components", "CustomMetric",
    "DataSpec", "DeploySpec", "EvaluateSpec", "Gates", "KubernetesDeploy", "PipelineSpec", "PreprocessSpec",
    "PromoteSpec", "Settings", "SlidingWindow", "SpecError", "SpecMigrated", "StepSpec", "TrainSpec", "ValueAtKey",
    "allowed_imports", "component_kind", "deep_merge", "load_spec", "lookup", "metric_names", "parse_set",
    "resolve_callable", "resolve_monai", "sides_problem", "takes_pair", "validate_spec",
]

log = logging.getLogger(__name__)

# Keys added to the spec after its digests were first recorded: at these defaults they are left out of the digest,
# so a spec that does not use them keeps the digest its earlier runs recorded in lineage.
LATER_KEYS: list[tuple[str, str, Any]] = [("evaluate", "postprocess", []), ("train", "collective_timeout_s", 300),
                                         ("train", "deterministic", False), ("data", "accept", None),
                                         ("train", "max_seconds", None)]


class PipelineSpec(_Section):
    """One lifecycle: each stage reads only its own section; ``steps`` adds the user's own."""

    version: Literal[1] = Field(1, description="the spec format's version; an older spec (or one without it) is "
                                "migrated when it loads, with a warning naming each change")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="the pipeline's name: its dataset, "
                      "store folder, events and deployments are named by it")
    data: DataSpec = Field(description="the ingest step: where the data arrives and how it is read")
    preprocess: PreprocessSpec = Field(description="the preprocess step: deterministic transforms, run on Dask")
    train: TrainSpec = Field(description="the train step: network, loss, optimizer, augmentation, devices")
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec, description="the evaluate step: metrics and "
                                   "the test, validation and training sides")
    promote: PromoteSpec = Field(description="the promote step: the registered model, its gates and approval")
    deploy: DeploySpec = Field(default_factory=DeploySpec, description="the deploy step: where the champion is "
                               "served")
    triggers: Triggers = Field(default_factory=Triggers, description="what starts the pipeline's runs (a schedule, "
                               "arriving data, a grown dataset, unlabelled cases): voxelflow up SPEC makes the "
                               "deployments; not part of the spec's digest")
    work_pool: str | None = Field(None, pattern=WORK_POOL, description="the work pool voxelflow up deploys the "
                                  "pipeline's lifecycle, ingest and prediction to (--pool overrides it); unset: "
                                  "voxelflow-process", examples=["cpu"])
    steps: list[StepSpec] = Field(default_factory=list, description="the user's own steps, each a function run "
                                  "after a built-in or own step, checked against its signature at load")
    candidates: CandidatesSpec | None = Field(None, description="several candidates trained from this spec, each "
                                              "with its overrides; the best on the validation cases by "
                                              "select.metric is the challenger")
    _candidates: list[Candidate] = PrivateAttr(default_factory=list)
    labels: dict[int, LabelSpec] = Field(default_factory=dict, description="class index -> its name and codes, "
                                         "for DICOM results (segments of a DICOM Segmentation); a class without "
                                         "one is named 'class N'", examples=[{1: {"name": "spleen"}}])

    @model_validator(mode="before")
    @classmethod
    def _retrain_after_moved(cls, data: Any) -> Any:
        # data.retrain_after is triggers.dataset_updated.min_new_cases now: moved, with a warning
        if isinstance(data, dict) and isinstance(data.get("data"), dict) and "retrain_after" in data["data"]:
            import copy
            import warnings

            data = copy.deepcopy(data)
            for change in move_retrain_after(data):
                warnings.warn(SpecMigrated(change), stacklevel=2)
        return data

    @field_validator("steps")
    @classmethod
    def _unique_ids(cls, value: list[StepSpec]) -> list[StepSpec]:
        first: dict[str, int] = {}
        for i, step in enumerate(value):
            if step.id in first:
                raise ValueAtKey(f"{i}.id", f"{step.id!r} is the id of steps.{first[step.id]} too; ids are unique")
            first[step.id] = i
        return value

    @model_validator(mode="after")
    def _gates_use_computed_metrics(self) -> PipelineSpec:
        # a gate on a metric the spec does not compute could never pass: nothing would ever be promoted
        gates = self.promote.gates
        own = {f"{s.id}.{m}" for s in self.steps for m in s.higher_is_better}
        for metric in gates.absolute:
            sid, dot, name = metric.partition(".")
            if dot and metric not in own:
                known = [s.id for s in self.steps]
                why = (f"steps.{known.index(sid)}.higher_is_better does not declare {name!r}, so the gate has no "
                       "direction" if sid in known else f"there is no step {sid!r} in steps")
                raise ValueError(f"promote.gates.absolute names the step metric '{metric}', but {why}")
        for metric, gate in gates.metrics().items():
            if "." in metric:  # a step's metric: checked above
                continue
            if metric not in self.evaluate.metrics:
                raise ValueError(
                    f"promote.gates ({gate}) need the metric '{metric}', but evaluate.metrics is "
                    f"{self.evaluate.metrics}: add {metric} to evaluate.metrics"
                )
        computed = self.computed_metrics()
        for metric, gate in [*((m, f"absolute.{m}") for m in gates.absolute if m not in own),
                             (gates.relative_metric, "relative_metric")]:
            if metric not in computed:
                raise ValueError(f"promote.gates.{gate} names the metric '{metric}', which evaluation does not "
                                 f"compute for this network's classes; computed: {computed}")
        return self

    @model_validator(mode="after")
    def _labels_fit_network(self) -> PipelineSpec:
        out_channels = int(next(iter(self.train.network.values())).get("out_channels", 2))
        problem = labels_problem(self.labels, out_channels)
        if problem:
            raise ValueAtKey(f"labels.{problem[0]}", problem[1])
        return self

    @model_validator(mode="after")
    def _window_and_batches(self) -> PipelineSpec:
        if self.roi_size() is None:
            raise ValueError("evaluate.sliding_window.roi_size is needed: neither train.augment samples patches "
                             "nor preprocess.transforms fix a size")
        if self.preprocess.spatial_size is None and self.train.patch_size is None and self.train.batch_size > 1:
            raise ValueError("preprocessed cases keep their own shapes, so a batch of several needs patches: add "
                             "a patch sampler (RandCropByPosNegLabeld, RandSpatialCropSamplesd) to train.augment, "
                             "or set train.batch_size: 1")
        return self

    @model_validator(mode="after")
    def _graph(self) -> PipelineSpec:
        # last: the graph of built-in and own steps (unknown ids, cycles, what each when reads, step gates)
        from voxelflow.spec import graph

        try:
            graph.build(self)
        except ValueError as exc:
            key, sep, message = str(exc).partition(": ")
            if sep and re.fullmatch(r"[a-z_]+(\.[A-Za-z0-9_]+)*", key):
                raise ValueAtKey(key, message) from None
            raise
        return self

    @model_validator(mode="after")
    def _expand_candidates(self) -> PipelineSpec:
        # after the graph: every candidate is this spec with its overrides, validated in full
        if self.candidates is not None:
            from voxelflow.spec import candidates

            self._candidates = candidates.expand(self, PipelineSpec.model_validate)
        return self

    def candidate_specs(self) -> list[Candidate]:
        """Each candidate: its index, its overrides and its spec (this spec with them, without candidates)."""
        return list(self._candidates)

    def step_directions(self) -> dict[str, bool]:
        """The own steps' metrics a gate may read -> True when higher is better (``{"qc.outliers": False}``)."""
        return {f"{s.id}.{m}": higher for s in self.steps for m, higher in s.higher_is_better.items()}

    def roi_size(self) -> tuple[int, ...] | None:
        """The sliding window: as set, else the training patch, else the preprocessed size."""
        window = self.evaluate.sliding_window.roi_size
        return tuple(window) if window else (self.train.patch_size or self.preprocess.spatial_size)

    def computed_metrics(self) -> list[str]:
        """The metric names evaluation reports for this spec (``dice``, ``dice_1``, ``hausdorff95``, ...)."""
        out_channels = next(iter(self.train.network.values())).get("out_channels", 2)
        return metric_names(self.evaluate.metrics, int(out_channels))

    def digest(self) -> str:
        """A stable hash of the spec, for lineage (a spec without steps hashes as it did before they existed)."""
        dumped = self.model_dump(mode="json", by_alias=True)
        if not dumped["steps"]:
            del dumped["steps"]
        if dumped.get("candidates") is None:  # a spec without candidates hashes as before they existed
            dumped.pop("candidates", None)
        if not dumped["labels"]:  # added later: a spec without labels hashes as it did before them
            del dumped["labels"]
        if dumped["version"] == 1:
            del dumped["version"]
        del dumped["triggers"], dumped["work_pool"]  # how it runs, not what it computes
        dumped["data"]["retrain_after"] = self.triggers.min_new_cases()  # hashed where it was before it moved
        for section, key, default in LATER_KEYS:  # keys added later, at their defaults: hashed as before them
            if dumped[section].get(key) == default:
                del dumped[section][key]
        blob = json.dumps(dumped, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Merge ``over`` into a copy of ``base``: mappings merge, anything else replaces.

    A mapping over a list changes elements of the list instead of replacing it: keyed by index
    (``1:`` or ``"-1":``) or by the name of a one-key element (``Spacingd:``, a transform's name).
    """
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        elif isinstance(value, dict) and isinstance(out.get(key), list):
            out[key] = _merge_into_list(out[key], value, key)
        else:
            out[key] = value
    return out


def _merge_into_list(items: list[Any], over: dict[Any, Any], where: str) -> list[Any]:
    items = list(items)
    names = [next(iter(i)) if isinstance(i, dict) and len(i) == 1 else None for i in items]
    for key, value in over.items():
        if isinstance(key, int) or (isinstance(key, str) and key.lstrip("-").isdigit()):
            index = int(key)
            if not -len(items) <= index < len(items):
                raise SpecError(f"{where}[{index}]: the list has {len(items)} elements")
        elif names.count(key) == 1:
            index = names.index(key)
        else:
            raise SpecError(f"{where}: no single element named {key!r} to change (elements: "
                            f"{[n for n in names if n]}); give an index instead")
        current = items[index]
        if isinstance(value, dict) and isinstance(current, dict):
            if isinstance(key, str) and not key.lstrip("-").isdigit():  # by name: merge into its arguments
                value = {key: value}
            items[index] = deep_merge(current, value)
        else:
            items[index] = value
    return items


def parse_set(expr: str) -> dict[str, Any]:
    """Turn ``train.epochs=3`` into ``{"train": {"epochs": 3}}``; the value is read as YAML."""
    path, sep, raw = expr.partition("=")
    if not sep or not path.strip():
        raise SpecError(f"--set {expr!r}: expected key.path=value")
    value = yaml.safe_load(raw) if raw.strip() else None
    out: dict[str, Any] = value
    for key in reversed(path.strip().split(".")):
        out = {key: out}
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"{path}: cannot read spec ({exc.strerror or exc})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _explain(source: str, exc: ValidationError) -> SpecError:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        below = (err.get("ctx") or {}).get("error")
        if isinstance(below, ValueAtKey):  # the validator names a key below the one it checked
            loc += below.key.split(".")
        key = ".".join(loc) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (not part of the spec)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"{source}: {key}: {msg}")
    return SpecError("\n".join(lines))


def validate_spec(data: dict[str, Any], source: str = "<spec>") -> PipelineSpec:
    """Migrate ``data`` to this voxelflow's spec version (a :class:`SpecMigrated` warning per change) and
    validate it."""
    import warnings

    data, changes = migrate(data, source)
    for change in changes:
        warnings.warn(SpecMigrated(change), stacklevel=2)
    home, digest = Settings().root, checked.key(data, allowed_imports())
    moving = isinstance(data.get("data"), dict) and "retrain_after" in data["data"]  # its warning comes from the check
    kept = None if moving else checked.read(home, digest)
    if kept is not None:  # validated in full before, by the same code and packages: no component imports
        try:
            with checked.trusted():
                return PipelineSpec.model_validate(kept)
        except (checked.NotKept, ValidationError, ValueError) as exc:
            log.warning("a kept spec no longer validates (%s): checking %s in full", str(exc).splitlines()[0], source)
            checked.drop(home, digest)
    try:
        with checked.watching() as named:
            spec = PipelineSpec.model_validate(data)
    except ValidationError as exc:
        raise _explain(source, exc) from None
    if named <= set(checked.KEPT) and not moving:
        checked.write(home, digest, spec.model_dump(mode="json", by_alias=True))
    return spec


def load_spec(
    path: str | Path, overlays: list[str | Path] | None = None, sets: list[str] | None = None
) -> PipelineSpec:
    """Read a spec, merge overlays (files) and ``key.path=value`` settings over it, validate."""
    path = Path(path)
    data = _read_yaml(path)
    sources = [str(path)]
    for overlay in overlays or []:
        data = deep_merge(data, _read_yaml(Path(overlay)))
        sources.append(str(overlay))
    for expr in sets or []:
        data = deep_merge(data, parse_set(expr))
        sources.append(f"--set {expr}")
    return validate_spec(data, " + ".join(sources))
