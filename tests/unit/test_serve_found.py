"""What fuzzing the service against its OpenAPI document found (tests/e2e/test_serve_schema.py), kept fixed.

A NIfTI header whose pixdim is NaN or infinite made the memory estimate raise (500); one whose sform says 100 mm
voxels while pixdim says 1 mm was budgeted as 1 mm, though resampling follows the sform (a 16^3 body became a
1066^3 grid); ``/metrics`` answered text/plain where the document said JSON; ``/v1/segment`` documented no body.
"""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
from fastapi.testclient import TestClient

from voxelflow.serving.serve import BODY_TYPES, NIFTI, KeyStore, ModelHolder, create_app, declared_volume


@pytest.fixture
def client_and_key(segmenter, db):
    keys = KeyStore(db)
    holder = ModelHolder(lambda: (segmenter, "1"))
    holder.reload()
    return TestClient(create_app(holder, keys, db=db, docs=True, memory_budget=1024**3)), keys.create("c", ["admin"])


def nifti(affine: np.ndarray | None, pixdim: list[float]) -> bytes:
    """A gzip NIfTI of 16^3 voxels: ``affine`` in its sform (none when None), ``pixdim`` as given."""
    img = nib.Nifti1Image(np.random.default_rng(0).random((16, 16, 16), dtype=np.float32), affine)
    img.header["pixdim"][1:4] = pixdim
    return gzip.compress(img.to_bytes())


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_a_non_finite_pixdim_is_never_a_500(client_and_key, bad):
    client, key = client_and_key
    headers = {"X-API-Key": key, "content-type": NIFTI}
    # the sform is what places the voxels: a finite one is used, whatever pixdim says
    with_sform = client.post("/v1/segment", content=nifti(np.eye(4), [bad, 1, 1]), headers=headers)
    assert with_sform.status_code == 200, with_sform.text
    # without one, pixdim is the affine: refused from the header, before any voxel is read
    without = client.post("/v1/segment", content=nifti(None, [bad, 1, 1]), headers=headers)
    assert without.status_code == 422 and "spacing" in without.json()["detail"]
    assert client.get("/health/live").status_code == 200


def test_the_budget_follows_the_spacing_resampling_will_use(client_and_key):
    client, key = client_and_key
    body = nifti(np.diag([100.0, 100.0, 100.0, 1.0]), [1, 1, 1])  # sform: 100 mm voxels; pixdim: 1 mm
    assert declared_volume(body, NIFTI)[2] == pytest.approx((100.0, 100.0, 100.0))
    response = client.post("/v1/segment", content=body, headers={"X-API-Key": key, "content-type": NIFTI})
    assert response.status_code == 413 and "budget" in response.json()["detail"]


def test_the_document_says_what_each_route_takes_and_answers(client_and_key):
    client, _ = client_and_key
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    segment = paths["/v1/segment"]["post"]
    assert segment["requestBody"]["required"] is True
    assert set(segment["requestBody"]["content"]) == set(BODY_TYPES)
    assert {"application/x-npy", "application/gzip", "application/json"} <= set(segment["responses"]["200"]["content"])
    for route in ("/metrics", "/v1/model", "/v1/segment", "/v1/reload"):
        for status, answer in next(iter(paths[route].values()))["responses"].items():
            assert "application/json" in answer.get("content", {}) or status == "200", (route, status)
    assert "503" in paths["/v1/reload"]["post"]["responses"]
