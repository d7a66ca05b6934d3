"""The pipeline spec (the DSL) and the settings that say where things live.

A spec is one YAML file validated by :class:`PipelineSpec`; overlays are merged
over it key by key. Secrets and endpoints never live in the spec: they come
from :class:`Settings` (``VOXELFLOW_*`` environment variables).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from voxelflow.spec.step_spec import WORK_POOL, StepSpec, ValueAtKey


class SpecError(ValueError):
    """A spec that cannot be used; the message names the file, the key and what was expected."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Stage(_Section):
    work_pool: str | None = Field(
        None,
        pattern=WORK_POOL,
        description="run this stage as its own flow run on this work pool (deployment STAGE/WORK_POOL); "
        "unset: in the lifecycle's own process", examples=["gpu"],
    )


def _single_key(item: Any, what: str) -> tuple[str, dict[str, Any]]:
    if isinstance(item, str):
        return item, {}
    if isinstance(item, dict) and len(item) == 1:
        name, kwargs = next(iter(item.items()))
        if kwargs is None:
            kwargs = {}
        if not isinstance(kwargs, dict):
            raise ValueError(f"the arguments of {what} {name!r} must be a mapping, got {type(kwargs).__name__}")
        return str(name), kwargs
    raise ValueError(f"each {what} must be a name or a one-key mapping {{Name: {{arg: value}}}}, got {item!r}")


def _check_kwargs(target: Any, name: str, kwargs: dict[str, Any], what: str) -> None:
    """Refuse keyword arguments that ``target`` (a class's constructor, or a function) does not take."""
    try:
        params = inspect.signature(target.__init__ if inspect.isclass(target) else target).parameters
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check before it runs
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(kwargs) - set(params) - {"self"})
    if unknown:
        allowed = ", ".join(p for p in params if p not in ("self", "args", "kwargs"))
        raise ValueError(f"{what} {name!r} has no argument {', '.join(unknown)}; it takes: {allowed}")


def _loosen(annotation: Any) -> Any:
    """An annotation a YAML value can be checked against: tensors as numbers or lists, other classes as Any."""
    import types
    import typing

    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.Union[tuple(_loosen(a) for a in typing.get_args(annotation))]  # noqa: UP007
    if inspect.isclass(annotation) and typing.get_origin(annotation) is None:
        if annotation.__name__ == "Tensor" and annotation.__module__.startswith("torch"):
            return typing.Union[list, float, int]  # noqa: UP007
        if annotation.__module__ != "builtins":
            return Any
    return annotation


def _check_types(fn: Any, name: str, kwargs: dict[str, Any], what: str) -> None:
    """Refuse an argument whose value cannot be what ``fn``'s signature annotates (``channels: "abc"``)."""
    import typing

    from pydantic import TypeAdapter

    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - annotations that do not resolve cannot be checked
        return
    for key, value in kwargs.items():
        if key not in hints:
            continue
        try:
            adapter = TypeAdapter(_loosen(hints[key]), config=ConfigDict(arbitrary_types_allowed=True))
        except Exception:  # noqa: BLE001 - an annotation pydantic cannot model is left to the class itself
            continue
        try:
            adapter.validate_python(value)
        except ValidationError as exc:
            raise ValueError(f"{what} {name!r}: argument {key!r} = {value!r} does not fit {hints[key]} "
                             f"({exc.errors()[0]['msg']})") from None


def _torch_component(value: Any, module: str, what: str, supplied: set[str]) -> dict[str, dict[str, Any]]:
    """A torch optimizer / LR scheduler by name: arguments known, typed, required ones given."""
    name, kwargs = _single_key(value, what)
    cls = resolve_monai(module, name, what, allowed_imports())
    params = inspect.signature(cls.__init__).parameters
    given = sorted(set(kwargs) & supplied)
    if given:
        raise ValueError(f"{what} {name!r}: {', '.join(given)} is supplied by training, not by the spec")
    _check_kwargs(cls, name, kwargs, what)
    missing = [p for p, v in params.items() if p not in ("self", *supplied) and v.default is inspect.Parameter.empty
               and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD) and p not in kwargs]
    if missing:
        raise ValueError(f"{what} {name!r} needs the argument(s) {', '.join(missing)}")
    _check_types(cls.__init__, name, kwargs, what)
    return {name: kwargs}


def allowed_imports() -> tuple[str, ...]:
    """The packages a spec's components may come from: ``VOXELFLOW_ALLOWED_IMPORTS``, read at each call."""
    return tuple(p.strip() for p in Settings().allowed_imports.split(",") if p.strip())


def _within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _origin(obj: Any) -> str:
    """The module an object was defined in (not the one it was imported from)."""
    module = getattr(obj, "__module__", None)
    return module if isinstance(module, str) and module else type(obj).__module__


def _refuse_origin(name: str, obj: Any, what: str, allowed: tuple[str, ...]) -> None:
    origin = _origin(obj)
    if not _within(origin, allowed):
        raise ValueError(f"{what} {name!r} is defined in {origin!r}, which is not among the allowed imports "
                         f"(VOXELFLOW_ALLOWED_IMPORTS={','.join(allowed)}): a re-export does not make it allowed")


