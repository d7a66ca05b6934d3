"""The inference service: FastAPI on the champion model, API keys with roles, throttling, metrics.

``POST /v1/segment`` takes a volume (NIfTI, optionally gzipped, or ``.npy``) and returns the
mask in the same format and grid. Health at ``/health/live`` and ``/health/ready``,
Prometheus metrics at ``/metrics``.
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
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from sqlalchemy import delete, insert, select

from voxelflow import audit
from voxelflow.db import Database, api_keys, now
from voxelflow.formats import VolumeError

ROLES = ("predict", "admin")
NPY = "application/x-npy"
NIFTI = "application/gzip"


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

    def create(self, name: str, roles: list[str]) -> str:
        bad = sorted(set(roles) - set(ROLES))
        if bad or not roles:
            raise ValueError(f"unknown role(s) {bad or roles}: choose from {', '.join(ROLES)}")
        key = "vf_" + secrets.token_urlsafe(32)
        with self.db.transaction() as conn:
            conn.execute(insert(api_keys).values(digest=self._digest(key), name=name, roles=json.dumps(sorted(roles)),
                                                 created=now()))
        return key

    def revoke(self, key: str) -> bool:
        """Remove a key; True if it existed."""
        with self.db.transaction() as conn:
            return conn.execute(delete(api_keys).where(api_keys.c.digest == self._digest(key))).rowcount > 0

    def lookup(self, key: str | None) -> Principal | None:
        if not key:
            return None
        with self.db.transaction() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.digest == self._digest(key))).first()
        if row is None or (row.expires is not None and _aware(row.expires) <= now()):
            return None
        return Principal(row.name, tuple(json.loads(row.roles)))


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
        self.lock = threading.Lock()

    def reload(self) -> str | None:
        try:
            segmenter, version = self.loader()
        except Exception as exc:  # noqa: BLE001 - reported through /health/ready
            self.error = str(exc)
            raise
        with self.lock:
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


def create_app(
    holder: ModelHolder,
    keys: KeyStore,
    db: Database | None = None,
    max_bytes: int = 256 * 1024**2,
    max_voxels: int = 512**3,
    rate: float = 10.0,
    burst: int = 20,
):
    registry = CollectorRegistry()
    requests = Counter("voxelflow_requests", "Requests by endpoint and status", ["endpoint", "status"],
                       registry=registry)
    latency = Histogram("voxelflow_inference_seconds", "Inference time per volume", registry=registry,
                        buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
    throttle = Throttle(rate, burst)
    app = FastAPI(title="voxelflow inference", version="1")

    def deny(status: int, detail: str, who: str, endpoint: str) -> HTTPException:
        requests.labels(endpoint, str(status)).inc()
        if db is not None and status in (401, 403):
            audit.append(db, "access.denied", who, endpoint=endpoint, status=status)
        return HTTPException(status_code=status, detail=detail)

    def authorize(key: str | None, role: str, endpoint: str) -> Principal:
        who = keys.lookup(key)
        if who is None:
            raise deny(401, "missing or unknown API key (send it in the X-API-Key header)", "anonymous", endpoint)
        if role not in who.roles and "admin" not in who.roles:
            raise deny(403, f"key {who.name!r} lacks the {role!r} role", who.name, endpoint)
        wait = throttle.allow(who.name)
        if wait:
            requests.labels(endpoint, "429").inc()
            raise HTTPException(429, f"too many requests for key {who.name!r}",
                                headers={"Retry-After": str(max(1, math.ceil(wait)))})
        return who

    @app.get("/health/live")
    def live() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/health/ready")
    def ready(response: Response) -> dict[str, Any]:
        if holder.segmenter is None:
            response.status_code = 503
            return {"status": "loading", "error": holder.error}
        return {"status": "ready", "model_version": holder.version}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/segment")
    async def segment(request: Request, x_api_key: str | None = Header(None)) -> Response:
        from starlette.concurrency import run_in_threadpool

        endpoint = "/v1/segment"
        await run_in_threadpool(authorize, x_api_key, "predict", endpoint)  # a database lookup: off the loop
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise deny(413, f"body of {declared} bytes exceeds the limit of {max_bytes}", "", endpoint)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise deny(413, f"body exceeds the limit of {max_bytes} bytes", "", endpoint)
            chunks.append(chunk)
        return await run_in_threadpool(infer, b"".join(chunks), request.headers.get("content-type", ""))

    def infer(body: bytes, content_type: str) -> Response:
        endpoint = "/v1/segment"
        if holder.segmenter is None:
            raise deny(503, "model not loaded yet", "", endpoint)
        if not body:
            raise deny(400, "empty body: send a NIfTI (.nii/.nii.gz) or .npy volume", "", endpoint)
        if len(body) > max_bytes:
            raise deny(413, f"body of {len(body)} bytes exceeds the limit of {max_bytes}", "", endpoint)
        try:
            volume, affine, fmt = decode_volume(body, content_type, max_voxels)
        except VolumeError as exc:  # the client's input: the header is checked before anything is allocated
            raise deny(VOLUME_STATUS.get(exc.reason, 400), f"cannot decode the volume: {exc}", "", endpoint) from None
        with holder.lock:
            segmenter, version = holder.segmenter, holder.version
        start = time.perf_counter()
        mask = segmenter.segment(volume, affine)
        latency.observe(time.perf_counter() - start)
        payload, media = encode_mask(mask, affine, fmt)
        requests.labels(endpoint, "200").inc()
        return Response(payload, media_type=media, headers={"X-Model-Version": str(version)})

    @app.post("/v1/reload")
    def reload(x_api_key: str | None = Header(None)) -> dict[str, Any]:
        who = authorize(x_api_key, "admin", "/v1/reload")
        version = holder.reload()
        if db is not None:
            audit.append(db, "service.reloaded", who.name, model_version=version)
        return {"model_version": version}

    return app


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
