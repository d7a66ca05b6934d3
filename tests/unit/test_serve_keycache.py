"""The service's in-memory copy of the API keys (KeyCache): revoked, expired and unknown keys, and what the database
sees. A clock of the test's own decides when the copy is old, so no test waits for it."""

from __future__ import annotations

import time
from datetime import timedelta

from sqlalchemy import update

from voxelflow.core.db import Database, api_keys, now
from voxelflow.serving.serve_keys import KeyCache, KeyStore


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_a_key_revoked_elsewhere_is_refused_once_the_copy_is_ttl_old(db):
    clock = Clock()
    cache = KeyCache(KeyStore(db), ttl_s=5.0, miss_s=0.5, clock=clock)
    key = KeyStore(db).create("clinic", ["predictor"])
    assert cache.lookup(key).name == "clinic"
    other = Database(db.url)  # another process's connection: its revocation is not seen through this store
    try:
        assert KeyStore(other).revoke(key) is True
    finally:
        other.dispose()
    clock.t += 4.9
    reads = cache.reads
    assert cache.lookup(key) is not None and cache.reads == reads  # within the bound: the copy answers
    clock.t += 0.1  # the copy is ttl_s old: read again
    assert cache.lookup(key) is None and cache.reads == reads + 1


def test_a_key_revoked_through_the_same_store_is_refused_on_the_next_lookup(db):
    store = KeyStore(db)
    cache = KeyCache(store, clock=Clock())
    key = store.create("clinic", ["predictor"])
    assert cache.lookup(key) is not None
    assert store.revoke(key) is True
    assert cache.lookup(key) is None


def test_an_expired_key_is_refused_at_once_without_a_read(db):
    clock = Clock()
    store = KeyStore(db)
    cache = KeyCache(store, clock=clock)
    short = store.create("short", ["predictor"], expires_days=0.00001)  # about 0.9 s
    gone = store.create("gone", ["predictor"], expires_days=1)
    with db.transaction() as conn:
        conn.execute(update(api_keys).where(api_keys.c.name == "gone").values(expires=now() - timedelta(hours=1)))
    assert cache.lookup(gone) is None
    assert cache.lookup(short).name == "short"
    reads = cache.reads
    time.sleep(1.0)  # the wall clock passes the expiry; the copy's clock stands still: no new read
    assert cache.lookup(short) is None and cache.reads == reads


def test_unknown_keys_are_never_cached_as_valid_and_a_flood_costs_one_read_per_miss_s(db):
    clock = Clock()
    store = KeyStore(db)
    cache = KeyCache(store, ttl_s=5.0, miss_s=0.5, clock=clock)
    valid = store.create("clinic", ["predictor"])
    assert cache.lookup(valid) is not None
    reads = cache.reads
    for i in range(2000):  # distinct unknown keys, within one miss_s
        assert cache.lookup(f"vf_unknown_{i}") is None
    assert cache.reads == reads
    assert cache.lookup(None) is None and cache.lookup("") is None
    # a key made in another process while unknown keys flood: found once the copy is miss_s old
    other = Database(db.url)
    try:
        made = KeyStore(other).create("new", ["viewer"])
    finally:
        other.dispose()
    assert cache.lookup(made) is None  # the copy is younger than miss_s: not read again
    clock.t += 0.5
    assert cache.lookup(made).name == "new" and cache.reads == reads + 1
    for i in range(2000):
        assert cache.lookup(f"vf_unknown_{i}") is None
    assert cache.reads == reads + 1  # the flood went on: still no read within miss_s
    clock.t += 0.5
    assert cache.lookup("vf_unknown_0") is None and cache.reads == reads + 2
    assert cache.lookup(valid).name == "clinic"  # never displaced by the unknown ones


def test_the_service_verifies_keys_without_a_query_per_request(db, segmenter):
    import numpy as np
    from fastapi.testclient import TestClient

    from tests.unit.helpers import npy
    from voxelflow.serving.serve import ModelHolder, create_app

    queries = []
    store = KeyStore(db)
    digests = store.digests
    store.digests = lambda: queries.append(1) or digests()
    holder = ModelHolder(lambda: (segmenter, "1"))
    holder.reload()
    client = TestClient(create_app(holder, store, db=db, key_ttl_s=3600, key_miss_s=3600))
    key = store.create("clinic", ["predictor"])
    body = npy(np.random.default_rng(0).random((8, 8, 8), dtype=np.float32))
    for _ in range(5):
        assert client.post("/v1/segment", content=body, headers={"X-API-Key": key}).status_code == 200
        assert client.post("/v1/segment", content=body, headers={"X-API-Key": "vf_nobody"}).status_code in (401, 429)
    assert len(queries) == 1