def lookup(module: str | None, name: str, what: str, allowed: tuple[str, ...] | None = None) -> Any:
    """A name in ``module`` (a MONAI or torch module of voxelflow's), or an import path
    ``package.module:name``. With ``allowed`` (a spec being validated), an import path must name one of
    those packages, checked before anything is imported, and the object must be defined in one of them
    (or, for a bare name, in ``module``'s package)."""
    import importlib

    if ":" in name or module is None:
        path, sep, attr = name.partition(":")
        if not sep or not path or not attr:
            raise ValueError(f"{what} {name!r}: expected an import path package.module:name")
        if allowed is not None and not _within(path, allowed):
            raise ValueError(f"{what} {name!r}: the package {path.split('.')[0]!r} is not among the allowed imports "
                             f"(VOXELFLOW_ALLOWED_IMPORTS={','.join(allowed)}); add it there to use its components")
        try:
            mod = importlib.import_module(path)
        except ImportError as exc:
            raise ValueError(f"{what} {name!r}: cannot import {path!r} ({exc})") from None
        obj = getattr(mod, attr, None)
        if obj is None:
            raise ValueError(f"{what} {name!r}: {path!r} has no function or class {attr!r}")
    else:
        obj = getattr(importlib.import_module(module), name, None)
        if obj is None:
            raise ValueError(f"unknown {what} {name!r}: expected a class in {module} or an import path "
                             "package.module:Class")
        allowed = None if allowed is None else (*allowed, module.split(".")[0])
    if allowed is not None:
        _refuse_origin(name, obj, what, allowed)
    return obj


def _own_call(cls: type) -> Any:
    """``cls.__call__`` as the class defines it (not the metaclass's, which every class has)."""
    return next((vars(k)["__call__"] for k in cls.__mro__ if "__call__" in vars(k)), None)


