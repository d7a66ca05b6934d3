"""What every stage is given besides its spec section (:class:`Context`), and how a stage's result comes
back from its JSON form."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, TypeVar

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


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild a stage's result dataclass from its JSON form (a stage run elsewhere wrote it)."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in names})
