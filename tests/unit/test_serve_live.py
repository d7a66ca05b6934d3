"""Liveness that never waits: /health/live answers on a real uvicorn while every inference worker and
queue place is taken and every threadpool thread waits on a registry that does not answer."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np

from tests.unit.helpers import npy
from voxelflow.serving.serve import NPY, KeyStore, ModelHolder, Server, create_app

THREADPOOL = 40  # anyio's default: the threads sync routes, key lookups and describe() share
BOUND_S = 2.0  # generous: a probe on the event loop takes milliseconds; one queued behind the pool never comes


def test_live_answers_while_every_worker_queue_place_and_pool_thread_is_busy(segmenter, db):
    release = threading.Event()
    segmenting = threading.Event()
    describing = []

    class Held:  # the real segmenter, held until the probes are done: an inference that takes its time
        def segment(self, volume, affine):
            segmenting.set()
            release.wait(60)
            return segmenter.segment(volume, affine)

    def describe() -> dict:  # the registry hangs: every /v1/model holds a threadpool thread
        describing.append(1)
        release.wait(60)
        return {}

    keys = KeyStore(db)
    predictor, viewer = keys.create("clinic", ["predictor"]), keys.create("grafana", ["viewer"])
    holder = ModelHolder(lambda: (Held(), "1"))
    holder.reload()
    app = create_app(holder, keys, db=db, workers=1, queue=1, rate=1e6, burst=10**6, describe=describe)
    body = npy(np.random.default_rng(0).random((16, 16, 16), dtype=np.float32))
    results: list[int] = []

    def send(path: str, key: str, **kw) -> None:
        with httpx.Client(base_url=server.url, timeout=90) as c:
            r = c.post(path, content=body, headers={"X-API-Key": key, "content-type": NPY}) if kw.get("post") \
                else c.get(path, headers={"X-API-Key": key})
            results.append(r.status_code)

    with Server(app) as server:
        threads = [threading.Thread(target=send, args=("/v1/segment", predictor), kwargs={"post": True})
                   for _ in range(2)]
        try:
            threads[0].start()
            assert segmenting.wait(30)  # the one worker is busy
            threads[1].start()
            deadline = time.monotonic() + 30
            while True:  # the second request holds the one queue place (a probe sent before it would take it)
                metrics = httpx.get(f"{server.url}/metrics", headers={"X-API-Key": viewer}, timeout=10).text
                if "voxelflow_queue_depth 1.0" in metrics:
                    break
                assert time.monotonic() < deadline, "the second request never reached the queue"
                time.sleep(0.05)
            third = httpx.post(f"{server.url}/v1/segment", content=body, timeout=30,
                               headers={"X-API-Key": predictor, "content-type": NPY})
            assert third.status_code == 503, third.status_code
            assert "every inference worker and queue place" in third.json()["detail"]
            hung = [threading.Thread(target=send, args=("/v1/model", viewer)) for _ in range(THREADPOOL + 8)]
            threads += hung
            for th in hung:
                th.start()
            deadline = time.monotonic() + 30
            while len(describing) < THREADPOOL:
                assert time.monotonic() < deadline, f"only {len(describing)} pool threads are held"
                time.sleep(0.05)
            probes = []
            for _ in range(10):
                start = time.perf_counter()
                live = httpx.get(f"{server.url}/health/live", timeout=10)
                probes.append(time.perf_counter() - start)
                assert live.status_code == 200 and live.json() == {"status": "ok"}
            ready = httpx.get(f"{server.url}/health/ready", timeout=10)
            assert ready.status_code == 200 and ready.json()["model_version"] == "1"
            assert max(probes) < BOUND_S, probes
        finally:
            release.set()
            for th in threads:
                th.join(timeout=90)
    assert sorted(set(results)) == [200], results  # every held request finished once released