def takes_pair(fn: Any, skip_self: bool = False) -> bool:
    """Whether ``fn`` can be called with two positional arguments (``input, target`` / ``y_pred, y``)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    if skip_self:
        params = params[1:]
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    return len([p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]) >= 2


def component_kind(kind: str, obj: Any) -> str | None:
    """Why ``obj`` cannot be used as a ``kind`` (network, loss, optimizer, scheduler, transform, metric),
    or None when it can."""
    if kind == "metric":
        if inspect.isclass(obj):
            call = _own_call(obj)
            return None if call is not None and takes_pair(call, skip_self=True) else \
                "is not a metric: its instances must be called as metric(y_pred, y)"
        if inspect.isfunction(obj) or inspect.ismethod(obj) or (callable(obj) and _own_call(type(obj))):
            return None if takes_pair(obj) else "must take (y_pred, y) as its first two arguments"
        return "is not a metric function or class"
    if not inspect.isclass(obj):
        return f"is not a class (a {kind} is a class)"
    import torch

    if kind == "network":
        return None if issubclass(obj, torch.nn.Module) else "is not a network: not a torch.nn.Module subclass"
    if kind == "loss":
        call = obj.forward if issubclass(obj, torch.nn.Module) else _own_call(obj)
        return None if call is not None and takes_pair(call, skip_self=True) else \
            "is not a loss: a torch.nn.Module (or a class) called as loss(input, target)"
    if kind == "optimizer":
        return None if issubclass(obj, torch.optim.Optimizer) else "is not a torch.optim.Optimizer subclass"
    if kind == "scheduler":
        return None if issubclass(obj, torch.optim.lr_scheduler.LRScheduler) else \
            "is not a torch.optim.lr_scheduler.LRScheduler subclass"
    if kind == "transform":
        from monai.transforms import Transform

        return None if issubclass(obj, Transform) else "is not a MONAI transform (monai.transforms.Transform)"
    raise ValueError(f"unknown component kind {kind!r}")


def resolve_monai(module: str, name: str, what: str, allowed: tuple[str, ...] | None = None) -> type:
    """A ``what`` (network, loss, optimizer, scheduler, transform) by name in a MONAI (or torch)
    module, or by import path ``package.module:Class`` for a user's own component; it must be that
    kind of class. With ``allowed``, only from those packages (see :func:`lookup`)."""
    cls = lookup(module, name, what, allowed)
    why = component_kind(what, cls)
    if why:
        raise ValueError(f"{what} {name!r} {why}")
    return cls


def _dict_transforms(value: Any, what: str, random: bool) -> list[dict[str, dict[str, Any]]]:
    """A list of MONAI dictionary transforms by name, checked: known, dictionary form, arguments known
    and typed, ``keys`` given; deterministic ones only (``random=False``) or random ones only."""
    from monai.transforms import MapTransform, Randomizable

    if not isinstance(value, list):
        raise ValueError(f"expected a list of MONAI dictionary transforms ({what})")
    out = []
    for item in value:
        name, kwargs = _single_key(item, "transform")
        cls = resolve_monai("monai.transforms", name, "transform", allowed_imports())
        if not issubclass(cls, MapTransform):
            raise ValueError(
                f"transform {name!r} is not a MONAI dictionary transform: use its dictionary form (e.g. {name}d)"
            )
        if random and not issubclass(cls, Randomizable):
            raise ValueError(f"train.augment takes random transforms; {name!r} is deterministic: put it in "
                             "preprocess.transforms, which run once per case and are stored")
        if not random and issubclass(cls, Randomizable):
            raise ValueError(f"transform {name!r} is random: preprocessing runs once and is stored, so random "
                             "transforms (augmentation, patch sampling) belong in train.augment")
        _check_kwargs(cls, name, kwargs, "transform")
        _check_types(cls.__init__, name, kwargs, "transform")
        if "keys" not in kwargs:
            raise ValueError(f"transform {name!r} needs 'keys' (image, label or both)")
        out.append({name: kwargs})
    return out


def _mask_transforms(value: Any, what: str) -> list[dict[str, dict[str, Any]]]:
    """A list of MONAI array transforms (by name in monai.transforms, or ``package.module:Class``) applied to
    the label map: known, array form, deterministic, arguments known, typed and the required ones given."""
    from monai.transforms import MapTransform, Randomizable

    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"expected a list of MONAI array transforms ({what})")
    out = []
    for item in value:
        name, kwargs = _single_key(item, "transform")
        cls = resolve_monai("monai.transforms", name, "transform", allowed_imports())
        if issubclass(cls, MapTransform):
            plain = name[:-1] if name.endswith("d") and ":" not in name else None
            raise ValueError(f"transform {name!r} is a dictionary transform; the mask takes array transforms"
                             + (f" ({plain})" if plain else ""))
        if issubclass(cls, Randomizable):
            raise ValueError(f"transform {name!r} is random; post-processing must give every caller the same mask")
        _check_kwargs(cls, name, kwargs, "transform")
        params = inspect.signature(cls.__init__).parameters
        missing = [p for p, v in params.items() if p != "self" and v.default is inspect.Parameter.empty
                   and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD) and p not in kwargs]
        if missing:
            raise ValueError(f"transform {name!r} needs the argument(s) {', '.join(missing)}")
        _check_types(cls.__init__, name, kwargs, "transform")
        out.append({name: kwargs})
    return out


_COMPONENT = {"anyOf": [
    {"type": "string", "description": "a name (its arguments default)"},
    {"type": "object", "minProperties": 1, "maxProperties": 1, "description": "Name: {argument: value}",
     "additionalProperties": {"anyOf": [{"type": "object"}, {"type": "null"}]}},
]}
# what a YAML spec may write for a component (validators accept a bare name too); validated Python holds a mapping
Component = Annotated[dict[str, dict[str, Any]], WithJsonSchema(_COMPONENT)]
Components = Annotated[list[dict[str, dict[str, Any]]], WithJsonSchema({"type": "array", "items": _COMPONENT})]


class DataSpec(_Stage):
    source: str = Field(description="fsspec URL of the incoming data; '{home}' expands to VOXELFLOW_HOME")
    layout: Literal["decathlon", "folder", "dicom", "mixed"] = Field(
        "decathlon", description="decathlon (dataset.json), folder (one folder per case), dicom (any tree, by series) "
        "or mixed (what dataset.json names, if there is one, and every other file as DICOM)"
    )
    max_voxels: int = Field(512**3, gt=0, description="cases larger than this are quarantined")
    max_series_files: int = Field(4096, gt=0, description="DICOM series of more objects than this are quarantined "
                                  "too-large from their headers, before any pixel is fetched")
    retrain_after: int = Field(1, ge=1, description="an ingest after which the labelled dataset holds this many "
                               "cases not in the last announced one (new, or replacing others) emits "
                               "voxelflow.dataset.updated (which the lifecycle's on-update deployment is "
                               "triggered by)")
    deidentify: Literal["basic-profile", "none"] = Field(
        "basic-profile", description="basic-profile: DICOM is de-identified (PS3.15 Annex E basic profile, keyed UIDs) "
        "before anything is stored; none: DICOM is kept as it arrived (needs deidentify_acknowledged; warns every run)")
    deidentify_acknowledged: str | None = Field(
        None, description="with deidentify: none, a statement that the data is already de-identified or that "
        "consent covers it (recorded in the audit log at every ingest)",
        examples=["exported de-identified by the hospital's PACS gateway (DPA 2024-17)"])

    @property
    def needs_deid_key(self) -> bool:
        """Whether an ingest may meet DICOM to de-identify (and so needs the UID remapping key)."""
        return self.layout in ("dicom", "mixed") and self.deidentify != "none"

    @model_validator(mode="after")
    def _acknowledged(self) -> DataSpec:
        ack = (self.deidentify_acknowledged or "").strip()
        if self.deidentify == "none" and not ack:
            raise ValueError("deidentify: none turns DICOM de-identification off and needs deidentify_acknowledged: "
                             "a statement that the data is already de-identified or that consent covers it")
        if self.deidentify != "none" and self.deidentify_acknowledged is not None:
            raise ValueError("deidentify_acknowledged applies only with deidentify: none (de-identification is on)")
        return self


class Adaptive(_Section):
    minimum: int = Field(1, ge=0, description="fewest Dask workers the started cluster scales down to")
    maximum: int = Field(4, ge=1, description="most Dask workers it scales up to (on cuda, never more than GPUs)")

    @model_validator(mode="after")
    def _order(self) -> Adaptive:
        if self.maximum < self.minimum:
            raise ValueError("maximum must be at least minimum")
        return self


class PreprocessSpec(_Stage):
    transforms: Components = Field(
        min_length=1, description="MONAI dictionary transforms (by name or import path package.module:Class) "
        "applied in order, once per case, and stored; deterministic only, each with its keys"
    )
    shard_size: int = Field(8, ge=1, description="cases per Dask task")
    cluster: str = Field("auto", description="auto (a local cluster, on GPUs when device is cuda; the "
                         "VOXELFLOW_DASK_SCHEDULER cluster when set) | local | cuda | tcp://scheduler:8786")
    device: Literal["cpu", "cuda"] = Field(
        "cpu", description="where the transforms run; cuda: on the workers' GPUs (LocalCUDACluster under auto)"
    )
    adaptive: Adaptive | None = Field(
        None, description="scale a cluster voxelflow starts between minimum and maximum workers"
    )

    @field_validator("transforms", mode="before")
    @classmethod
    def _normalise(cls, value: Any) -> list[dict[str, dict[str, Any]]]:
        if not isinstance(value, list) or not value:
            raise ValueError("expected a non-empty list of MONAI dictionary transforms")
        return _dict_transforms(value, "preprocess.transforms", random=False)

    @field_validator("cluster")
    @classmethod
    def _cluster(cls, value: str) -> str:
        if value in ("auto", "local", "cuda") or value.startswith(("tcp://", "tls://")):
            return value
        raise ValueError("expected auto, local, cuda or a scheduler address tcp://host:port")

    @property
    def spatial_size(self) -> tuple[int, ...] | None:
        """The fixed output size, from the last transform that sets one."""
        size = None
        for item in self.transforms:
            for kwargs in item.values():
                if "spatial_size" in kwargs:
                    size = tuple(int(s) for s in kwargs["spatial_size"])
        return size


class TrainSpec(_Stage):
    network: Component = Field(description="a MONAI network (monai.networks.nets) by name, or a torch.nn.Module "
                               "by import path package.module:Class, with its constructor's arguments")
    loss: Component = Field(
        default_factory=lambda: {"DiceCELoss": {}},
        validate_default=True,  # the validator below fills in the Dice-family defaults
        description="a MONAI loss by name; Dice-family losses default to to_onehot_y and softmax",
    )
    epochs: int = Field(50, ge=1, description="passes over the training side (fewer with patience)")
    batch_size: int = Field(2, ge=1, description="cases per optimizer step (each giving num_samples patches when "
                            "augment samples patches)")
    learning_rate: float = Field(1e-3, gt=0, description="the optimizer's lr unless optimizer sets its own")
    optimizer: Component = Field(
        default_factory=lambda: {"Adam": {}}, validate_default=True,
        description="a torch.optim optimizer by name with its arguments; lr defaults to learning_rate")
    scheduler: Component | None = Field(
        None, description="a torch.optim.lr_scheduler by name with its arguments, stepped once per epoch; "
        "null: a constant learning rate", examples=[{"CosineAnnealingLR": {"T_max": 50}}])
    precision: Literal["auto", "fp32", "bf16-mixed", "fp16-mixed"] = Field(
        "auto", description="auto: bf16-mixed on a GPU with bf16 (else fp16-mixed), fp32 on a CPU, whose bf16 "
        "convolutions are emulated and slow; fp16-mixed needs a CUDA device (with a GradScaler), the CPU refuses it")
    checkpoint_every_steps: int = Field(50, ge=1, description="save a checkpoint (training resumes from the "
                                        "last one) every this many optimizer steps, and at the end")
    seed: int = Field(0, description="initial weights, data order and augmentation; never the split")
    augment: Components = Field(
        default_factory=list, description="MONAI random dictionary transforms by name, applied to each training "
        "case as it is drawn: augmentation and patch sampling (RandCropByPosNegLabeld, RandSpatialCropSamplesd; "
        "num_samples patches per case, so a step sees batch_size x num_samples patches)")
    cache_mb: int = Field(2048, ge=0, description="memory for preprocessed training and validation cases held "
                          "between epochs (on the GPU when training runs there); cases beyond it are read from "
                          "the store each time they are drawn")
    workers: int = Field(0, ge=0, description="DataLoader worker processes that read and augment cases ahead of "
                         "the step; 0: in the training process (a thread-buffered loader)")
    val_every: int = Field(1, ge=1, description="validate (sliding window, on the validation cases) every this "
                           "many epochs; the best validation keeps its weights, which are what gets registered")
    patience: int | None = Field(None, ge=1, description="stop after this many validations without improvement; "
                                 "null: train every epoch", examples=[10])
    devices: Literal["auto", "cpu"] | int = Field(
        "auto", description="auto: every GPU (DistributedDataParallel when there are several), else the CPU; "
        "cpu: one CPU process; N: N processes, one per GPU, or gloo processes on the CPU. Each step's batch "
        "is split between the processes (batch_size must be a multiple of N) and an epoch takes full batches")
    collective_timeout_s: int = Field(
        300, ge=1, le=1800, description="with several processes: longest a training step's collective (gradient "
        "all-reduce, loss) may wait for the other processes before the training fails; the rendezvous and the wait "
        "for rank 0's validation keep torch's 30 minutes")
    deterministic: bool = Field(
        False, description="on CUDA: deterministic cuDNN algorithms, no cuDNN autotuning, TF32 off, torch's "
        "deterministic algorithms (warn only) and CUBLAS_WORKSPACE_CONFIG=:4096:8, so a resumed run ends with the "
        "uninterrupted one's weights bit for bit (slower); false: a resumed run matches to float tolerance. The CPU "
        "is deterministic either way")

    @field_validator("devices")
    @classmethod
    def _devices(cls, value: str | int) -> str | int:
        if isinstance(value, int) and value < 1:
            raise ValueError("devices must be auto, cpu or a number of processes (at least 1)")
        return value

    @model_validator(mode="after")
    def _batch_splits(self) -> TrainSpec:
        if isinstance(self.devices, int) and self.batch_size % self.devices:
            raise ValueError(f"batch_size {self.batch_size} does not split between {self.devices} devices: use a "
                             "multiple of devices")
        return self

    @field_validator("network", mode="before")
    @classmethod
    def _network(cls, value: Any) -> dict[str, dict[str, Any]]:
        name, kwargs = _single_key(value, "network")
        net = resolve_monai("monai.networks.nets", name, "network", allowed_imports())
        _check_kwargs(net, name, kwargs, "network")
        _check_types(net.__init__, name, kwargs, "network")
        return {name: kwargs}

    @field_validator("optimizer", mode="before")
    @classmethod
    def _optimizer(cls, value: Any) -> dict[str, dict[str, Any]]:
        return _torch_component(value, "torch.optim", "optimizer", {"params"})

    @field_validator("scheduler", mode="before")
    @classmethod
    def _scheduler(cls, value: Any) -> dict[str, dict[str, Any]] | None:
        if value is None:
            return None
        name, _ = _single_key(value, "scheduler")
        if name == "ReduceLROnPlateau":
            raise ValueError("scheduler 'ReduceLROnPlateau' needs a validation metric each epoch, which training "
                             "does not compute; choose an epoch-driven scheduler (StepLR, CosineAnnealingLR, ...)")
        return _torch_component(value, "torch.optim.lr_scheduler", "scheduler", {"optimizer"})

    @field_validator("augment", mode="before")
    @classmethod
    def _augment(cls, value: Any) -> list[dict[str, dict[str, Any]]]:
        return _dict_transforms(value or [], "train.augment", random=True)

    @property
    def patch_size(self) -> tuple[int, ...] | None:
        """The size of the patches ``augment`` samples, from the last transform that sets one."""
        size = None
        for item in self.augment:
            for kwargs in item.values():
                for key in ("spatial_size", "roi_size"):
                    if key in kwargs and isinstance(kwargs[key], (list, tuple)):
                        size = tuple(int(s) for s in kwargs[key])
        return size

    @field_validator("loss", mode="before")
    @classmethod
    def _loss(cls, value: Any) -> dict[str, dict[str, Any]]:
        name, kwargs = _single_key(value, "loss")
        cls = resolve_monai("monai.losses", name, "loss", allowed_imports())
        _check_kwargs(cls, name, kwargs, "loss")
        _check_types(cls.__init__, name, kwargs, "loss")
        params = inspect.signature(cls.__init__).parameters
        if "to_onehot_y" in params and "softmax" in params:  # labels are class indices, outputs logits
            kwargs = {"to_onehot_y": True, "softmax": True, **kwargs}
        return {name: kwargs}


def metric_names(metrics: list[str], n_classes: int) -> list[str]:
    """Every score evaluation reports: each metric's mean over foreground classes, then one per class."""
    names = []
    for m in metrics:
        names.append(m)
        names.extend(f"{m}_{c}" for c in range(1, n_classes))
    return names


