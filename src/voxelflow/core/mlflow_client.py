"""The MLflow client for a tracking URI (its registry at the same place): one constructor for the
registry, the audit log's anchors and everything else that talks to MLflow, below all of them."""

from __future__ import annotations


def client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
