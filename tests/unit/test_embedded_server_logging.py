"""The embedded HTTP server (the deploy stage's smoke test) leaves the process's logging as it found it: uvicorn's
own logging configuration closed every handler, among them Prefect's API log handler in a flow run (whose close
waited about 5 s for its queue)."""

from __future__ import annotations

import logging

import httpx
from fastapi import FastAPI

from voxelflow.serving.serve_server import Server


class Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.closed, self.records = False, []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())

    def close(self) -> None:
        self.closed = True
        super().close()


def test_a_handler_of_the_process_outlives_an_embedded_server():
    app = FastAPI()

    @app.get("/ping")
    def ping() -> dict:
        return {"ok": True}

    kept, flow_log = Kept(), logging.getLogger("a.flow.run")
    flow_log.addHandler(kept)
    flow_log.setLevel(logging.INFO)
    try:
        with Server(app) as server:
            assert httpx.get(f"{server.url}/ping", timeout=10).json() == {"ok": True}
        flow_log.info("after the smoke test")
        assert not kept.closed and kept.records == ["after the smoke test"]
        assert kept in logging.getLogger("a.flow.run").handlers
    finally:
        flow_log.removeHandler(kept)