class SlidingWindow(_Section):
    """MONAI ``SlidingWindowInferer`` settings: validation during training, evaluation and the served model."""

    roi_size: list[int] | None = Field(None, min_length=1, description="window size in voxels; default: the "
                                       "training patch size, else the size preprocessing fixes")
    overlap: float = Field(0.25, ge=0, lt=1, description="fraction by which neighbouring windows overlap")
    sw_batch_size: int = Field(4, ge=1, description="windows run through the network at once")
    mode: Literal["constant", "gaussian"] = Field("constant", description="how overlapping windows are blended: "
                                                  "constant (equal weights) or gaussian (the centre weighs most)")


BUILTIN_METRICS = {"dice": True, "hausdorff95": False}  # name -> higher is better


def resolve_callable(path: str, what: str, allowed: tuple[str, ...] | None = None) -> Any:
    """A user's metric function or class by import path ``package.module:name`` (see :func:`lookup`)."""
    obj = lookup(None, path, what, allowed)
    if not callable(obj):
        module, _, attr = path.partition(":")
        raise ValueError(f"{what} {path!r}: {module!r} has no function or class {attr!r}")
    return obj


class CustomMetric(_Section):
    """A metric of the user's, by import path: a MONAI-style function ``fn(y_pred, y, **args)`` (like
    ``monai.metrics:compute_iou``) or metric class (``monai.metrics:MeanIoU``, called as
    ``metric(y_pred, y)``), given one-hot tensors of shape (1, classes, *spatial) and returning one
    value per class. ``include_background=False``, ``ignore_empty=False`` and the case's ``spacing``
    are passed where the signature takes them and ``args`` does not set them."""

    function: str = Field(description="import path package.module:name of the function or class",
                          examples=["monai.metrics:compute_iou"])
    higher_is_better: bool = Field(description="the metric's direction, for gates and the champion comparison",
                                   examples=[True])
    args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments: the function's, or the "
                                 "class's constructor's", examples=[{"ignore_empty": False}])

    @model_validator(mode="after")
    def _resolves(self) -> CustomMetric:
        fn = resolve_callable(self.function, "evaluate.custom_metrics function", allowed_imports())
        why = component_kind("metric", fn)
        if why:
            raise ValueError(f"metric {self.function!r} {why}")
        _check_kwargs(fn, self.function, self.args, "metric")
        _check_types(fn.__init__ if inspect.isclass(fn) else fn, self.function, self.args, "metric")
        return self

    def load(self) -> Any:
        return resolve_callable(self.function, "metric", allowed_imports())


