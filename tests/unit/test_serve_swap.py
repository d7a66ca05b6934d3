"""Hot swap under load: a new champion is loaded aside and swapped in while requests keep being answered."""

from __future__ import annotations

import io
import itertools
import threading

import httpx
import numpy as np

from voxelflow.model import Segmenter
from voxelflow.serve import NPY, KeyStore, ModelHolder, Server, create_app


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

    with Server(create_app(holder, KeyStore(db), db=db, workers=2, queue=16)) as server:
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
