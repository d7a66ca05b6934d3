"""The inference service: health, API keys and roles, volume formats, input checks, throttling, metrics."""

from __future__ import annotations

import gzip
import io
import time

import nibabel as nib
import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from tests.unit.helpers import npy
from voxelflow.core import audit
from voxelflow.core.db import Database, api_keys
from voxelflow.serving.serve import NPY, KeyStore, ModelHolder, Throttle, create_app, decode_volume, encode_mask

VERSION = "7"


@pytest.fixture
def keys(db) -> KeyStore:
    return KeyStore(db)


@pytest.fixture
def make_client(segmenter, keys, db):
    loads = []

    def loader():
        loads.append(1)
        return segmenter, VERSION

    def make(load: bool = True, **kwargs) -> TestClient:
        holder = ModelHolder(loader)
        if load:
            holder.reload()
        return TestClient(create_app(holder, keys, db=db, **kwargs))

    make.loads = loads
    return make


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client()


@pytest.fixture
def predict_key(keys) -> str:
    return keys.create("clinic", ["predict"])


@pytest.fixture
def admin_key(keys) -> str:
    return keys.create("ops", ["admin"])


def volume(shape=(14, 12, 10), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def post(client: TestClient, body: bytes, key: str | None, content_type: str = NPY):
    headers = {"content-type": content_type}
    if key is not None:
        headers["X-API-Key"] = key
    return client.post("/v1/segment", content=body, headers=headers)


# ---------------------------------------------------------------- health


def test_live(client):
    response = client.get("/health/live")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_ready_with_model_version(client):
    response = client.get("/health/ready")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "model_version": VERSION}


def test_not_ready_before_the_model_is_loaded(make_client, predict_key):
    client = make_client(load=False)
    assert client.get("/health/live").status_code == 200
    response = client.get("/health/ready")
    assert response.status_code == 503
    assert response.json()["status"] == "loading"
    assert post(client, npy(volume()), predict_key).status_code == 503


def test_failed_load_is_reported_by_ready_without_its_text(keys):
    """/health/ready (no key) says what failed; why, with the URL's password masked, is behind a key."""
    def broken():
        raise RuntimeError("no champion at postgresql://mlflow:hunter2@db.internal/mlflow")

    holder = ModelHolder(broken)
    with pytest.raises(RuntimeError):
        holder.reload()
    client = TestClient(create_app(holder, keys))
    response = client.get("/health/ready")
    assert response.status_code == 503
    assert response.json() == {"status": "loading", "error": holder.summary}
    assert "RuntimeError" in holder.summary and "db.internal" not in response.text and "hunter2" not in response.text
    about = client.get("/v1/model", headers={"X-API-Key": keys.create("v", ["viewer"])}).json()
    assert about["swap_failed"]["error"] == "RuntimeError: no champion at postgresql://mlflow:***@db.internal/mlflow"


# ---------------------------------------------------------------- keys and roles


def test_no_key_is_401(client):
    response = post(client, npy(volume()), None)
    assert response.status_code == 401
    assert "X-API-Key" in response.json()["detail"]


def test_unknown_key_is_401(client, predict_key):
    assert post(client, npy(volume()), predict_key + "x").status_code == 401
    assert post(client, npy(volume()), "").status_code == 401


def test_predict_key_cannot_reload(client, predict_key, make_client):
    response = client.post("/v1/reload", headers={"X-API-Key": predict_key})
    assert response.status_code == 403
    assert "may not reload" in response.json()["detail"]


def test_admin_key_can_predict_and_reload(client, admin_key, make_client, db):
    assert post(client, npy(volume()), admin_key).status_code == 200
    before = len(make_client.loads)
    response = client.post("/v1/reload", headers={"X-API-Key": admin_key})
    assert response.status_code == 200
    assert response.json() == {"model_version": VERSION}
    assert len(make_client.loads) == before + 1
    events = list(audit.entries(db))
    assert events[-1]["event"] == "service.reloaded" and events[-1]["actor"] == "ops"
    assert events[-1]["details"] == {"model_version": VERSION}
    assert audit.verify(db).ok