def sides_problem(test_fraction: float, val_fraction: float) -> str | None:
    """Why the fractions cannot make the three sides (None when they can).

    Before the test side existed, the held-out cases were those below ``val_fraction``; the test side
    is the start of that range, so a ``test_fraction`` above ``val_fraction`` would test on cases an
    earlier model may have trained on.
    """
    if not (0 < test_fraction < 1 and 0 < val_fraction < 1):
        return (f"evaluate.test_fraction ({test_fraction}) and evaluate.val_fraction ({val_fraction}) must both "
                "be between 0 and 1")
    if test_fraction > val_fraction:
        return (f"evaluate.test_fraction ({test_fraction}) is above evaluate.val_fraction ({val_fraction}): the "
                "test side must lie within the cases held out before it existed, or an earlier champion may have "
                "trained on a test case; lower evaluate.test_fraction or raise evaluate.val_fraction")
    if test_fraction + val_fraction >= 1:
        return (f"evaluate.test_fraction ({test_fraction}) + evaluate.val_fraction ({val_fraction}) leave no "
                "training side: their sum must be below 1")
    return None


class EvaluateSpec(_Stage):
    metrics: list[str] = Field(default_factory=lambda: ["dice"], min_length=1, description="dice, hausdorff95, "
                               "or a name defined in custom_metrics")
    custom_metrics: dict[str, CustomMetric] = Field(default_factory=dict, description="name -> a user metric by "
                                                    "import path, with its direction")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="cases whose split position is below this are the "
                                 "test side: the gates and the champion comparison decide on them alone; at most "
                                 "val_fraction, so that no earlier model has trained on a test case")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="the next this much of positions are the validation "
                                "side (checkpoint selection, early stopping); the rest train")
    sliding_window: SlidingWindow = Field(default_factory=SlidingWindow, description="sliding-window inference "
                                          "of validation, evaluation and the served model")
    postprocess: Components = Field(
        default_factory=list, description="MONAI array transforms applied in order to the label map (shape "
        "(1, *spatial)) after the argmax, by name (KeepLargestConnectedComponent, FillHoles, RemoveSmallObjects) or "
        "import path package.module:Class; stored with the registered model, so evaluation, the service, batch "
        "prediction and MLflow serving give the same mask")

    @field_validator("postprocess", mode="before")
    @classmethod
    def _postprocess(cls, value: Any) -> list[dict[str, dict[str, Any]]]:
        return _mask_transforms(value, "evaluate.postprocess")

    @model_validator(mode="after")
    def _sides(self) -> EvaluateSpec:
        problem = sides_problem(self.test_fraction, self.val_fraction)
        if problem:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _known_metrics(self) -> EvaluateSpec:
        for name in self.custom_metrics:
            if name in BUILTIN_METRICS:
                raise ValueError(f"evaluate.custom_metrics: {name!r} is a built-in metric; choose another name")
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name) or re.search(r"_\d+$", name):
                raise ValueError(f"evaluate.custom_metrics: {name!r} is not a usable metric name (letters, digits "
                                 "and _, not ending in _<digits>, which names one class)")
            if name not in self.metrics:
                raise ValueError(f"evaluate.custom_metrics defines {name!r}, which evaluate.metrics does not list")
        for name in self.metrics:
            if name not in BUILTIN_METRICS and name not in self.custom_metrics:
                raise ValueError(f"evaluate.metrics: unknown metric {name!r}; built in: "
                                 f"{', '.join(BUILTIN_METRICS)}; or define it under evaluate.custom_metrics")
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError(f"evaluate.metrics lists a metric twice: {self.metrics}")
        return self

    def directions(self) -> dict[str, bool]:
        """Every listed metric -> True when higher is better."""
        return {m: BUILTIN_METRICS[m] if m in BUILTIN_METRICS else self.custom_metrics[m].higher_is_better
                for m in self.metrics}


