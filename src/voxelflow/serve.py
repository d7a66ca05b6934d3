"""The inference service: FastAPI on the champion model, API keys with roles, throttling, metrics.

``POST /v1/segment`` takes a volume (NIfTI, optionally gzipped, or ``.npy``) and returns the
mask in the same format and grid. Every route but ``/health/live`` and ``/health/ready`` needs
an API key (``X-API-Key``), ``/metrics`` included. Inference runs on a bounded pool of its own
behind a bounded queue: a full queue is answered 503 at once, a request over the time limit 504,
and the event loop (health, auth) never waits for a model.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from fastapi import FastAPI, Header, HTTPException, Request, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from sqlalchemy import delete, insert, select

from voxelflow import audit
from voxelflow.db import Database, api_keys, now
from voxelflow.formats import VolumeError

#: what each role may do; admin may do everything
ROLES = {
    "viewer": {"model", "metrics"},
    "predictor": {"model", "metrics", "segment"},
    "operator": {"model", "metrics", "reload"},
    "admin": {"model", "metrics", "segment", "reload", "keys"},
}
LEGACY_ROLES = {"predict": "predictor"}  # keys made before the four roles
NPY = "application/x-npy"
NIFTI = "application/gzip"
#: what /v1/segment accepts (or no Content-Type at all: the format is known from the body's first bytes)
BODY_TYPES = (NPY, NIFTI, "application/x-gzip", "application/octet-stream", "application/x-nifti")


@dataclass(frozen=True)
class Principal:
    name: str
    roles: tuple[str, ...]


class KeyStore:
    """API keys in the shared database, stored as SHA-256 digests; the key itself is shown once."""

    def __init__(self, db: Database) -> None:
        self.db = db

    @staticmethod
    def _digest(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()

    @staticmethod
    def normalise(roles: list[str]) -> list[str]:
        roles = [LEGACY_ROLES.get(r, r) for r in roles]
        bad = sorted(set(roles) - set(ROLES))
        if bad or not roles:
            raise ValueError(f"unknown role(s) {bad or roles}: choose from {', '.join(ROLES)}")
        return sorted(set(roles))

    def create(self, name: str, roles: list[str], expires_days: float | None = None) -> str:
        """A new random key for ``name``; only its digest is stored."""
        from datetime import timedelta

        roles = self.normalise(roles)
        if expires_days is not None and expires_days <= 0:
            raise ValueError("expires_days must be positive")
        key = "vf_" + secrets.token_urlsafe(32)
        created = now()
        expires = created + timedelta(days=expires_days) if expires_days is not None else None
        with self.db.transaction() as conn:
            conn.execute(insert(api_keys).values(digest=self._digest(key), name=name, roles=json.dumps(roles),
                                                 created=created, expires=expires))
        return key

    def revoke(self, key: str) -> bool:
        """Remove a key; True if it existed."""
        with self.db.transaction() as conn:
            return conn.execute(delete(api_keys).where(api_keys.c.digest == self._digest(key))).rowcount > 0

    def revoke_name(self, name: str) -> int:
        """Remove every key of ``name``; how many there were."""
        with self.db.transaction() as conn:
            return conn.execute(delete(api_keys).where(api_keys.c.name == name)).rowcount

    def list(self) -> list[dict[str, Any]]:
        """Every key's name, roles, creation and expiry (never the key or its digest)."""
        with self.db.transaction() as conn:
            rows = conn.execute(select(api_keys).order_by(api_keys.c.name, api_keys.c.created)).all()
        return [{"name": r.name, "roles": json.loads(r.roles), "created": _aware(r.created).isoformat(),
                 "expires": _aware(r.expires).isoformat() if r.expires else None,
                 "expired": r.expires is not None and _aware(r.expires) <= now()} for r in rows]

    def lookup(self, key: str | None) -> Principal | None:
        if not key:
            return None
        with self.db.transaction() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.digest == self._digest(key))).first()
        if row is None or (row.expires is not None and _aware(row.expires) <= now()):
            return None
        return Principal(row.name, tuple(sorted({LEGACY_ROLES.get(r, r) for r in json.loads(row.roles)})))


def _aware(when):
    """SQLite hands datetimes back without their zone; they were written in UTC."""
    from datetime import timezone

    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


