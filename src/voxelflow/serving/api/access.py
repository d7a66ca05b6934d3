"""Each request's id, access-log line and metrics (a plain ASGI middleware; an unhandled error answered 500 with
the request id logged), and :class:`Probes`, which answers ``GET /health/live`` before any middleware or routing."""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any, Callable

from fastapi import FastAPI

from voxelflow.core.redact import redact
from voxelflow.serving.api.metrics import ServiceMetrics

log = logging.getLogger("voxelflow.serving.serve")  # the service's one logger, whichever module logs

#: the routes metrics name; any other path is counted as ``other``
ROUTES = ("/health/live", "/health/ready", "/metrics", "/v1/model", "/v1/segment", "/v1/reload", "/docs",
          "/openapi.json")


def request_id_of(given: str) -> str:
    """The client's ``X-Request-ID`` when it is a plausible one (1-64 letters, digits, dashes), else a new one."""
    return given if 0 < len(given) <= 64 and given.replace("-", "").isalnum() else uuid.uuid4().hex


class RequestLog:
    """An id on every answer (``X-Request-ID``), its route, status and role counted, its time measured and one JSON
    log line with the key's name (never the key); :class:`Logged` is the ASGI middleware that does it."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics

    def answered(self, rid: str, method: str, route: str, status: int, role: str | None, who: str | None,
                 seconds: float) -> None:
        self.metrics.requests.labels(route, str(status), role or "none").inc()
        self.metrics.request_seconds.labels(route).observe(seconds)
        log.info(json.dumps({"request_id": rid, "method": method, "route": route, "status": status,
                             "ms": round(seconds * 1000, 1), "key": who}))


class Logged:
    """The plain ASGI middleware of a :class:`RequestLog` (``app.add_middleware(Logged, request_log=...)``): it
    only wraps ``send``, so a body streams through untouched (no task or memory stream per message, as a
    ``BaseHTTPMiddleware`` has). An unhandled error is answered 500 with the request id logged (credentials in
    URLs masked)."""

    FAILED = b'{"detail": "internal error"}'

    def __init__(self, app: Any, request_log: RequestLog) -> None:
        self.app, self.request_log = app, request_log

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"").decode("latin-1")
        rid = request_id_of(given)
        state = scope.setdefault("state", {})
        state["role"] = state["who"] = None
        start = time.perf_counter()
        status: list[int] = []

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:  # noqa: BLE001 - logged with the request id (credentials in URLs masked), answered 500
            import traceback

            log.error(json.dumps({"request_id": rid, "route": scope["path"], "error": "unhandled",
                                  "traceback": redact(traceback.format_exc())}))
            if not status:  # nothing sent yet: the answer is a 500 (else the connection ends mid-answer)
                await send_with_id({"type": "http.response.start", "status": 500, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(self.FAILED)).encode())]})
                await send({"type": "http.response.body", "body": self.FAILED})
        route = scope["path"] if scope["path"] in ROUTES else "other"
        self.request_log.answered(rid, scope["method"], route, status[0] if status else 500, state.get("role"),
                          state.get("who"), time.perf_counter() - start)


class Probes:
    """The service's ASGI app: ``GET /health/live`` answered at once, with as little work on the event loop as
    an answer takes (no middleware, routing or thread), so a busy process still says it is alive; every
    other request goes to the FastAPI app."""

    LIVE = b'{"status":"ok"}'

    def __init__(self, app: FastAPI, request_id_of: Callable[[str], str], answered: Callable[..., None]) -> None:
        self.app, self.request_id_of, self.answered = app, request_id_of, answered

    def __getattr__(self, name: str) -> Any:  # the FastAPI app's state, routes, openapi()
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != "/health/live" or scope["method"] != "GET":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        given = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"").decode("latin-1")
        rid = self.request_id_of(given)
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(self.LIVE)).encode()),
            (b"x-request-id", rid.encode())]})
        await send({"type": "http.response.body", "body": self.LIVE})
        self.answered(rid, "GET", "/health/live", 200, None, None, time.perf_counter() - start)