class Gates(_Section):
    """The promotion policy (voxelflow.release.policy): every gate must pass."""

    min_dice: float | None = Field(0.8, ge=0, le=1, description="dice at least this; null: no dice gate")
    beat_champion_by: float = Field(
        0.0, ge=-1, le=1, description="relative gate on relative_metric: beat the champion by this much in the "
        "metric's better direction, case by case on the test side (the lower bound of the paired bootstrap "
        "interval must reach it); negative: non-inferiority, no worse than the champion by more than |value|")
    relative_metric: str = Field("dice", description="the metric the relative gate compares (dice, hausdorff95, "
                                 "dice_1, ...)")
    confidence: float = Field(
        0.95, gt=0, lt=1, description="relative gate: the level of the paired bootstrap interval (2000 resamples "
        "of the test cases) of candidate minus champion; its lower bound must clear beat_champion_by")
    min_test_cases: int = Field(5, ge=1, description="relative gate: fewer paired test cases than this fail it")
    absolute: dict[str, float] = Field(
        default_factory=dict, description="metric -> bound: at least for higher-is-better metrics (dice, dice_2), "
        "at most for lower-is-better ones (hausdorff95 in mm); <step>.<metric>: an own step's metric that its "
        "higher_is_better declares", examples=[{"dice_1": 0.7, "qc.outliers": 0}])
    flip_tolerance: float | None = Field(
        None, ge=0, le=1, description="run the behavioural checks on a held-out case: at most this fraction of "
        "voxels may change when the volume is mirrored left-right, an empty volume must give an empty mask, the "
        "output must be finite; null: checks not run", examples=[0.05])
    require_lineage: list[str] = Field(
        default_factory=lambda: ["dataset_digest", "spec_digest", "run_id"],
        description="lineage tags the version must carry to be promoted")

    def metrics(self) -> dict[str, str]:
        """Metric base name (dice, hausdorff95) -> the gate that reads it."""
        out = {"dice": "min_dice"} if self.min_dice is not None else {}
        for metric, gate in [*((m, f"absolute.{m}") for m in self.absolute), (self.relative_metric,
                                                                              "beat_champion_by")]:
            base = metric.rsplit("_", 1)[0] if metric.rsplit("_", 1)[-1].isdigit() else metric
            out.setdefault(base, gate)
        return out