class Throttle:
    """A token bucket per key: ``rate`` requests a second, bursts of ``burst``."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def peek(self, who: str) -> float:
        """The seconds ``who`` would have to wait now (0 when a request would pass), spending nothing."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(who, (float(self.burst), now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        return 0.0 if tokens >= 1 else (1 - tokens) / self.rate

    def allow(self, who: str) -> float:
        """0 when allowed, else the seconds to wait."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(who, (float(self.burst), now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1:
                self._buckets[who] = (tokens - 1, now)
                return 0.0
            self._buckets[who] = (tokens, now)
            return (1 - tokens) / self.rate


class ModelHolder:
    """The loaded model and its version; ``reload`` swaps it in without dropping requests."""

    def __init__(self, loader: Callable[[], tuple[Any, str]]) -> None:
        self.loader = loader
        self.segmenter: Any = None
        self.version: str | None = None
        self.error: str | None = None
        self.swaps = 0  # models swapped in after the first
        self.lock = threading.Lock()

    def reload(self) -> str | None:
        try:
            segmenter, version = self.loader()
        except Exception as exc:  # noqa: BLE001 - reported through /health/ready
            self.error = str(exc)
            raise
        with self.lock:  # loaded aside, swapped in one step: requests see the old model or the new one
            if self.segmenter is not None and version != self.version:
                self.swaps += 1
            self.segmenter, self.version, self.error = segmenter, version, None
        return version

    def watch(self, current: Callable[[], str | None], interval: float) -> threading.Event:
        """Poll ``current()`` (the alias's version) and reload when it differs; set the event to stop."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(interval):
                try:
                    wanted = current()
                    if wanted is not None and wanted != self.version:
                        self.reload()
                except Exception:  # noqa: BLE001 - kept in self.error, shown by /health/ready
                    continue

        threading.Thread(target=loop, name="voxelflow-model-watch", daemon=True).start()
        return stop


def decode_volume(
    body: bytes, content_type: str, max_voxels: int = 512**3
) -> tuple[np.ndarray, np.ndarray | None, str]:
    """The request body as (volume, affine or None, response format).

    The header (NIfTI-1/2 or .npy) is checked first: shape, voxel type and voxel count; nothing is
    inflated or allocated beyond what it declares (:mod:`voxelflow.formats`). Raises
    :class:`~voxelflow.formats.VolumeError`.
    """
    from voxelflow.formats import read_nifti, read_npy

    if content_type.startswith(NPY) or body[:6] == b"\x93NUMPY":
        return read_npy(body, "body", max_voxels), None, "npy"
    vol = read_nifti(body, "body", max_voxels)
    return vol.array, vol.affine, "nifti"


def declared_volume(body: bytes, content_type: str) -> tuple[tuple[int, ...], np.dtype, tuple[float, ...]]:
    """Shape, voxel type and spacing (mm) a body declares, from its header alone.

    At most a NIfTI-2 header's worth of gzip is inflated; no voxel is read. Raises
    :class:`~voxelflow.formats.VolumeError` when there is no readable header.
    """
    import nibabel as nib

    from voxelflow.formats import nifti_prefix, npy_header, read_header, volume_shape

    if content_type.startswith(NPY) or body[:6] == b"\x93NUMPY":
        header, _ = npy_header(body, "body")
        return header.shape, header.dtype, (1.0, 1.0, 1.0)
    prefix = nifti_prefix(body, "body")
    header = read_header(prefix, "body")
    cls = nib.Nifti2Header if header.version == 2 else nib.Nifti1Header
    try:  # the spacing resampling will use: the affine's (sform, else qform), not pixdim, which it may contradict
        affine = cls.from_fileobj(io.BytesIO(prefix[: cls.sizeof_hdr])).get_best_affine()
    except Exception as exc:  # noqa: BLE001 - nibabel raises many kinds on corrupt headers
        raise VolumeError("unreadable", f"body: {exc}") from None
    spacing = tuple(float(s) for s in np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(0)))
    return volume_shape(header), header.dtype, spacing


def working_set_bytes(shape: tuple[int, ...], dtype: np.dtype, spacing: tuple[float, ...],
                      config: dict[str, Any] | None) -> int:
    """Memory one inference of this volume needs, from its header: per input voxel, the body (read, joined,
    decoded), about 80 bytes of float intermediates (its float copy, resampling grids there and back, the
    masks; measured on CPU at 96^3) and the logits of every channel inverted onto it; per voxel of the model's grid
    (resampled to its spacing, padded to its window), the preprocessed copies and the sliding-window logits,
    accumulator and count map of every output channel."""
    config = config or {}
    voxels = math.prod(int(s) for s in shape)
    pixdim = next((list(t["Spacingd"]["pixdim"]) for t in config.get("transforms", [])
                   if isinstance(t, dict) and "Spacingd" in t), None)
    zoom = 1.0
    if pixdim:
        pixdim = (pixdim * 3)[:3] if len(pixdim) == 1 else pixdim
        zoom = math.prod(max(float(s), 1e-6) / max(float(p), 1e-6) for s, p in zip(spacing[:3], pixdim[:3]))
    grid = max(voxels * zoom, math.prod(config.get("spatial_size", [1])))
    network = next(iter(config.get("network", {}).values()), {}) if isinstance(config.get("network"), dict) else {}
    channels = int(network.get("out_channels", 2)) if isinstance(network, dict) else 2
    per_input = 3 * np.dtype(dtype).itemsize + 80 + 8 * channels  # + the logits inverted onto the input grid
    per_grid = 4 * 2 + 4 * (2 * channels + 1) + 1  # preprocessed (two copies), logits + accumulator + count, argmax
    total = voxels * per_input + grid * per_grid
    return int(total) if math.isfinite(total) else 2**63  # an absurd spacing: more than any budget