def test_keystore(db):
    store = KeyStore(db)
    key = store.create("someone", ["predict"])
    assert key.startswith("vf_") and len(key) > 40
    with db.transaction() as conn:
        stored = [r._asdict() for r in conn.execute(select(api_keys))]
    assert len(stored) == 1
    assert stored[0]["name"] == "someone" and stored[0]["expires"] is None
    assert key not in repr(stored)  # only the digest is kept
    assert stored[0]["digest"] != key and len(stored[0]["digest"]) == 64
    principal = store.lookup(key)
    assert principal.name == "someone" and principal.roles == ("predictor",)  # the old name maps to the new
    assert store.lookup("vf_wrong") is None and store.lookup(None) is None and store.lookup("") is None
    # another process (another Database on the same URL) sees the key
    other_db = Database(db.url)
    assert KeyStore(other_db).lookup(key) == principal
    second = store.create("other", ["predict", "admin"])
    assert KeyStore(other_db).lookup(second).roles == ("admin", "predictor")
    assert store.lookup(key) == principal
    assert store.create("someone", ["predict"]) != key  # a fresh random key each time
    for bad in (["root"], [], ["predict", "superuser"]):
        with pytest.raises(ValueError, match="role"):
            store.create("bad", bad)
    other_db.dispose()


def test_keys_are_shared_through_postgresql(pg_url):
    first, second = Database(pg_url), Database(pg_url)
    try:
        key = KeyStore(first).create("clinic", ["predict"])
        assert KeyStore(second).lookup(key).name == "clinic"
        assert KeyStore(second).revoke(key) is True
        assert KeyStore(first).lookup(key) is None
    finally:
        first.dispose()
        second.dispose()


# ---------------------------------------------------------------- volumes in and out


def test_npy_in_npy_out(client, predict_key):
    vol = volume()
    response = post(client, npy(vol), predict_key)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(NPY)
    assert response.headers["X-Model-Version"] == VERSION
    mask = np.load(io.BytesIO(response.content), allow_pickle=False)
    assert mask.shape == vol.shape
    assert mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 1}


def test_npy_detected_without_content_type(client, predict_key, segmenter):
    vol = volume(seed=3)
    response = post(client, npy(vol), predict_key, content_type="application/octet-stream")
    assert response.status_code == 200
    mask = np.load(io.BytesIO(response.content))
    np.testing.assert_array_equal(mask, segmenter.segment(vol))


def test_nifti_gz_in_nifti_out(client, predict_key, segmenter):
    vol = volume((12, 14, 10), seed=1)
    affine = np.array([[-1.5, 0, 0, 20.0], [0, 1.25, 0, -8.0], [0, 0, 2.0, 3.5], [0, 0, 0, 1]])
    body = gzip.compress(nib.Nifti1Image(vol, affine).to_bytes())
    response = post(client, body, predict_key, content_type="application/gzip")
    assert response.status_code == 200, response.text
    assert response.content[:2] == b"\x1f\x8b"
    out = nib.Nifti1Image.from_bytes(gzip.decompress(response.content))
    assert out.shape == vol.shape
    np.testing.assert_allclose(out.affine, affine, atol=1e-6)
    mask = np.asanyarray(out.dataobj)
    assert set(np.unique(mask)) <= {0, 1}
    np.testing.assert_array_equal(mask, segmenter.segment(vol, affine))


def test_plain_nifti_with_singleton_fourth_axis(client, predict_key):
    vol = volume((10, 10, 12), seed=2)[..., None]
    response = post(client, nib.Nifti1Image(vol, np.eye(4)).to_bytes(), predict_key, "application/octet-stream")
    assert response.status_code == 200, response.text
    out = nib.Nifti1Image.from_bytes(gzip.decompress(response.content))
    assert out.shape == (10, 10, 12)


