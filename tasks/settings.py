"""Settings inside a flow run: the environment's, with the DICOM de-identification key from a Prefect
Secret block when the environment holds none.

A worker started without ``VOXELFLOW_DEID_KEY`` then still de-identifies: the key lives in the
Prefect server's Secret block ``voxelflow-deid-key`` (name: ``VOXELFLOW_DEID_KEY_BLOCK``), never in
a spec, a deployment's parameters or the data. Only a DICOM ingest with de-identification on asks.
"""

from __future__ import annotations

from prefect.blocks.system import Secret
from pydantic import SecretStr

from voxelflow.spec.config import DataSpec, Settings


def run_settings(data: DataSpec | None = None) -> Settings:
    settings = Settings()
    if settings.deid_key is not None or data is None or not data.needs_deid_key:
        return settings
    try:
        secret = Secret.load(settings.deid_key_block)
    except ValueError:  # no such block: the ingest then refuses, naming both places a key can come from
        return settings
    return settings.model_copy(update={"deid_key": SecretStr(str(secret.get()))})
