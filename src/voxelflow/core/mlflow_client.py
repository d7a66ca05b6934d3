"""The MLflow client for a tracking URI (its registry at the same place): one constructor for the
registry, the audit log's anchors and everything else that talks to MLflow, below all of them. A new SQLite
tracking database gets MLflow's schema copied in (:mod:`voxelflow.core.mlflow_schema`) before MLflow opens it."""

from __future__ import annotations

from voxelflow.core import mlflow_schema


def client(tracking_uri: str):
    from mlflow import MlflowClient

    mlflow_schema.seed(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
