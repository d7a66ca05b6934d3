"""Hot swap under load: a new champion is loaded aside and swapped in while requests keep being answered."""

from __future__ import annotations

import io
import itertools
import json
import logging
import threading

import httpx
import numpy as np

from voxelflow.learn.model import Segmenter
from voxelflow.serving.serve import NPY, KeyStore, ModelHolder, Server, create_app


def test_no_request_fails_while_the_model_is_swapped_under_load(tiny_model_config, tiny_weights, db):
    versions = itertools.count(1)

    def loader():  # a real load each time: network built, weights read
        version = next(versions)
        return Segmenter(tiny_model_config, tiny_weights[version % 2], device="cpu"), str(version)

    holder = ModelHolder(loader)
    holder.reload()
    key = KeyStore(db).create("clinic", ["predictor"])
    body = io.BytesIO()
    np.save(body, np.random.default_rng(0).random((16, 16, 16), dtype=np.float32))
    statuses: list[int] = []
    served: set[str] = set()
    stop = threading.Event()

    def client(url: str) -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                r = http.post(url, content=body.getvalue(), headers={"X-API-Key": key, "content-type": NPY})
                statuses.append(r.status_code)
                if r.status_code == 200:
                    np.load(io.BytesIO(r.content))  # a whole mask, not a broken answer
                    served.add(r.headers["X-Model-Version"])

    # the key's throttle is set out of reach: this test is about swaps, and four clients of a 16³ model send
    # faster than the default 10 a second on a quick machine
    app = create_app(holder, KeyStore(db), db=db, workers=2, queue=16, rate=1e6, burst=10**6)
    with Server(app) as server:
        threads = [threading.Thread(target=client, args=(f"{server.url}/v1/segment",)) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            for _ in range(3):  # swaps while the clients keep sending
                before = len(statuses)
                holder.reload()
                while len(statuses) < before + 4 and all(t.is_alive() for t in threads):
                    stop.wait(0.05)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
        with httpx.Client() as http:
            assert http.get(f"{server.url}/health/ready").json()["model_version"] == "4"
    assert holder.swaps == 3
    assert statuses and set(statuses) == {200}, sorted(set(statuses))
    assert len(served) >= 2, served  # answers came from more than one model


def test_a_failed_hot_swap_is_counted_and_explained_while_the_old_model_keeps_serving(tiny_model_config,
                                                                                      tiny_weights, db, caplog):
    """The alias moves to a version whose artifacts cannot be read: the watch's swap fails, the metric counts it,
    /v1/model (with a key) says which version and why, /health/ready stays ready with what failed, and v1 serves."""
    import time

    from fastapi.testclient import TestClient

    alias = {"version": "1"}

    def loader():  # what registry.load_segmenter does: read the alias, then that version's artifacts
        version = alias["version"]
        if version == "2":
            raise OSError("cannot read models:/demo/2 from s3://minio:s3cr3t-pw@store.internal/mlflow")
        return Segmenter(tiny_model_config, tiny_weights[0], device="cpu"), version

    holder = ModelHolder(loader)
    holder.reload()
    keys = KeyStore(db)
    viewer, predictor = keys.create("grafana", ["viewer"]), keys.create("clinic", ["predictor"])
    client = TestClient(create_app(holder, keys, db=db))
    metrics = client.get("/metrics", headers={"X-API-Key": viewer}).text
    assert "voxelflow_model_swap_failures_total 0.0" in metrics
    caplog.set_level(logging.WARNING, logger="voxelflow.serving.serve")
    stop = holder.watch(lambda: alias["version"], interval=0.02)
    try:
        alias["version"] = "2"
        deadline = time.monotonic() + 10
        while holder.swap_failures < 2 and time.monotonic() < deadline:  # tried, and tried again
            time.sleep(0.02)
    finally:
        stop.set()
    assert holder.swap_failures >= 2 and holder.version == "1"
    metrics = client.get("/metrics", headers={"X-API-Key": viewer}).text
    assert f"voxelflow_model_swap_failures_total {float(holder.swap_failures)}" in metrics
    about = client.get("/v1/model", headers={"X-API-Key": viewer}).json()
    assert about["version"] == "1" and about["swap_failures"] == holder.swap_failures
    assert about["swap_failed"]["version"] == "2" and about["swap_failed"]["serving"] == "1"
    assert about["swap_failed"]["error"] == ("OSError: cannot read models:/demo/2 from "
                                             "s3://minio:***@store.internal/mlflow")
    ready = client.get("/health/ready")
    assert ready.status_code == 200 and ready.json()["model_version"] == "1"
    assert ready.json()["swap_failed"]["version"] == "2" and "store.internal" not in ready.text
    segment = client.post("/v1/segment", content=body_of((12, 12, 12)), headers={"X-API-Key": predictor,
                                                                                 "content-type": NPY})
    assert segment.status_code == 200 and segment.headers["X-Model-Version"] == "1"
    failures = [r.getMessage() for r in caplog.records if "model.load_failed" in r.getMessage()]
    assert len(failures) == 1 and "s3://minio:***@store.internal" in failures[0]  # logged once, redacted
    assert "s3cr3t-pw" not in caplog.text


def body_of(shape) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(1).random(shape, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def test_a_champion_notice_swaps_the_model_in_at_once_not_at_the_next_poll(tiny_model_config, tiny_weights,
                                                                          prefect_api, caplog):
    """`voxelflow serve` follows the Prefect API's champion notices (flows.announce): a notice about its model
    makes it look at the alias now, though its poll is 10 minutes away."""
    import time
    import uuid

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.announce import follow_champion, notify_champion

    caplog.set_level(logging.INFO, logger="voxelflow.serving.serve")
    alias = {"version": "1"}
    holder = ModelHolder(lambda: (Segmenter(tiny_model_config, tiny_weights[int(alias["version"]) % 2], device="cpu"),
                                  alias["version"]))
    holder.reload()
    stop_watch = holder.watch(lambda: alias["version"], interval=600)
    name, heard, stop = f"notice-{uuid.uuid4().hex[:8]}", [], threading.Event()

    def follow() -> None:
        with temporary_settings({PREFECT_API_URL: prefect_api}):
            follow_champion(name, lambda version: (heard.append(version), holder.nudge()), stop)

    listener = threading.Thread(target=follow, daemon=True)
    listener.start()
    try:
        with temporary_settings({PREFECT_API_URL: prefect_api}):
            deadline = time.monotonic() + 60
            while not heard:  # the stream is open once a notice sent now comes back (the version stays 1)
                assert time.monotonic() < deadline, "no champion notice came back from the Prefect API"
                assert notify_champion(name, "1")
                time.sleep(0.5)
            assert notify_champion(f"{name}-other", "7")  # another model's notice is not this service's
            alias["version"] = "2"
            assert notify_champion(name, "2")
            deadline = time.monotonic() + 20
            while holder.version != "2":
                assert time.monotonic() < deadline, f"still serving v{holder.version} after the notice"
                time.sleep(0.05)
        assert "7" not in heard and heard[-1] == "2"
        assert holder.swaps == 1
        # the service's log says what swapped and what found it (the notice, not the poll)
        logged = [json.loads(r.getMessage()) for r in caplog.records if r.name == "voxelflow.serving.serve"]
        (swapped,) = [e for e in logged if e.get("event") == "model.swapped"]
        assert swapped["version"] == "2" and swapped["serving_before"] == "1" and swapped["cause"] == "notice"
        assert swapped["load_s"] >= 0
    finally:
        stop.set()
        stop_watch.set()