@pytest.mark.parametrize("body", [b"definitely not a volume", b"\x1f\x8bbroken gzip", b"\x93NUMPY garbage"],
                         ids=["text", "bad-gzip", "bad-npy"])
def test_garbage_is_400(client, predict_key, body):
    response = post(client, body, predict_key, content_type="application/octet-stream")
    assert response.status_code == 400
    assert "cannot decode" in response.json()["detail"]


def test_empty_body_is_400(client, predict_key):
    assert post(client, b"", predict_key).status_code == 400


def test_pickled_npy_is_refused(client, predict_key):
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert post(client, buf.getvalue(), predict_key).status_code == 400


@pytest.mark.parametrize("array", [
    np.zeros((16, 16), np.float32),
    np.zeros((4, 4, 4, 2), np.float32),
    np.zeros((8, 8, 8), dtype=bool),
], ids=["2-d", "4-d", "bool"])
def test_wrong_shape_or_type_is_422(client, predict_key, array):
    response = post(client, npy(array), predict_key)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "3-D" in detail or "not a supported numeric type" in detail


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_volume_is_422(client, predict_key, bad):
    vol = volume()
    vol[3, 4, 5] = bad
    response = post(client, npy(vol), predict_key)
    assert response.status_code == 422
    assert "NaN" in response.json()["detail"]


def test_too_many_voxels_is_413(make_client, predict_key):
    client = make_client(max_voxels=999)
    assert post(client, npy(volume((10, 10, 10))), predict_key).status_code == 413
    assert post(client, npy(volume((9, 10, 11))), predict_key).status_code == 200


def test_body_over_max_bytes_is_413(make_client, predict_key):
    body = npy(volume((10, 10, 10)))
    client = make_client(max_bytes=len(body) - 1)
    response = post(client, body, predict_key)
    assert response.status_code == 413
    assert post(make_client(max_bytes=len(body)), body, predict_key).status_code == 200


# ---------------------------------------------------------------- throttling, metrics, audit


def test_throttling_gives_429_with_retry_after(make_client, predict_key, keys):
    client = make_client(rate=0.001, burst=2)
    body = npy(volume((8, 8, 8)))
    assert post(client, body, predict_key).status_code == 200
    assert post(client, body, predict_key).status_code == 200
    third = post(client, body, predict_key)
    assert third.status_code == 429
    retry = third.headers["Retry-After"]
    assert retry.isdigit()  # HTTP wants whole seconds
    assert int(retry) == pytest.approx(1000, rel=0.01)
    # the bucket is per key: another key is not held back
    other = keys.create("other-clinic", ["predict"])
    assert post(client, body, other).status_code == 200


def test_metrics(client, predict_key, keys):
    post(client, npy(volume()), predict_key)
    post(client, npy(volume()), None)
    post(client, npy(np.zeros((4, 4), np.float32)), predict_key)
    assert client.get("/metrics").status_code == 401  # metrics need a key too
    viewer = keys.create("prometheus", ["viewer"])
    response = client.get("/metrics", headers={"Authorization": f"Bearer {viewer}"})  # as Prometheus sends it
    assert response.status_code == 200
    text = response.text
    assert 'voxelflow_requests_total{role="predictor",route="/v1/segment",status="200"} 1.0' in text
    assert 'voxelflow_requests_total{role="none",route="/v1/segment",status="401"} 1.0' in text
    assert 'voxelflow_requests_total{role="predictor",route="/v1/segment",status="422"} 1.0' in text
    assert 'voxelflow_requests_total{role="none",route="/metrics",status="401"} 1.0' in text
    assert "voxelflow_inference_seconds_count 1.0" in text
    assert "voxelflow_model_version 7.0" in text and "voxelflow_queue_depth 0.0" in text
    assert 'voxelflow_request_seconds_count{route="/v1/segment"} 3.0' in text


