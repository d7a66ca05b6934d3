"""The inference service: FastAPI on the champion model, API keys with roles, throttling, metrics.

``POST /v1/segment`` takes a volume (NIfTI, optionally gzipped, or ``.npy``) and returns the
mask in the same format and grid. Every route but ``/health/live`` and ``/health/ready`` needs
an API key (``X-API-Key``), ``/metrics`` included. Inference runs on a bounded pool of its own
behind a bounded queue: a full queue is answered 503 at once, a request over the time limit 504,
and the probes answer on the event loop, never waiting for a worker, the database or the model.

The parts live in ``serve_keys`` (keys and roles), ``serve_volumes`` (formats, header checks, the
memory budget), ``serve_guard`` (throttles, denials), ``serve_model`` (the model holder) and
``serve_server`` (uvicorn, trusted proxies); their public names are importable from here.
"""

from __future__ import annotations

import json
import math
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np
from fastapi import FastAPI, Header, HTTPException, Request, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from voxelflow.core import audit
from voxelflow.core.db import Database
from voxelflow.core.redact import redact
from voxelflow.data.formats import VolumeError
from voxelflow.serving.serve_gpu import RETRY_AFTER_OOM, GpuSlots, out_of_memory, recover, workers_for
from voxelflow.serving.serve_guard import Denials, Throttle
from voxelflow.serving.serve_keys import LEGACY_ROLES, ROLES, KeyStore, Principal
from voxelflow.serving.serve_model import ModelHolder, failure_summary
from voxelflow.serving.serve_server import Server, free_port, proxy_options, trusted_networks
from voxelflow.serving.serve_volumes import (
    BODY_TYPES,
    NIFTI,
    NPY,
    VOLUME_STATUS,
    declared_volume,
    decode_volume,
    device_working_set_bytes,
    encode_mask,
    model_grid_voxels,
    nifti_gz,
    working_set_bytes,
)

__all__ = ["BODY_TYPES", "LEGACY_ROLES", "NIFTI", "NPY", "ROLES", "ROUTES", "VOLUME_STATUS", "Denials", "KeyStore",
           "ModelHolder", "Principal", "Server", "Throttle", "create_app", "declared_volume", "decode_volume",
           "encode_mask", "failure_summary", "free_port", "nifti_gz", "proxy_options", "trusted_networks",
           "working_set_bytes"]


