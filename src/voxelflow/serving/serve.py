"""The inference service: FastAPI on the champion model, API keys with roles, throttling, metrics.

``POST /v1/segment`` takes a volume (NIfTI, optionally gzipped, or ``.npy``) and returns the
mask in the same format and grid. Every route but ``/health/live`` and ``/health/ready`` needs
an API key (``X-API-Key``), ``/metrics`` included. Inference runs on a bounded pool of its own
behind a bounded queue: a full queue is answered 503 at once, a request over the time limit 504,
and the probes answer on the event loop, never waiting for a worker, the database or the model.

:func:`create_app` wires the parts: ``serve_keys`` (keys and roles), ``serve_volumes`` (formats, header checks,
the memory budget), ``serve_guard`` (throttles, denials), ``serve_model`` (the model holder), ``serve_server``
(uvicorn, trusted proxies), and the HTTP layer in ``api``: its dependencies (``api.deps``: keys, admission, limits),
its routers (``api.predict``, ``api.model``, ``api.health``), its metrics (``api.metrics``) and the request log
(``api.access``). Their public names are importable from here.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from fastapi import FastAPI

from voxelflow.core.db import Database
from voxelflow.serving.api import health, model, predict
from voxelflow.serving.api.access import ROUTES, Logged, Probes, RequestLog, request_id_of
from voxelflow.serving.api.deps import Admission, Authentication, Limits
from voxelflow.serving.api.metrics import ServiceMetrics, SwapFailures
from voxelflow.serving.serve_gpu import GpuSlots, workers_for
from voxelflow.serving.serve_guard import Denials, Throttle
from voxelflow.serving.serve_keys import LEGACY_ROLES, ROLES, KeyCache, KeyStore, Principal
from voxelflow.serving.serve_model import ModelHolder, failure_summary
from voxelflow.serving.serve_server import Server, free_port, proxy_options, trusted_networks
from voxelflow.serving.serve_volumes import (
    BODY_TYPES,
    NIFTI,
    NPY,
    VOLUME_STATUS,
    declared_volume,
    decode_volume,
    encode_mask,
    nifti_gz,
    working_set_bytes,
)

__all__ = ["BODY_TYPES", "LEGACY_ROLES", "NIFTI", "NPY", "ROLES", "ROUTES", "VOLUME_STATUS", "Denials", "KeyCache", "KeyStore",
           "ModelHolder", "Principal", "Probes", "Server", "SwapFailures", "Throttle", "create_app",
           "declared_volume", "decode_volume", "encode_mask", "failure_summary", "free_port", "nifti_gz",
           "proxy_options", "trusted_networks", "working_set_bytes"]

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
    key_ttl_s: float = 5.0,
    key_miss_s: float = 0.5,
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
    Keys are verified from an in-memory copy of their digests (:class:`KeyCache`): an expired key is refused at
    once, a revoked one within ``key_ttl_s`` seconds, a key created elsewhere is accepted within ``key_miss_s``,
    and unknown keys cost at most one database query per ``key_miss_s``.
    """
    workers = workers_for(workers, len(gpus), per_gpu, os.cpu_count() or 1)
    gpu_slots = GpuSlots(gpus, per_gpu) if gpus else None
    queue = workers if queue is None else queue
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="voxelflow-infer")

    throttle = Throttle(rate, burst, max_clients)
    failures = Throttle(failed_rate, failed_burst, max_clients)
    auth = Authentication(KeyCache(keys, key_ttl_s, key_miss_s), throttle, failures,
                          Denials(db, max_addresses=max_clients))
    admission = Admission(holder, workers, queue)
    limits = Limits(holder, max_bytes, max_voxels, memory_budget, timeout_s, gpu_slots)
    metrics = ServiceMetrics(holder, throttle, failures, gpu_slots, gpus)
    inference = predict.Inference(holder, metrics, max_voxels, gpu_slots)

    app = FastAPI(title="voxelflow inference", version="1", docs_url="/docs" if docs else None, redoc_url=None,
                  openapi_url="/openapi.json" if docs else None)
    app.state.pool = pool
    request_log = RequestLog(metrics)
    app.add_middleware(Logged, request_log=request_log)
    # in the documented order: the probes and /metrics, the model, prediction, reloading
    app.include_router(health.router(holder, auth, metrics))
    app.include_router(model.about_router(holder, auth, describe))
    app.include_router(predict.router(pool, inference, auth, admission, limits))
    app.include_router(model.reload_router(holder, auth, db))

    @app.on_event("shutdown")
    def _stop_pool() -> None:
        pool.shutdown(wait=False, cancel_futures=True)

    return Probes(app, request_id_of, request_log.answered)