def test_metrics_are_per_app(make_client, predict_key, keys):
    viewer = keys.create("prometheus", ["viewer"])
    first, second = make_client(), make_client()
    post(first, npy(volume()), None)
    assert 'status="401"} 1.0' in first.get("/metrics", headers={"X-API-Key": viewer}).text
    assert 'route="/v1/segment",status="401"' not in second.get("/metrics", headers={"X-API-Key": viewer}).text


def test_denied_requests_are_audited_in_aggregate_and_lock_no_valid_key_out(make_client, predict_key, db):
    """A flood of bad keys from one address: one audit record a minute, then 429s for the failures alone;
    a valid key from the same address still gets in."""
    client = make_client(failed_rate=0.01)  # no token comes back during the test, however slow the machine
    statuses = [post(client, npy(volume()), f"vf_guess-{i}").status_code for i in range(40)]
    assert statuses[:10] == [401] * 10  # the failed-request burst of this address
    assert set(statuses[10:]) == {429}  # then each failed lookup is throttled
    assert client.post("/v1/reload", headers={"X-API-Key": predict_key}).status_code == 429  # a 403 is a failure too
    assert post(client, npy(volume()), predict_key).status_code == 200  # the valid key is not held back
    entries = list(audit.entries(db))
    assert [(e["event"], e["actor"], e["details"]["status"], e["details"]["endpoint"]) for e in entries] == [
        ("access.denied", "testclient", 401, "/v1/segment"),
    ]
    verdict = audit.verify(db)
    assert verdict.ok, verdict.problem


def test_denials_report_the_count_since_the_last_record(db):
    from voxelflow.serving.serve import Denials

    denials = Denials(db, window_s=0.2)
    for _ in range(5):
        denials.record("10.0.0.9", 401, "/v1/segment")
    time.sleep(0.25)
    denials.record("10.0.0.9", 403, "/v1/reload")
    details = [e["details"] for e in audit.entries(db)]
    assert [d["denied_since_last_record"] for d in details] == [0, 4]


def test_roles(client, keys):
    viewer, operator = keys.create("v", ["viewer"]), keys.create("o", ["operator"])
    assert post(client, npy(volume()), viewer).status_code == 403
    assert client.get("/v1/model", headers={"X-API-Key": viewer}).json()["version"] == VERSION
    assert client.post("/v1/reload", headers={"X-API-Key": operator}).status_code == 200
    assert post(client, npy(volume()), operator).status_code == 403
    assert client.get("/v1/model").status_code == 401
    assert client.get("/openapi.json").status_code == 404 and client.get("/docs").status_code == 404


def test_keys_expire_list_and_revoke_by_name(keys, client):
    key = keys.create("short", ["predictor"], expires_days=0.00001)  # about a second
    assert post(client, npy(volume()), key).status_code == 200
    time.sleep(1.2)
    assert post(client, npy(volume()), key).status_code == 401
    keys.create("short", ["viewer"])
    listed = [k for k in keys.list() if k["name"] == "short"]
    assert len(listed) == 2 and [k["expired"] for k in listed] == [True, False]
    assert "vf_" not in repr(keys.list())
    assert keys.revoke_name("short") == 2 and not [k for k in keys.list() if k["name"] == "short"]
    with pytest.raises(ValueError, match="positive"):
        keys.create("x", ["viewer"], expires_days=0)


def test_summary_gives_each_label_volume_in_ml(client, predict_key):
    vol = volume((10, 10, 12))
    body = gzip.compress(nib.Nifti1Image(vol, np.diag([2.0, 2.0, 2.5, 1.0])).to_bytes())
    response = client.post("/v1/segment?summary=true", content=body,
                           headers={"X-API-Key": predict_key, "Content-Type": "application/gzip"})
    assert response.status_code == 200
    out = response.json()
    assert out["voxel_ml"] == pytest.approx(0.01)
    mask = decode_volume(client.post("/v1/segment", content=body, headers={
        "X-API-Key": predict_key, "Content-Type": "application/gzip"}).content, "application/gzip")[0]
    expected = {str(v): round(float((mask == v).sum()) * 0.01, 3) for v in np.unique(mask) if v}
    assert out["volumes_ml"] == expected


