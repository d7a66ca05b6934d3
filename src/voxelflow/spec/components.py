"""The spec's components: MONAI / torch classes and user functions named in a spec, resolved and checked.

A component is a name (or import path ``package.module:name``) with its arguments. The helpers here look
it up among the allowed packages (``VOXELFLOW_ALLOWED_IMPORTS``), check it is the right kind of class and
that its arguments fit its signature; :class:`SpecError` is the error of a spec that cannot be used.
"""

from __future__ import annotations

import inspect
from typing import Annotated, Any

from pydantic import ConfigDict, ValidationError, WithJsonSchema

from voxelflow.core.settings import Settings
from voxelflow.spec import checked


class SpecError(ValueError):
    """A spec that cannot be used; the message names the file, the key and what was expected."""


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
    if checked.is_trusted():
        return kept_component(value, what)
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


def _refuse_package(name: str, path: str, what: str, allowed: tuple[str, ...]) -> None:
    if not _within(path, allowed):
        raise ValueError(f"{what} {name!r}: the package {path.split('.')[0]!r} is not among the allowed imports "
                         f"(VOXELFLOW_ALLOWED_IMPORTS={','.join(allowed)}); add it there to use its components")


def kept_component(item: Any, what: str) -> dict[str, dict[str, Any]]:
    """A component of a kept spec (:mod:`voxelflow.spec.checked`: validated in full before, with the same code and
    packages): its form and the allow-list of import paths are checked, nothing is imported."""
    name, kwargs = _single_key(item, what)
    if ":" in name:
        _refuse_package(name, name.partition(":")[0], what, allowed_imports())
        checked.note(name)
    return {name: kwargs}


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
        if allowed is not None:
            _refuse_package(name, path, what, allowed)
        checked.note(name)
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


def resolve_callable(path: str, what: str, allowed: tuple[str, ...] | None = None) -> Any:
    """A user's metric function or class by import path ``package.module:name`` (see :func:`lookup`)."""
    obj = lookup(None, path, what, allowed)
    if not callable(obj):
        module, _, attr = path.partition(":")
        raise ValueError(f"{what} {path!r}: {module!r} has no function or class {attr!r}")
    return obj


def _dict_transforms(value: Any, what: str, random: bool) -> list[dict[str, dict[str, Any]]]:
    """A list of MONAI dictionary transforms by name, checked: known, dictionary form, arguments known
    and typed, ``keys`` given; deterministic ones only (``random=False``) or random ones only."""
    if not isinstance(value, list):
        raise ValueError(f"expected a list of MONAI dictionary transforms ({what})")
    if checked.is_trusted():
        return [kept_component(item, "transform") for item in value]
    from monai.transforms import MapTransform, Randomizable

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
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"expected a list of MONAI array transforms ({what})")
    if checked.is_trusted():
        return [kept_component(item, "transform") for item in value]
    from monai.transforms import MapTransform, Randomizable

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
