"""The health and metrics routes: ``GET /health/live`` and ``/health/ready`` (no key; coroutines, answered on the
event loop, never queued behind the threadpool, the database or the model) and ``GET /metrics`` (role viewer)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from voxelflow.serving.api.deps import AUTH_ERRORS, Authentication
from voxelflow.serving.api.metrics import ServiceMetrics
from voxelflow.serving.serve_model import ModelHolder


def router(holder: ModelHolder, auth: Authentication, telemetry: ServiceMetrics) -> APIRouter:
    """The probes and ``/metrics``."""
    routes = APIRouter()

    # GET /health/live is answered by access.Probes before any middleware or routing; this route documents it
    @routes.get("/health/live", summary="the process answers (no key)")
    async def live() -> dict[str, str]:
        return {"status": "ok"}

    @routes.get("/health/ready", summary="a model is loaded (no key)", responses={503: {
        "description": "loading", "content": {"application/json": {"schema": {"type": "object"}}}}})
    async def ready(response: Response) -> dict[str, Any]:
        failed = holder.failure
        if holder.segmenter is None:
            response.status_code = 503
            return {"status": "loading", "error": holder.summary}  # what failed; why is behind a key
        about: dict[str, Any] = {"status": "ready", "model_version": holder.version}
        if failed is not None:  # a hot swap failed: the model loaded before keeps serving
            about["swap_failed"] = {"version": failed["version"], "error": holder.summary}
        return about

    @routes.get("/metrics", summary="Prometheus metrics (role viewer)", responses=AUTH_ERRORS,
                response_class=PlainTextResponse, dependencies=[Depends(auth.require("metrics"))])
    async def metrics() -> Response:
        return Response(generate_latest(telemetry.registry), media_type=CONTENT_TYPE_LATEST)

    return routes
