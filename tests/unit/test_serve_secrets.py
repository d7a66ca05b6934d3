"""No secrets in the service's answers or logs: forced failures whose errors name URLs with passwords
(the tracking URI, the database, the store) leave the password in no response, log line or audit entry."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
from fastapi.testclient import TestClient

from voxelflow.core import audit
from voxelflow.serving.serve import NPY, KeyStore, ModelHolder, create_app

PASSWORDS = ("tr4ck-pw", "d4tabase-pw", "st0re-pw")
TRACKING = f"postgresql+psycopg://mlflow:{PASSWORDS[0]}@mlflow-db.internal:5432/mlflow"
DATABASE = f"postgresql://voxelflow:{PASSWORDS[1]}@state-db.internal/voxelflow"
STORE = f"s3://minio:{PASSWORDS[2]}@objects.internal/voxelflow"


def npy(shape=(8, 8, 8)) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(0).random(shape, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


class Broken:
    """A model whose inference fails with an error naming the store (an artifact read late)."""

    def segment(self, volume, affine):
        raise RuntimeError(f"cannot read a chunk from {STORE}/weights")


def test_a_password_in_any_url_reaches_no_answer_log_or_audit_entry(db, caplog):
    from voxelflow.release.registry import RegistryError

    loads = iter([RegistryError(f"cannot read demo@champion from the registry at {TRACKING}: timed out"),
                  (Broken(), "1"), OSError(f"cannot download models:/demo/2 from {STORE}")])

    def loader():
        outcome = next(loads)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def describe() -> dict:
        raise ConnectionError(f"registry at {TRACKING} and state at {DATABASE} unreachable")

    keys = KeyStore(db)
    admin = keys.create("ops", ["admin"])
    holder = ModelHolder(loader)
    caplog.set_level(logging.INFO, logger="voxelflow.serving.serve")
    with pytest.raises(RegistryError):
        holder.reload()
    client = TestClient(create_app(holder, keys, db=db, describe=describe))
    answers = []

    def call(method: str, path: str, **kw):
        response = client.request(method, path, **kw)
        answers.append(f"{method} {path} {response.status_code} {dict(response.headers)} {response.text}")
        return response

    ready = call("GET", "/health/ready")
    assert ready.status_code == 503 and "RegistryError" in ready.json()["error"]
    assert "mlflow-db.internal" not in ready.text  # not even the host: the why is behind a key
    about = call("GET", "/v1/model", headers={"X-API-Key": admin}).json()
    assert "mlflow:***@mlflow-db.internal" in about["swap_failed"]["error"]
    assert "voxelflow:***@state-db.internal" in about["registry_error"]
    assert call("POST", "/v1/reload", headers={"X-API-Key": admin}).status_code == 200  # loads Broken, v1
    failed = call("POST", "/v1/segment", content=npy(), headers={"X-API-Key": admin, "content-type": NPY})
    assert failed.status_code == 500 and failed.json() == {"detail": "internal error"}
    refused = call("POST", "/v1/reload", headers={"X-API-Key": admin})
    assert refused.status_code == 503 and "minio:***@objects.internal" in refused.json()["detail"]
    call("GET", "/v1/model", headers={"X-API-Key": "vf_wrong"})
    call("GET", "/metrics", headers={"X-API-Key": admin})
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "minio:***@objects.internal/voxelflow/weights" in logged  # the unhandled error's traceback, masked
    trail = json.dumps(list(audit.entries(db)))
    assert "service.reloaded" in trail and "access.denied" in trail
    for password in PASSWORDS:
        for where, text in (("an answer", "\n".join(answers)), ("the log", logged + caplog.text),
                            ("the audit log", trail)):
            assert password not in text, f"{password} in {where}"
