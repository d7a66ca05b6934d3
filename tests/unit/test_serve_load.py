"""Item 7 of the serving issue on loopback: load past capacity and bad input, against the real service.

The service runs in uvicorn on 127.0.0.1 with the real (tiny) segmenter, no stand-ins. 32 clients at once send
64^3 volumes to a service that holds 8 (2 workers + 6 queue places): 4x its capacity. Every answer is 200 or 503,
the refusals come back at once with Retry-After, and the accepted requests are bounded by the capacity, not by how
many clients came. Then each bad input goes over a real socket, the body over the limit both with a
Content-Length and streamed without one; and a reload that cannot reach the registry is a documented 503 while the
loaded model keeps serving.
"""

from __future__ import annotations

import io
import threading
import time
from datetime import timedelta

import httpx
import numpy as np
from sqlalchemy import update

from tests.unit.helpers import npy
from tests.unit.test_serve_bad_input import CASES, GOOD, MAX_BYTES
from voxelflow.core.db import api_keys, now
from voxelflow.serving.serve import NPY, KeyStore, ModelHolder, Server, create_app

WORKERS, QUEUE = 2, 6
CLIENTS = 4 * (WORKERS + QUEUE)  # 32


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def burst(url: str, body: bytes, headers: dict[str, str], clients: int) -> list[tuple[int, float, str | None]]:
    """``clients`` requests released at the same instant, each on its own connection: (status, seconds, Retry-After)."""
    results: list[tuple[int, float, str | None]] = []
    gate = threading.Barrier(clients)

    def client() -> None:
        with httpx.Client(timeout=60) as own:
            gate.wait()
            start = time.perf_counter()
            r = own.post(url, content=body, headers=headers)
            results.append((r.status_code, time.perf_counter() - start, r.headers.get("Retry-After")))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert len(results) == clients
    return results


def test_four_times_capacity_gets_fast_503s_and_the_accepted_keep_their_latency(segmenter, db):
    keys = KeyStore(db)
    key = keys.create("load", ["predictor"])
    holder = ModelHolder(lambda: (segmenter, "1"))
    holder.reload()
    body = npy(np.random.default_rng(0).random((64, 64, 64), dtype=np.float32))
    headers = {"X-API-Key": key, "Content-Type": NPY}
    app = create_app(holder, keys, db=db, workers=WORKERS, queue=QUEUE, rate=1000, burst=1000)
    with Server(app) as server, httpx.Client(timeout=60) as http:
        url = f"{server.url}/v1/segment"
        for _ in range(2):  # warm: the first calls build the transforms' caches
            assert http.post(url, content=body, headers=headers).status_code == 200
        at_capacity = [burst(url, body, headers, WORKERS + QUEUE) for _ in range(2)]
        overloaded = burst(url, body, headers, CLIENTS)
        assert http.get(f"{server.url}/health/ready").json()["status"] == "ready"
        assert http.post(url, content=body, headers=headers).status_code == 200  # and it still segments

    for results in at_capacity:  # as many as it holds at once: all served
        assert [c for c, _, _ in results] == [200] * (WORKERS + QUEUE), results
    capacity_p99 = max(p99([s for _, s, _ in results]) for results in at_capacity)
    codes = [c for c, _, _ in overloaded]
    accepted = [s for c, s, _ in overloaded if c == 200]
    refused = [s for c, s, _ in overloaded if c == 503]
    print(f"p99 at capacity {capacity_p99 * 1000:.0f} ms; at 4x capacity {len(accepted)} accepted, p99 "
          f"{p99(accepted) * 1000:.0f} ms, {len(refused)} refused, p99 {p99(refused) * 1000 if refused else 0:.0f} ms")
    assert set(codes) <= {200, 503}, codes  # no 5xx but 503
    assert len(accepted) >= WORKERS and len(refused) >= CLIENTS // 2, codes
    assert all(retry and retry.isdigit() for c, _, retry in overloaded if c == 503)
    # refused at once: sooner than the requests it took are served
    assert p99(refused) < float(np.median(accepted)), (sorted(refused), sorted(accepted))
    # the accepted wait behind at most the capacity, not behind all 32 clients: with an unbounded queue their p99
    # was measured here at 3.6-3.8x the p99 at capacity; bounded, at 0.85-2.0x (the refusals cost some CPU too)
    assert p99(accepted) < 2.5 * capacity_p99, (sorted(accepted), capacity_p99)


def test_each_bad_input_over_a_socket_gets_its_4xx_and_the_service_stays_healthy(segmenter, db):
    keys = KeyStore(db)
    named = {role: keys.create(role, [role]) for role in ("predictor", "viewer")}
    named["expired"] = keys.create("expired", ["predictor"], expires_days=1)
    with db.transaction() as conn:
        conn.execute(update(api_keys).where(api_keys.c.name == "expired").values(expires=now() - timedelta(hours=1)))
    holder = ModelHolder(lambda: (segmenter, "1"))
    holder.reload()
    app = create_app(holder, keys, db=db, max_bytes=MAX_BYTES, failed_burst=len(CASES) + 1, workers=1, queue=1)
    over = b"\0" * int(MAX_BYTES * 1.1)
    with Server(app) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        got = {}
        for name, (body, content_type, who, _) in CASES.items():
            headers = {"content-type": content_type}
            if who is not None:
                headers["X-API-Key"] = named.get(who, who)
            response = http.post("/v1/segment", content=body, headers=headers)
            got[name] = response.status_code
            assert response.headers["content-type"].startswith("application/json")
            assert response.json()["detail"]
            assert http.get("/health/live").status_code == 200
        assert got == {name: case[3] for name, case in CASES.items()}

        def stream():  # no Content-Length: refused once the body read so far passes the limit
            for start in range(0, len(over), 8192):
                yield over[start:start + 8192]

        streamed = http.post("/v1/segment", content=stream(), headers={"X-API-Key": named["predictor"],
                                                                        "content-type": NPY})
        assert streamed.status_code == 413 and "limit" in streamed.json()["detail"]
        assert http.get("/health/ready").json()["status"] == "ready"
        ok = http.post("/v1/segment", content=npy(GOOD), headers={"X-API-Key": named["predictor"], "content-type": NPY})
        assert ok.status_code == 200 and np.load(io.BytesIO(ok.content)).shape == GOOD.shape


def test_a_failed_reload_is_503_and_the_loaded_model_keeps_serving(segmenter, db):
    """The registry away during a reload: a documented 503 with Retry-After, not a 500, and no request fails."""
    keys = KeyStore(db)
    operator, predictor = keys.create("ops", ["operator"]), keys.create("clinic", ["predictor"])
    loads = iter([(segmenter, "1")])

    def loader():
        try:
            return next(loads)
        except StopIteration:
            raise ConnectionError("registry unreachable") from None

    holder = ModelHolder(loader)
    holder.reload()
    with Server(create_app(holder, keys, db=db)) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        response = http.post("/v1/reload", headers={"X-API-Key": operator})
        assert response.status_code == 503 and response.headers["Retry-After"] == "30"
        assert "registry unreachable" in response.json()["detail"]
        assert "still serving version 1" in response.json()["detail"]
        ok = http.post("/v1/segment", content=npy(GOOD), headers={"X-API-Key": predictor, "content-type": NPY})
        assert ok.status_code == 200 and ok.headers["X-Model-Version"] == "1"
