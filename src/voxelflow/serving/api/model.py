"""The model routes: ``GET /v1/model`` says what is served (role viewer), ``POST /v1/reload`` loads the alias's
model again (role operator). Two routers, so the app lists its routes in their documented order."""

from __future__ import annotations

from typing import Any, Callable

from fastapi import APIRouter, Depends, HTTPException
from starlette.concurrency import run_in_threadpool

from voxelflow.core import audit
from voxelflow.core.db import Database
from voxelflow.core.redact import redact
from voxelflow.serving.api.deps import AUTH_ERRORS, Authentication, refusal
from voxelflow.serving.serve_keys import Principal
from voxelflow.serving.serve_model import ModelHolder


def about_router(holder: ModelHolder, auth: Authentication,
                 describe: Callable[[], dict[str, Any]] | None = None) -> APIRouter:
    """``GET /v1/model``: the version, whether it is ready, hot swaps, and what ``describe`` adds (aliases, gates,
    lineage: the registry's; an error reading it is shown, the model still serves)."""
    routes = APIRouter()

    @routes.get("/v1/model", summary="the served model: version, aliases, gates, lineage (role viewer)",
                responses=AUTH_ERRORS, dependencies=[Depends(auth.require("model"))])
    async def model() -> dict[str, Any]:
        about = {"version": holder.version, "ready": holder.segmenter is not None, "swaps": holder.swaps,
                 "swap_failures": holder.swap_failures, "swap_failed": holder.failure}
        if describe is not None:
            try:
                about.update(await run_in_threadpool(describe))
            except Exception as exc:  # noqa: BLE001 - the registry may be away; the model still serves
                about["registry_error"] = redact(f"{type(exc).__name__}: {exc}")[:300]
        return about

    return routes


def reload_router(holder: ModelHolder, auth: Authentication, db: Database | None = None) -> APIRouter:
    """``POST /v1/reload``: the holder loads its model again, audited with the key's name; a load that fails is
    answered 503 and the model loaded before keeps serving."""
    routes = APIRouter()

    @routes.post("/v1/reload", summary="load the alias's model again (role operator)", responses={
        **AUTH_ERRORS,
        503: refusal("the model could not be loaded; the one loaded before keeps serving (Retry-After)")})
    async def reload(who: Principal = Depends(auth.require("reload"))) -> dict[str, Any]:
        try:
            version = await run_in_threadpool(holder.reload)
        except Exception as exc:  # noqa: BLE001 - the registry or the store is away: say so, keep serving
            raise HTTPException(503, f"the model could not be loaded ({redact(str(exc))[:300]}); still serving "
                                     f"version {holder.version}", headers={"Retry-After": "30"}) from None
        if db is not None:
            await run_in_threadpool(audit.append, db, "service.reloaded", who.name, model_version=version)
        return {"model_version": version}

    return routes