class PromoteSpec(_Stage):
    model_name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="the MLflow registered model "
                            "the candidate becomes a version of; its champion alias is what is compared and served")
    gates: Gates = Field(default_factory=Gates, description="the promotion policy: every gate must pass")
    approval: Literal["auto", "manual"] = Field(
        "auto", description="manual: a candidate that passes the gates waits, the lifecycle paused, for a person's "
        "answer in the Prefect UI (approve or reject, with a reason) before `champion` moves")
    approval_timeout_s: int = Field(86400, ge=1, description="manual approval: how long the paused lifecycle waits "
                                    "for an answer; none by then counts as rejected")
    approval_poll_s: float = Field(10.0, gt=0, le=600, description="manual approval: how often the paused "
                                   "lifecycle looks for the answer")


class Autoscale(_Section):
    min_replicas: int = Field(2, ge=1, description="fewest pods the HorizontalPodAutoscaler keeps")
    max_replicas: int = Field(6, ge=1, description="most pods it scales to")
    metric: Literal["cpu", "queue_depth"] = Field(
        "cpu", description="cpu: average utilisation in percent of the request; queue_depth: requests waiting per "
        "pod (needs a metrics adapter serving voxelflow_queue_depth)")
    target: float = Field(70, gt=0, description="the value the autoscaler holds metric at: percent of the CPU "
                          "request, or waiting requests per pod")

    @model_validator(mode="after")
    def _order(self) -> Autoscale:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")
        return self


class KubernetesDeploy(_Section):
    image: str = Field("voxelflow:0.1.0", description="container image of the inference service")
    namespace: str = Field("voxelflow", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
                           description="namespace the service's objects are rendered into")
    alias: str = Field("champion", description="the registered model's alias the pods serve")
    secret: str = Field("voxelflow-runtime", description="Secret with VOXELFLOW_STORE, VOXELFLOW_DATABASE_URL, "
                        "VOXELFLOW_MLFLOW_TRACKING_URI")
    gpu: int = Field(0, ge=0, description="nvidia.com/gpu per pod")
    gpu_node_selector: dict[str, str] = Field(default_factory=lambda: {"nvidia.com/gpu.present": "true"},
                                              description="node labels GPU pods are scheduled on (with gpu > 0)")
    cpu_request: str = Field("1", description="CPU request per pod (Kubernetes quantity)")
    memory_request: str = Field("2Gi", description="memory request per pod (Kubernetes quantity)")
    cpu_limit: str = Field("4", description="CPU limit per pod (Kubernetes quantity)")
    memory_limit: str = Field("8Gi", description="memory limit per pod (Kubernetes quantity)")
    autoscale: Autoscale = Field(default_factory=Autoscale, description="the HorizontalPodAutoscaler")
    allowed_namespaces: list[str] = Field(default_factory=lambda: ["gateway"], min_length=1,
                                          description="namespaces whose pods may call the service")
    egress_ports: list[int] = Field(default_factory=lambda: [443, 5432],
                                    description="ports the pods may reach outside: object store, database")


class DeploySpec(_Stage):
    target: Literal["local", "kubernetes"] = Field(
        "local", description="local: the service on 127.0.0.1 and an HTTP smoke test; kubernetes: manifests "
        "rendered from deploy.kubernetes and applied to the configured cluster")
    kubernetes: KubernetesDeploy | None = Field(None, description="the Kubernetes deployment (with target: "
                                                 "kubernetes; its defaults when omitted)")

    @model_validator(mode="after")
    def _target(self) -> DeploySpec:
        if self.target == "kubernetes" and self.kubernetes is None:
            self.kubernetes = KubernetesDeploy()
        if self.target == "local" and self.kubernetes is not None:
            raise ValueError("deploy.kubernetes applies only to deploy.target: kubernetes")
        return self


