"""Each kind of bad request gets its own 4xx, and the service stays healthy and keeps segmenting afterwards."""

from __future__ import annotations

import gzip
import io
from datetime import timedelta

import nibabel as nib
import numpy as np
from fastapi.testclient import TestClient
from sqlalchemy import update

from tests.unit.helpers import npy
from voxelflow.core.db import api_keys, now
from voxelflow.serving.serve import NIFTI, NPY, KeyStore, ModelHolder, create_app

MAX_BYTES = 64 * 1024


def nifti_gz(array: np.ndarray) -> bytes:
    return gzip.compress(nib.Nifti1Image(array, np.eye(4)).to_bytes())


def absurd_header() -> bytes:
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((30000, 30000, 30000))
    hdr.set_data_offset(352)
    return hdr.binaryblock + b"\0" * 4


GOOD = np.random.default_rng(0).random((12, 12, 12), dtype=np.float32)
NAN = GOOD.copy()
NAN[3, 3, 3] = np.nan

#: name -> (body, content type, key to use, expected status)
CASES = {
    "truncated-nifti": (nifti_gz(GOOD)[:-400], NIFTI, "predictor", 400),
    "wrong-dtype": (npy(GOOD.astype(np.complex64)), NPY, "predictor", 422),
    "nan": (npy(NAN), NPY, "predictor", 422),
    "2-d": (npy(GOOD[0]), NPY, "predictor", 422),
    "absurd-header": (absurd_header(), "application/octet-stream", "predictor", 413),
    "body-1.1x-limit": (b"\0" * int(MAX_BYTES * 1.1), NPY, "predictor", 413),
    "gzip-bomb": (gzip.compress(absurd_header()[:352] + b"\0" * 4 + b"\0" * 4 * 1024**2), NIFTI, "predictor", 413),
    "wrong-content-type": (npy(GOOD), "application/json", "predictor", 415),
    "missing-key": (npy(GOOD), NPY, None, 401),
    "invalid-key": (npy(GOOD), NPY, "vf_not-a-key", 401),
    "expired-key": (npy(GOOD), NPY, "expired", 401),
    "role-without-permission": (npy(GOOD), NPY, "viewer", 403),
}


def test_each_bad_input_gets_its_4xx_and_the_service_stays_healthy(segmenter, db):
    keys = KeyStore(db)
    named = {role: keys.create(role, [role]) for role in ("predictor", "viewer")}
    named["expired"] = keys.create("expired", ["predictor"], expires_days=1)
    with db.transaction() as conn:
        conn.execute(update(api_keys).where(api_keys.c.name == "expired").values(expires=now() - timedelta(hours=1)))
    holder = ModelHolder(lambda: (segmenter, "1"))
    holder.reload()
    client = TestClient(create_app(holder, keys, db=db, max_bytes=MAX_BYTES, failed_burst=len(CASES) + 1))
    got = {}
    for name, (body, content_type, who, _) in CASES.items():
        headers = {"content-type": content_type}
        if who is not None:
            headers["X-API-Key"] = named.get(who, who)
        response = client.post("/v1/segment", content=body, headers=headers)
        got[name] = response.status_code
        assert response.headers["content-type"].startswith("application/json")
        assert response.json()["detail"]
    assert got == {name: case[3] for name, case in CASES.items()}
    assert client.get("/health/live").status_code == 200
    assert client.get("/health/ready").json()["status"] == "ready"
    ok = client.post("/v1/segment", content=npy(GOOD), headers={"X-API-Key": named["predictor"], "content-type": NPY})
    assert ok.status_code == 200 and np.load(io.BytesIO(ok.content)).shape == GOOD.shape