#: how each kind of bad volume is answered
VOLUME_STATUS = {"too-large": 413, "bad-shape": 422, "bad-dtype": 422, "non-finite": 422, "bad-affine": 422}


def encode_mask(mask: np.ndarray, affine: np.ndarray | None, fmt: str) -> tuple[bytes, str]:
    if fmt == "npy":
        buf = io.BytesIO()
        np.save(buf, mask, allow_pickle=False)
        return buf.getvalue(), NPY
    return nifti_gz(mask.astype(np.uint8), affine), NIFTI


def nifti_gz(array: np.ndarray, affine: np.ndarray | None) -> bytes:
    import nibabel as nib

    img = nib.Nifti1Image(array, affine if affine is not None else np.eye(4))
    return gzip.compress(img.to_bytes(), compresslevel=1)


class Denials:
    """Denied requests per client address, audited at most once a minute per address with a count.

    A flood of bad keys from one address costs one audit record a minute, not one per request;
    at most ``max_addresses`` addresses are tracked (the oldest forgotten first).
    """

    def __init__(self, db: Database | None, window_s: float = 60.0, max_addresses: int = 10000) -> None:
        self.db, self.window_s, self.max_addresses = db, window_s, max_addresses
        self._seen: dict[str, list[float]] = {}  # address -> [window start, count not yet audited]
        self._lock = threading.Lock()

    def record(self, address: str, status: int, endpoint: str) -> None:
        t = time.monotonic()
        with self._lock:
            window = self._seen.get(address)
            if window is not None and t - window[0] < self.window_s:
                window[1] += 1
                return
            pending = int(window[1]) if window else 0
            if len(self._seen) >= self.max_addresses:
                self._seen.pop(next(iter(self._seen)))
            self._seen[address] = [t, 0]
        if self.db is not None:
            audit.append(self.db, "access.denied", address, endpoint=endpoint, status=status,
                         denied_since_last_record=pending)


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
):
    """The service's ASGI app.

    ``workers`` inferences run at once on a pool of their own (default: one per core) and
    ``queue`` more may wait (default: as many as workers); beyond that a request gets 503 with
    Retry-After at once. ``timeout_s`` bounds one request (504). ``docs`` serves /docs and
    /openapi.json (off by default). ``describe`` returns what ``GET /v1/model`` shows.
    Requests without a valid key, or with one that lacks the role, are throttled per client
    address (``failed_rate`` a second, bursts of ``failed_burst``) and audited in aggregate.
    ``memory_budget`` bounds one inference's memory (bytes), estimated from the body's header before
    any voxel is read or inflated (:func:`working_set_bytes`); a volume over it is refused 413.
    """
    import asyncio
    import logging
    import os
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    from prometheus_client import Gauge

    workers = workers or max(1, os.cpu_count() or 1)
    queue = workers if queue is None else queue
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="voxelflow-infer")
    slots = threading.BoundedSemaphore(workers + queue)
    log = logging.getLogger("voxelflow.serve")

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
    served = Gauge("voxelflow_model_version", "Version of the model being served", registry=registry)
    served.set_function(lambda: float(holder.version) if str(holder.version or "").isdigit() else -1.0)
    swaps = Gauge("voxelflow_model_swaps", "Models hot-swapped in since start", registry=registry)
    swaps.set_function(lambda: holder.swaps)
    throttle = Throttle(rate, burst)
    failures = Throttle(failed_rate, failed_burst)
    denials = Denials(db)
    app = FastAPI(title="voxelflow inference", version="1", docs_url="/docs" if docs else None, redoc_url=None,
                  openapi_url="/openapi.json" if docs else None)
    app.state.pool = pool

    @app.middleware("http")
    async def request_id(request: Request, call_next):
        rid = request.headers.get("x-request-id", "")
        if not (0 < len(rid) <= 64 and rid.replace("-", "").isalnum()):
            rid = uuid.uuid4().hex
        request.state.role = request.state.who = None
        start = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:  # noqa: BLE001 - logged with the request id, answered 500
            log.exception(json.dumps({"request_id": rid, "route": request.url.path, "error": "unhandled"}))
            response = Response('{"detail": "internal error"}', status_code=500, media_type="application/json")
        seconds = time.perf_counter() - start
        route = request.url.path if request.url.path in ROUTES else "other"
        requests.labels(route, str(response.status_code), request.state.role or "none").inc()
        request_seconds.labels(route).observe(seconds)
        response.headers["X-Request-ID"] = rid
        log.info(json.dumps({"request_id": rid, "method": request.method, "route": route,
                             "status": response.status_code, "ms": round(seconds * 1000, 1),
                             "key": request.state.who}))
        return response

    def client_address(request: Request) -> str:
        return request.client.host if request.client else "unknown"

    def authorize(request: Request, key: str | None, permission: str) -> Principal:
        address, endpoint = client_address(request), request.url.path
        wait = failures.peek(address)
        if wait:  # this address keeps failing: refuse before touching the database
            denials.record(address, 429, endpoint)
            raise HTTPException(429, "too many failed requests from this address",
                                headers={"Retry-After": str(max(1, math.ceil(wait)))})
        if not key and request.headers.get("authorization", "").lower().startswith("bearer "):
            key = request.headers["authorization"][7:].strip()  # what Prometheus' scrape config can send
        who = keys.lookup(key)
        if who is None or not any(permission in ROLES[r] for r in who.roles):
            failures.allow(address)
            denials.record(address, 401 if who is None else 403, endpoint)
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

    @app.get("/health/live", summary="the process answers (no key)")
    def live() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/health/ready", summary="a model is loaded (no key)", responses={503: {
        "description": "loading", "content": {"application/json": {"schema": {"type": "object"}}}}})
    def ready(response: Response) -> dict[str, Any]:
        if holder.segmenter is None:
            response.status_code = 503
            return {"status": "loading", "error": holder.error}
        return {"status": "ready", "model_version": holder.version}

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
        about = {"version": holder.version, "ready": holder.segmenter is not None, "swaps": holder.swaps}
        if describe is not None:
            try:
                about.update(await run_in_threadpool(describe))
            except Exception as exc:  # noqa: BLE001 - the registry may be away; the model still serves
                about["registry_error"] = str(exc)[:300]
        return about

    @app.post("/v1/segment", summary="segment a volume (role predictor)", responses={
        200: {"description": "the mask in the input's format and grid; with summary=true, each label's volume in mL",
              "content": {NPY: binary, NIFTI: binary, "application/json": {"schema": {"type": "object"}}}},
        **errors, 400: refusal("not a volume"),
        413: refusal("body, voxel count or memory budget over the limit"),
        415: refusal("Content-Type is not a volume's"),
        422: refusal("not a finite numeric 3-D volume, or a bad query parameter",
                     {"anyOf": [{"type": "string"}, {"type": "array"}]}),
        503: refusal("busy or loading (Retry-After)"), 504: refusal("over the time limit")},
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
            if body and memory_budget is not None:
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
        need = working_set_bytes(shape, dtype, spacing, getattr(holder.segmenter, "config", None))
        if need > memory_budget:
            raise HTTPException(413, f"a volume of shape {list(shape)} ({dtype}) needs about {need / 2**20:.0f} MiB "
                                     f"to segment, over the per-request budget of {memory_budget / 2**20:.0f} MiB")

    def infer(body: bytes, content_type: str, summary: bool) -> Response:
        waiting.dec()
        in_flight.inc()
        try:
            return _infer(body, content_type, summary)
        except HTTPException as exc:
            return Response(json.dumps({"detail": exc.detail}), status_code=exc.status_code,
                            media_type="application/json")
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
            segmenter, version = holder.segmenter, holder.version
        start = time.perf_counter()
        mask = segmenter.segment(volume, affine)
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
            raise HTTPException(503, f"the model could not be loaded ({str(exc)[:300]}); still serving version "
                                     f"{holder.version}", headers={"Retry-After": "30"}) from None
        if db is not None:
            await run_in_threadpool(audit.append, db, "service.reloaded", who.name, model_version=version)
        return {"model_version": version}

    @app.on_event("shutdown")
    def _stop_pool() -> None:
        pool.shutdown(wait=False, cancel_futures=True)

    return app


ROUTES = ("/health/live", "/health/ready", "/metrics", "/v1/model", "/v1/segment", "/v1/reload", "/docs",
          "/openapi.json")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Server:
    """uvicorn in a background thread, for the lifecycle's smoke test and the tests."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.host, self.port = host, port or free_port(host)
        self._server = uvicorn.Server(uvicorn.Config(app, host=self.host, port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, name="voxelflow-serve", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> Server:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"inference service did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
