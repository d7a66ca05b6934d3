"""What every stage is given besides its spec section (:class:`Context`), and how a stage's result comes
back from its JSON form."""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import Any, Callable, TypeVar

import pydantic

from voxelflow.core.db import Database, connect
from voxelflow.core.storage import Layout, Store
from voxelflow.spec.config import Settings

Progress = Callable[[int, int], None]
T = TypeVar("T")


@dataclass(frozen=True)
class Context:
    """What every stage needs besides its section: where bytes and state live, which services to use."""

    settings: Settings
    pipeline: str

    @property
    def store(self) -> Store:
        return Store(self.settings.store_url)

    @property
    def db(self) -> Database:
        return connect(self.settings.database)

    @property
    def layout(self) -> Layout:
        return Layout(self.store, self.pipeline)

    @property
    def tracking_uri(self) -> str:
        return self.settings.tracking_uri


class BadReference(ValueError):
    """A stage's result, read back from its JSON form, is not of its type: which field, and why."""


@functools.cache
def _adapter(cls: type) -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(cls)


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild a stage's result (a dataclass) from its JSON form (a stage run elsewhere wrote it), validated by
    pydantic against the dataclass's annotations: a field of the wrong type or one missing raises
    :class:`BadReference` naming it; keys the type does not have (a newer writer's) are left out."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    try:
        return _adapter(cls).validate_python({k: v for k, v in data.items() if k in names})
    except pydantic.ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(whole)'}: {e['msg']}" for e in exc.errors()[:5])
        raise BadReference(f"a {cls.__name__} read back from its JSON form is not valid: {problems}") from None