def test_request_id_is_echoed_or_made(client):
    assert client.get("/health/live", headers={"X-Request-ID": "abc-123"}).headers["X-Request-ID"] == "abc-123"
    made = client.get("/health/live", headers={"X-Request-ID": "<script>"}).headers["X-Request-ID"]
    assert len(made) == 32 and made.isalnum()


def test_without_a_database_nothing_is_audited(segmenter, keys, db):
    holder = ModelHolder(lambda: (segmenter, VERSION))
    holder.reload()
    client = TestClient(create_app(holder, keys))
    assert post(client, npy(volume()), None).status_code == 401
    assert list(audit.entries(db)) == []


def test_throttle_bucket():
    throttle = Throttle(rate=20.0, burst=2)
    assert throttle.allow("a") == 0.0
    assert throttle.allow("a") == 0.0
    wait = throttle.allow("a")
    assert 0 < wait <= 0.05 + 1e-6
    assert throttle.allow("b") == 0.0  # buckets are per caller
    time.sleep(wait + 0.02)
    assert throttle.allow("a") == 0.0
    assert throttle.allow("a") > 0


def test_throttle_refills_to_burst_only():
    throttle = Throttle(rate=20.0, burst=3)
    throttle.allow("a")
    time.sleep(0.3)  # would be 8 tokens without the cap
    assert [throttle.allow("a") == 0.0 for _ in range(4)] == [True, True, True, False]


def test_decode_and_encode_round_trip():
    vol = volume()
    array, affine, fmt = decode_volume(npy(vol), NPY)
    assert fmt == "npy" and affine is None
    np.testing.assert_array_equal(array, vol)
    mask = (vol > 0.5).astype(np.uint8)
    payload, media = encode_mask(mask, None, "npy")
    assert media == NPY
    np.testing.assert_array_equal(np.load(io.BytesIO(payload)), mask)
    payload, media = encode_mask(mask, np.diag([2.0, 2.0, 2.0, 1.0]), "nifti")
    img = nib.Nifti1Image.from_bytes(gzip.decompress(payload))
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), mask)
    np.testing.assert_array_equal(img.affine, np.diag([2.0, 2.0, 2.0, 1.0]))


def test_gzip_bomb_is_refused_before_inflating_it(make_client, predict_key):
    """A small gzip body whose header declares more voxels than allowed: 413 after inflating 540 bytes."""
    import nibabel as nib

    from voxelflow.data.formats import VolumeError

    hdr = nib.Nifti1Header()
    hdr.set_data_shape((512, 512, 512))
    hdr.set_data_offset(352)
    bomb = gzip.compress(hdr.binaryblock + b"\0" * (4 + 8 * 1024**2))
    client = make_client(max_voxels=1000)
    response = post(client, bomb, predict_key, content_type="application/gzip")
    assert response.status_code == 413
    assert "too-large" in response.json()["detail"]
    with pytest.raises(VolumeError, match="declares 134217728 voxels"):
        decode_volume(bomb, "application/gzip", max_voxels=1000)


def test_zeros_behind_a_small_header_are_never_inflated(make_client, predict_key):
    """Only what the header declares is inflated: the 8 MB of zeros after 8x8x8 voxels stay compressed."""
    import nibabel as nib

    body = gzip.compress(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)).to_bytes() + b"\0" * 8 * 1024**2)
    array, _, fmt = decode_volume(body, "application/gzip", max_voxels=1000)
    assert array.shape == (8, 8, 8) and fmt == "nifti"