def create_app(
    holder: ModelHolder,
    keys: KeyStore,
    db: Database | None = None,
    max_bytes: int = 256 * 1024**2,
    max_voxels: int = 512**3,
    rate: float = 10.0,
    burst: int = 20,
    workers: int | None = None,
    queue: int | None = None,
    timeout_s: float = 120.0,
    docs: bool = False,
    describe: Callable[[], dict[str, Any]] | None = None,
    failed_rate: float = 1.0,
    failed_burst: int = 10,
    memory_budget: int | None = 8 * 1024**3,
    max_clients: int = 10000,
    gpus: Sequence[str] = (),
    per_gpu: int = 1,
):
    """The service's ASGI app.

    ``workers`` inferences run at once on a pool of their own (default: one per core) and
    ``queue`` more may wait (default: as many as workers); beyond that a request gets 503 with
    Retry-After at once. ``timeout_s`` bounds one request (504). ``docs`` serves /docs and
    /openapi.json (off by default). ``describe`` returns what ``GET /v1/model`` shows.
    A request with a valid key is throttled per key (``rate`` a second, bursts of ``burst``) and
    never for other requests' failures; a request whose key is unknown, expired or lacks the role
    is, after the lookup, throttled per client address (``failed_rate`` a second, bursts of
    ``failed_burst``; the address is the peer's, or the one a trusted proxy forwarded) and audited
    in aggregate. Each throttle keeps at most ``max_clients`` buckets (the least recently used go).
    ``memory_budget`` bounds one inference's memory (bytes), estimated from the body's header before
    any voxel is read or inflated (:func:`working_set_bytes`); a volume over it is refused 413.
    With ``gpus`` (``cuda:0``...; the holder's ``replicas`` hold the model on each), each GPU runs at most
    ``per_gpu`` inferences at once (the default for ``workers`` is then one per GPU slot), a request takes the
    GPU running the fewest, and a volume whose windows alone would not fit in one inference's share of a GPU's
    memory is refused 413 too. An inference that runs out of memory on a GPU is answered 503 with Retry-After,
    and its memory is handed back before the worker takes the next request.
    """
    import asyncio
    import logging
    import os
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    from prometheus_client import Gauge

    workers = workers_for(workers, len(gpus), per_gpu, os.cpu_count() or 1)
    gpu_slots = GpuSlots(gpus, per_gpu) if gpus else None
    queue = workers if queue is None else queue
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="voxelflow-infer")
    slots = threading.BoundedSemaphore(workers + queue)
    log = logging.getLogger("voxelflow.serving.serve")

    registry = CollectorRegistry()
    requests = Counter("voxelflow_requests", "Requests by route, status and role", ["route", "status", "role"],
                       registry=registry)
    request_seconds = Histogram("voxelflow_request_seconds", "Whole request time by route", ["route"],
                                registry=registry, buckets=(0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
    latency = Histogram("voxelflow_inference_seconds", "Inference time per volume", registry=registry,
                        buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
    waiting = Gauge("voxelflow_queue_depth", "Requests admitted and waiting for an inference worker",
                    registry=registry)
    in_flight = Gauge("voxelflow_inference_in_flight", "Inferences running now", registry=registry)
    out_of_memory_total = Counter("voxelflow_inference_out_of_memory", "Inferences that ran out of device "
                                  "memory (answered 503)", registry=registry)
    if gpu_slots is not None:
        on_gpu = Gauge("voxelflow_gpu_inferences", "Inferences running on each GPU now", ["device"],
                       registry=registry)
        for device in gpus:
            on_gpu.labels(device).set_function(lambda device=device: gpu_slots.in_use[device])
    served = Gauge("voxelflow_model_version", "Version of the model being served", registry=registry)
    served.set_function(lambda: float(holder.version) if str(holder.version or "").isdigit() else -1.0)
    swaps = Gauge("voxelflow_model_swaps", "Models hot-swapped in since start", registry=registry)
    swaps.set_function(lambda: holder.swaps)
    registry.register(SwapFailures(holder))
    throttle = Throttle(rate, burst, max_clients)
    failures = Throttle(failed_rate, failed_burst, max_clients)
    denials = Denials(db, max_addresses=max_clients)
    buckets = Gauge("voxelflow_throttle_buckets", "Token buckets held, per key and per failing client (bounded)",
                    ["kind"], registry=registry)
    buckets.labels("key").set_function(lambda: len(throttle))
    buckets.labels("failed").set_function(lambda: len(failures))
    app = FastAPI(title="voxelflow inference", version="1", docs_url="/docs" if docs else None, redoc_url=None,
                  openapi_url="/openapi.json" if docs else None)
    app.state.pool = pool

    def request_id_of(given: str) -> str:
        return given if 0 < len(given) <= 64 and given.replace("-", "").isalnum() else uuid.uuid4().hex

    def answered(rid: str, method: str, route: str, status: int, role: str | None, who: str | None,
                 seconds: float) -> None:
        requests.labels(route, str(status), role or "none").inc()
        request_seconds.labels(route).observe(seconds)
        log.info(json.dumps({"request_id": rid, "method": method, "route": route, "status": status,
                             "ms": round(seconds * 1000, 1), "key": who}))

    @app.middleware("http")
    async def request_id(request: Request, call_next):
        rid = request_id_of(request.headers.get("x-request-id", ""))
        request.state.role = request.state.who = None
        start = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:  # noqa: BLE001 - logged with the request id (credentials in URLs masked), answered 500
            import traceback

            log.error(json.dumps({"request_id": rid, "route": request.url.path, "error": "unhandled",
                                  "traceback": redact(traceback.format_exc())}))
            response = Response('{"detail": "internal error"}', status_code=500, media_type="application/json")
        route = request.url.path if request.url.path in ROUTES else "other"
        response.headers["X-Request-ID"] = rid
        answered(rid, request.method, route, response.status_code, request.state.role, request.state.who,
                 time.perf_counter() - start)
        return response

    def client_address(request: Request) -> str:
        """The peer, or the client a trusted proxy forwarded (uvicorn's ``forwarded_allow_ips``)."""
        return request.client.host[:64] if request.client else "unknown"

    def authorize(request: Request, key: str | None, permission: str) -> Principal:
        if not key and request.headers.get("authorization", "").lower().startswith("bearer "):
            key = request.headers["authorization"][7:].strip()  # what Prometheus' scrape config can send
        who = keys.lookup(key)
        if who is None or not any(permission in ROLES[r] for r in who.roles):
            # only now, after the lookup, are failures throttled, per client: a valid key never waits for them
            address, endpoint = client_address(request), request.url.path
            wait = failures.allow(address)
            denials.record(address, 429 if wait else 401 if who is None else 403, endpoint)
            if wait:
                raise HTTPException(429, "too many failed requests from this client",
                                    headers={"Retry-After": str(max(1, math.ceil(wait)))})
            if who is None:
                raise HTTPException(401, "missing, unknown or expired API key (send it in the X-API-Key header)")
            raise HTTPException(403, f"key {who.name!r} ({', '.join(who.roles)}) may not {permission}")
        request.state.role = ",".join(who.roles)
        request.state.who = who.name
        wait = throttle.allow(who.name)
        if wait:
            raise HTTPException(429, f"too many requests for key {who.name!r}",
                                headers={"Retry-After": str(max(1, math.ceil(wait)))})
        return who

    async def authorized(request: Request, key: str | None, permission: str) -> Principal:
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(authorize, request, key, permission)  # a database lookup: off the loop

    def refusal(description: str, detail: dict[str, Any] | None = None) -> dict[str, Any]:
        """An error response as OpenAPI documents it: JSON with a ``detail``."""
        schema = {"type": "object", "required": ["detail"], "properties": {"detail": detail or {"type": "string"}}}
        return {"description": description, "content": {"application/json": {"schema": schema}}}

    errors = {401: refusal("missing, unknown or expired key"), 403: refusal("role not allowed"),
              429: refusal("throttled (Retry-After)")}
    binary = {"schema": {"type": "string", "format": "binary"}}

    # the probes are coroutines: they answer on the event loop, never queued behind the threadpool
    # (key lookups, the registry), the database or the model; GET /health/live is answered by
    # Probes before any middleware or routing, this route documents it
    @app.get("/health/live", summary="the process answers (no key)")
    async def live() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/health/ready", summary="a model is loaded (no key)", responses={503: {
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

    @app.get("/metrics", summary="Prometheus metrics (role viewer)", responses=errors,
             response_class=PlainTextResponse)
    async def metrics(request: Request, x_api_key: str | None = Header(None)) -> Response:
        await authorized(request, x_api_key, "metrics")
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/model", summary="the served model: version, aliases, gates, lineage (role viewer)",
             responses=errors)
    async def model(request: Request, x_api_key: str | None = Header(None)) -> dict[str, Any]:
        from starlette.concurrency import run_in_threadpool

        await authorized(request, x_api_key, "model")
        about = {"version": holder.version, "ready": holder.segmenter is not None, "swaps": holder.swaps,
                 "swap_failures": holder.swap_failures, "swap_failed": holder.failure}
        if describe is not None:
            try:
                about.update(await run_in_threadpool(describe))
            except Exception as exc:  # noqa: BLE001 - the registry may be away; the model still serves
                about["registry_error"] = redact(f"{type(exc).__name__}: {exc}")[:300]
        return about

    @app.post("/v1/segment", summary="segment a volume (role predictor)", responses={
        200: {"description": "the mask in the input's format and grid; with summary=true, each label's volume in mL",
              "content": {NPY: binary, NIFTI: binary, "application/json": {"schema": {"type": "object"}}}},
        **errors, 400: refusal("not a volume"),
        413: refusal("body, voxel count or memory budget over the limit"),
        415: refusal("Content-Type is not a volume's"),
        422: refusal("not a finite numeric 3-D volume, or a bad query parameter",
                     {"anyOf": [{"type": "string"}, {"type": "array"}]}),
        503: refusal("busy, loading or out of GPU memory (Retry-After)"), 504: refusal("over the time limit")},
        openapi_extra={"requestBody": {"required": True, "description": "a NIfTI (.nii, .nii.gz) or .npy volume",
                                       "content": {media: binary for media in BODY_TYPES}}})
    async def segment(request: Request, summary: bool = False, x_api_key: str | None = Header(None)) -> Response:
        await authorized(request, x_api_key, "segment")
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media and media not in BODY_TYPES:
            raise HTTPException(415, f"Content-Type {media!r} is not a volume: send one of {', '.join(BODY_TYPES)}")
        if holder.segmenter is None:
            raise HTTPException(503, "model not loaded yet", headers={"Retry-After": "5"})
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise HTTPException(413, f"body of {declared} bytes exceeds the limit of {max_bytes}")
        if not slots.acquire(blocking=False):  # pool and queue full: say so now, do not queue more
            raise HTTPException(503, "busy: every inference worker and queue place is taken",
                                headers={"Retry-After": "1"})
        released = False
        try:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise HTTPException(413, f"body exceeds the limit of {max_bytes} bytes")
                chunks.append(chunk)
            body, content_type = b"".join(chunks), request.headers.get("content-type", "")
            if body and (memory_budget is not None or gpu_slots is not None):
                check_budget(body, content_type)
            waiting.inc()
            future = pool.submit(infer, body, content_type, summary)
            future.add_done_callback(lambda _: slots.release())  # the slot frees when the work really ends
            released = True
            try:
                return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
            except asyncio.TimeoutError:
                raise HTTPException(504, f"inference took longer than {timeout_s:g} s") from None
        finally:
            if not released:
                slots.release()

    def check_budget(body: bytes, content_type: str) -> None:
        try:
            shape, dtype, spacing = declared_volume(body, content_type)
        except VolumeError:
            return  # no readable header: decoding says what is wrong with it
        if math.prod(shape) > max_voxels:
            return  # decoding refuses it from the header (413, too-large)
        if not all(math.isfinite(s) and s > 0 for s in spacing):
            raise HTTPException(422, "cannot decode the volume: bad-affine: the header's voxel spacing is not "
                                     f"finite and positive ({', '.join(f'{s:g}' for s in spacing)})")
        config = getattr(holder.segmenter, "config", None)
        need = working_set_bytes(shape, dtype, spacing, config)
        if memory_budget is not None and need > memory_budget:
            raise HTTPException(413, f"a volume of shape {list(shape)} ({dtype}) needs about {need / 2**20:.0f} MiB "
                                     f"to segment, over the per-request budget of {memory_budget / 2**20:.0f} MiB")
        replicas = holder.replicas
        if gpu_slots is not None and replicas:  # the least a GPU must hold: the windows (stitching on the CPU)
            share = min(r.share_bytes for r in replicas.values())
            device_need = device_working_set_bytes(model_grid_voxels(shape, spacing, config), config, stitched=False)
            if device_need > share:
                raise HTTPException(413, f"a volume of shape {list(shape)} needs about {device_need / 2**20:.0f} MiB "
                                         f"of GPU memory to segment, over the {share / 2**20:.0f} MiB budget one "
                                         "inference has on a GPU")

    def infer(body: bytes, content_type: str, summary: bool) -> Response:
        waiting.dec()
        in_flight.inc()
        try:
            try:
                return _infer(body, content_type, summary)
            except HTTPException as exc:
                return Response(json.dumps({"detail": exc.detail}), status_code=exc.status_code,
                                media_type="application/json")
            except Exception as exc:
                if not out_of_memory(exc):
                    raise
            # out of memory: the failed inference's tensors went with the traceback; its cached blocks go back
            recover()
            out_of_memory_total.inc()
            log.warning(json.dumps({"event": "inference.out_of_memory", "model_version": holder.version}))
            return Response(json.dumps({"detail": "the inference ran out of device memory; try again"}),
                            status_code=503, media_type="application/json",
                            headers={"Retry-After": str(RETRY_AFTER_OOM)})
        finally:
            in_flight.dec()

    def _infer(body: bytes, content_type: str, summary: bool) -> Response:
        if not body:
            raise HTTPException(400, "empty body: send a NIfTI (.nii/.nii.gz) or .npy volume")
        try:
            volume, affine, fmt = decode_volume(body, content_type, max_voxels)
        except VolumeError as exc:  # the client's input: the header is checked before anything is allocated
            raise HTTPException(VOLUME_STATUS.get(exc.reason, 400), f"cannot decode the volume: {exc}") from None
        with holder.lock:
            segmenter, version, replicas = holder.segmenter, holder.version, holder.replicas
        start = time.perf_counter()
        if gpu_slots is None or not replicas:
            mask = segmenter.segment(volume, affine)
        else:
            with gpu_slots.take() as device:  # the GPU running the fewest inferences, its replica of the model
                mask = replicas[device].segmenter.segment(volume, affine)
        latency.observe(time.perf_counter() - start)
        headers = {"X-Model-Version": str(version)}
        if summary:
            spacing = np.sqrt((affine[:3, :3] ** 2).sum(0)) if affine is not None else np.ones(3)
            ml = float(np.prod(spacing)) / 1000.0
            labels, counts = np.unique(mask, return_counts=True)
            volumes = {str(int(v)): round(float(c) * ml, 3) for v, c in zip(labels, counts) if v != 0}
            return Response(json.dumps({"model_version": version, "voxel_ml": ml, "volumes_ml": volumes,
                                        "shape": list(mask.shape)}), media_type="application/json", headers=headers)
        payload, media = encode_mask(mask, affine, fmt)
        return Response(payload, media_type=media, headers=headers)

    @app.post("/v1/reload", summary="load the alias's model again (role operator)", responses={
        **errors, 503: refusal("the model could not be loaded; the one loaded before keeps serving (Retry-After)")})
    async def reload(request: Request, x_api_key: str | None = Header(None)) -> dict[str, Any]:
        from starlette.concurrency import run_in_threadpool

        who = await authorized(request, x_api_key, "reload")
        try:
            version = await run_in_threadpool(holder.reload)
        except Exception as exc:  # noqa: BLE001 - the registry or the store is away: say so, keep serving
            raise HTTPException(503, f"the model could not be loaded ({redact(str(exc))[:300]}); still serving "
                                     f"version {holder.version}", headers={"Retry-After": "30"}) from None
        if db is not None:
            await run_in_threadpool(audit.append, db, "service.reloaded", who.name, model_version=version)
        return {"model_version": version}

    @app.on_event("shutdown")
    def _stop_pool() -> None:
        pool.shutdown(wait=False, cancel_futures=True)

    return Probes(app, request_id_of, answered)


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


class SwapFailures:
    """``voxelflow_model_swap_failures_total``: the holder's failed loads, read when scraped."""

    def __init__(self, holder: ModelHolder) -> None:
        self.holder = holder

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        yield CounterMetricFamily("voxelflow_model_swap_failures", "Model loads that failed (the model loaded "
                                  "before, if any, kept serving)", value=self.holder.swap_failures)


ROUTES = ("/health/live", "/health/ready", "/metrics", "/v1/model", "/v1/segment", "/v1/reload", "/docs",
          "/openapi.json")
