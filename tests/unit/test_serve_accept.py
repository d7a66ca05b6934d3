"""POST /v1/segment answers in the format the request's Accept header asks for; 406 when it accepts none."""

from __future__ import annotations

import gzip
import io

import nibabel as nib
import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.unit.helpers import npy
from voxelflow.serving.serve import KeyStore, ModelHolder, create_app
from voxelflow.serving.serve_volumes import answer_format


@pytest.fixture
def served(segmenter, db):
    holder = ModelHolder(lambda: (segmenter, "1"))
    holder.reload()
    keys = KeyStore(db)
    return TestClient(create_app(holder, keys, db=db, docs=True)), keys.create("clinic", ["predictor"])


def mask_of(response) -> np.ndarray:
    media = response.headers["content-type"].split(";")[0]
    if media == "application/x-npy":
        return np.load(io.BytesIO(response.content), allow_pickle=False)
    raw = gzip.decompress(response.content) if media == "application/gzip" else response.content
    assert media in ("application/gzip", "application/x-nifti") and raw[:4] in (b"\x5c\x01\x00\x00",)
    return np.asanyarray(nib.Nifti1Image.from_bytes(raw).dataobj)


VOL = np.random.default_rng(5).random((12, 10, 14), dtype=np.float32)
AFFINE = np.diag([1.5, 1.25, 2.0, 1.0])
BODIES = {"npy": (npy(VOL), "application/x-npy"),
          "nifti": (gzip.compress(nib.Nifti1Image(VOL, AFFINE).to_bytes()), "application/gzip")}


@pytest.mark.parametrize("given", ["npy", "nifti"])
@pytest.mark.parametrize("accept, media", [
    (None, None), ("*/*", None), ("application/x-npy", "application/x-npy"),
    ("application/x-nifti", "application/x-nifti"), ("application/gzip", "application/gzip"),
    ("application/x-gzip", "application/gzip"), ("application/x-nifti;q=0.4, application/x-npy;q=0.9",
                                                 "application/x-npy")])
def test_each_accepted_type_decodes_to_the_same_mask(served, segmenter, given, accept, media):
    client, key = served
    body, content_type = BODIES[given]
    headers = {"X-API-Key": key, "Content-Type": content_type, **({"Accept": accept} if accept else {})}
    response = client.post("/v1/segment", content=body, headers=headers)
    assert response.status_code == 200, response.text
    default = "application/x-npy" if given == "npy" else "application/gzip"  # as before: the input's format
    assert response.headers["content-type"].split(";")[0] == (media or default)
    assert response.headers["vary"] == "Accept"
    expected = segmenter.segment(VOL, AFFINE if given == "nifti" else None)
    np.testing.assert_array_equal(mask_of(response), expected)
    if media == "application/gzip":
        assert gzip.decompress(response.content)[:4] == b"\x5c\x01\x00\x00"


@pytest.mark.parametrize("accept", ["text/html", "application/json", "image/png, text/*;q=0.5",
                                    "application/x-npy;q=0"])
def test_an_unsupported_accept_is_406_before_any_inference(served, accept):
    client, key = served
    response = client.post("/v1/segment", content=BODIES["npy"][0],
                           headers={"X-API-Key": key, "Content-Type": "application/x-npy", "Accept": accept})
    assert response.status_code == 406, response.text
    assert "application/x-npy" in response.json()["detail"]


def test_summary_answers_json_and_refuses_a_mask_only_accept(served):
    client, key = served
    headers = {"X-API-Key": key, "Content-Type": "application/x-npy"}
    url = "/v1/segment?summary=true"
    assert client.post(url, content=BODIES["npy"][0], headers={**headers, "Accept": "application/json"}).json()[
        "shape"] == list(VOL.shape)
    assert client.post(url, content=BODIES["npy"][0], headers={**headers, "Accept": "application/x-npy"}
                       ).status_code == 406


def test_negotiation_rules():
    assert answer_format("", "npy") == "npy" and answer_format("", "nifti") == "nifti"
    assert answer_format("application/octet-stream", "nifti") == "nifti"
    assert answer_format("application/*", "npy") == "npy"
    assert answer_format("application/x-npy;q=0, */*", "npy") == "nii"  # a type's own q over the wildcard's
    assert answer_format("application/x-npy;q=oops", "npy") is None


def test_openapi_documents_the_answer_types(served):
    client, _ = served
    answer = client.get("/openapi.json").json()["paths"]["/v1/segment"]["post"]["responses"]
    assert set(answer["200"]["content"]) == {"application/x-npy", "application/x-nifti", "application/gzip",
                                             "application/json"}
    assert "406" in answer