def test_declared_oversize_body_is_refused_unread(make_client, predict_key):
    client = make_client(max_bytes=100)
    response = client.post("/v1/segment", content=b"x" * 101,
                           headers={"X-API-Key": predict_key, "content-type": NPY})
    assert response.status_code == 413


def test_watch_swaps_in_the_new_version_when_the_alias_moves(segmenter):
    versions = iter(["1", "2"])
    holder = ModelHolder(lambda: (segmenter, next(versions)))
    assert holder.reload() == "1"
    target = {"version": "1"}
    stop = holder.watch(lambda: target["version"], interval=0.02)
    try:
        target["version"] = "2"
        deadline = time.monotonic() + 5
        while holder.version != "2" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert holder.version == "2"
    finally:
        stop.set()


def test_watch_loads_a_model_that_appears_later(segmenter):
    holder = ModelHolder(lambda: (segmenter, "1"))
    target = {"version": None}
    stop = holder.watch(lambda: target["version"], interval=0.02)
    try:
        time.sleep(0.1)
        assert holder.segmenter is None
        target["version"] = "1"
        deadline = time.monotonic() + 5
        while holder.segmenter is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert holder.version == "1"
    finally:
        stop.set()


def test_revoked_key_is_refused(client, keys):
    key = keys.create("temp", ["predict"])
    assert post(client, npy(volume((8, 8, 8))), key).status_code == 200
    assert keys.revoke(key) is True
    assert keys.revoke(key) is False
    assert post(client, npy(volume((8, 8, 8))), key).status_code == 401


def test_under_load_a_full_queue_is_503_at_once_and_health_stays_fast(segmenter, keys, db):
    """32 clients against 1 worker + 2 queue places on loopback: every answer is 200 or a fast 503,
    and /health/live keeps answering while inference is saturated."""
    import threading

    import httpx

    from voxelflow.serving.serve import Server

    class Slow:  # the real segmenter on a volume, plus the time a bigger model would take
        def segment(self, volume, affine):
            time.sleep(0.3)
            return segmenter.segment(volume, affine)

    holder = ModelHolder(lambda: (Slow(), VERSION))
    holder.reload()
    key = keys.create("load", ["predictor"])
    body = npy(volume((64, 64, 64)))
    results: list[tuple[int, float]] = []
    health: list[float] = []
    with Server(create_app(holder, keys, db=db, workers=1, queue=2, rate=1000, burst=1000)) as server:
        def client() -> None:
            start = time.perf_counter()
            r = httpx.post(f"{server.url}/v1/segment", content=body, timeout=60,
                           headers={"X-API-Key": key, "Content-Type": NPY})
            results.append((r.status_code, time.perf_counter() - start))

        def probe() -> None:
            for _ in range(20):
                start = time.perf_counter()
                assert httpx.get(f"{server.url}/health/live", timeout=10).status_code == 200
                health.append(time.perf_counter() - start)
                time.sleep(0.02)

        threads = [threading.Thread(target=client) for _ in range(32)] + [threading.Thread(target=probe)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    codes = [c for c, _ in results]
    assert set(codes) <= {200, 503} and codes.count(200) >= 3 and codes.count(503) >= 1, codes
    busy = sorted(s for c, s in results if c == 503)
    ok = sorted(s for c, s in results if c == 200)
    assert busy[len(busy) // 2] < ok[0]  # refusals come back sooner than any inference could
    # never stuck behind inference (each takes > 0.3 s); clients and server share this process's GIL here
    assert len(health) == 20 and sorted(health)[10] < 0.25, health


def test_a_request_over_the_time_limit_is_504(segmenter, keys, db):
    class Stuck:
        def segment(self, volume, affine):
            time.sleep(2)
            return segmenter.segment(volume, affine)

    holder = ModelHolder(lambda: (Stuck(), VERSION))
    holder.reload()
    client = TestClient(create_app(holder, keys, db=db, timeout_s=0.3))
    assert post(client, npy(volume()), keys.create("t", ["predictor"])).status_code == 504
