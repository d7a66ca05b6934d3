"""The MLflow client for a tracking URI (its registry at the same place): one constructor for the
registry, the audit log's anchors and everything else that talks to MLflow, below all of them. A new SQLite
tracking database gets MLflow's schema copied in (:mod:`voxelflow.core.mlflow_schema`) before MLflow opens it.

MLflow keeps one engine per database URI for the life of the process (and its stores in caches of its own): a
SQLite file deleted under a live process (a notebook that starts its home over) would still be read and written
through them, and refuses the writes ("attempt to write a readonly database"). :func:`client` notices the file is
another one than it was and lets MLflow open it anew."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from voxelflow.core import mlflow_schema
from voxelflow.core.db import file_identity

log = logging.getLogger(__name__)

_files: dict[str, tuple[int, int]] = {}  # SQLite tracking URI -> (device, inode) of its file when last seen
_lock = threading.Lock()


def client(tracking_uri: str):
    from mlflow import MlflowClient

    path = mlflow_schema.sqlite_path(tracking_uri)
    if path is not None:
        _reopen_if_replaced(tracking_uri, path)
    mlflow_schema.seed(tracking_uri)
    made = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    seen = None if path is None else file_identity(path)
    if seen is not None:
        with _lock:
            _files[tracking_uri] = seen
    return made


def _reopen_if_replaced(tracking_uri: str, path: Path) -> None:
    """When ``path``, the SQLite file of ``tracking_uri``, is gone or another one than this process used, drop
    MLflow's engines for it and its cached stores, so that the next use opens the file there now (seeded first)."""
    with _lock:
        before = _files.get(tracking_uri)
        if before is None or file_identity(path) == before:
            return
        del _files[tracking_uri]
    log.warning("MLflow's database %s was deleted or replaced: opening it again", path)
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistryStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as TrackingStore
    from mlflow.tracking._model_registry.registry import ModelRegistryStoreRegistry
    from mlflow.tracking._tracking_service.registry import TrackingStoreRegistry

    for store in (TrackingStore, RegistryStore):
        with store._engine_map_lock:
            engine = store._engine_map.pop(tracking_uri, None)
        if engine is not None:
            engine.dispose()
    for registry in (TrackingStoreRegistry, ModelRegistryStoreRegistry):  # the stores hold the old engines
        registry._get_store_with_resolved_uri.cache_clear()
    mlflow_schema.forget(tracking_uri)