# Keys added to the spec after its digests were first recorded: at these defaults they are left out of the digest,
# so a spec that does not use them keeps the digest its earlier runs recorded in lineage.
LATER_KEYS: list[tuple[str, str, Any]] = [("evaluate", "postprocess", []), ("train", "collective_timeout_s", 300),
                                         ("train", "deterministic", False)]


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
    steps: list[StepSpec] = Field(default_factory=list, description="the user's own steps, each a function run "
                                  "after a built-in or own step, checked against its signature at load")

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
        if dumped["version"] == 1:
            del dumped["version"]
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

    from voxelflow.spec.migrations import SpecMigrated, migrate

    data, changes = migrate(data, source)
    for change in changes:
        warnings.warn(SpecMigrated(change), stacklevel=2)
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as exc:
        raise _explain(source, exc) from None


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


class Settings(BaseSettings):
    """Where voxelflow keeps things and which services it talks to (``VOXELFLOW_*``).

    Two addresses decide where a lifecycle's state lives: ``store`` (bytes, any fsspec URL) and
    ``database_url`` (shared state, any SQLAlchemy URL). Both default to the home folder.
    """

    model_config = SettingsConfigDict(env_prefix="VOXELFLOW_", extra="ignore")

    home: Path = Field(Path(".voxelflow"), description="local defaults: store, database, MLflow, caches")
    store: str | None = Field(None, description="fsspec URL for every byte the pipeline writes (default: home)")
    database_url: SecretStr | None = Field(
        None, description="SQLAlchemy URL for ledger, audit log, API keys, cursors, locks (default: SQLite in home); "
        "a secret: it may carry a password"
    )
    mlflow_tracking_uri: SecretStr | None = Field(
        None, description="default: SQLite inside home; a secret: it may carry a password")
    mlflow_artifact_root: str | None = Field(
        None, description="default: mlartifacts in home, or a prefix under the store when the store is not local"
    )
    dask_scheduler: str | None = Field(None, description="default: none, a local cluster is started")
    dask_workers: int | None = Field(None, ge=1, description="workers of the local cluster (default: cores)")
    serve_host: str = "127.0.0.1"
    serve_port: int = Field(8000, ge=0, le=65535)
    deid_key: SecretStr | None = Field(
        None, description="key of the consistent DICOM UID remapping; required to ingest DICOM, never stored"
    )
    deid_key_block: str = Field(
        "voxelflow-deid-key", description="Prefect Secret block flow runs read the key from when deid_key is unset")
    serve_workers: int | None = Field(
        None, ge=1, description="inferences at once (default: one per core, or per GPU slot on GPUs)")
    serve_per_gpu: int = Field(1, ge=1, le=2, description="inferences each GPU runs at once (1 or 2); each "
                               "visible GPU holds one replica of the model")
    serve_queue: int | None = Field(None, ge=0, description="requests that may wait for a worker (default: workers)")
    serve_timeout_s: float = Field(120.0, gt=0, description="longest a request may take (then 504)")
    serve_max_voxels: int = Field(512**3, gt=0, description="largest volume accepted (then 413)")
    serve_memory_budget_mb: int = Field(
        8192, gt=0, description="memory one inference may need, estimated from the header with the model's working "
        "set (then 413)")
    serve_docs: bool = Field(False, description="serve /docs and /openapi.json")
    serve_tls_cert: str | None = Field(None, description="PEM certificate: HTTPS when set with serve_tls_key")
    serve_tls_key: str | None = Field(None, description="PEM private key of serve_tls_cert")
    serve_trusted_proxies: str = Field(
        "", description="comma-separated CIDRs of proxies whose X-Forwarded-For names the client (default: none)")
    allowed_imports: str = Field(
        "monai,torch,voxelflow", description="comma-separated top-level packages a spec's import paths may name "
        "(networks, losses, transforms, metrics); add your own package, e.g. monai,torch,voxelflow,mypackage")
    webhook_url: SecretStr | None = Field(
        None, description="where the notify_webhook step POSTs its JSON summary; a secret: it may carry a token")

    @property
    def root(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def store_url(self) -> str:
        return self.expand(self.store) if self.store else str(self.root)

    @property
    def database(self) -> str:
        """The database's SQLAlchemy URL in plain text, for connecting (never for messages: see voxelflow.core.redact)."""
        url = self.database_url.get_secret_value() if self.database_url else ""
        return self.expand(url) if url else f"sqlite:///{self.root / 'voxelflow.core.db'}"

    @property
    def tracking_uri(self) -> str:
        """The MLflow tracking URI in plain text, for connecting (never for messages: see voxelflow.core.redact)."""
        uri = self.mlflow_tracking_uri.get_secret_value() if self.mlflow_tracking_uri else ""
        return uri or f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def artifact_root(self) -> str:
        if self.mlflow_artifact_root:
            return self.mlflow_artifact_root
        if self.store and "://" in self.store and not self.store.startswith("file://"):
            return self.store.rstrip("/") + "/mlflow-artifacts"
        return (self.root / "mlartifacts").as_uri()

    def expand(self, url: str) -> str:
        return url.replace("{home}", str(self.root))
