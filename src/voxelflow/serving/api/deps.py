"""The service's FastAPI dependencies: who may call (API keys and their roles, the throttles), who gets an
inference worker (the model loaded, a worker or queue place) and what a request may be (media type, the answer's
media type, size, voxels, memory, time).

Each factory takes ``after``, a dependency solved first: the dependency runs only once ``after`` has passed (FastAPI
skips a dependency whose own dependencies failed), so a route chains its checks and a request is answered by the
first it fails, a malformed query before any key is looked up.
"""

from __future__ import annotations

import asyncio
import math
import threading
from concurrent.futures import Future
from typing import Any, AsyncIterator, Callable

from fastapi import Depends, Header, HTTPException, Request
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from voxelflow.data.formats import VolumeError
from voxelflow.serving.serve_gpu import GpuSlots
from voxelflow.serving.serve_guard import Denials, Throttle
from voxelflow.serving.serve_keys import ROLES, KeyCache, Principal
from voxelflow.serving.serve_model import ModelHolder
from voxelflow.serving.serve_volumes import (
    ANSWER_TYPES,
    BODY_TYPES,
    answer_format,
    declared_volume,
    device_working_set_bytes,
    model_grid_voxels,
    working_set_bytes,
)


async def passed() -> None:
    """The dependency of a check that waits for nothing."""


def refusal(description: str, detail: dict[str, Any] | None = None) -> dict[str, Any]:
    """An error response as OpenAPI documents it: JSON with a ``detail``."""
    schema = {"type": "object", "required": ["detail"], "properties": {"detail": detail or {"type": "string"}}}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


#: what every route behind a key may answer besides its own
AUTH_ERRORS = {401: refusal("missing, unknown or expired key"), 403: refusal("role not allowed"),
               429: refusal("throttled (Retry-After)")}


def retry_after(wait: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(wait)))}


class Authentication:
    """API keys: a key (``X-API-Key``, or ``Authorization: Bearer``) names a principal whose roles grant
    permissions. Unknown, expired or missing: 401; without the permission: 403. A valid key is throttled per key
    (``throttle``); a failing request, after the lookup, per client address (``failures``), and audited in
    aggregate (``denials``); either throttled: 429 with Retry-After. Keys are verified from ``keys``' in-memory
    copy of the digests (:class:`~voxelflow.serving.serve_keys.KeyCache`), on the event loop; only a copy too old
    to answer is read again, on the threadpool."""

    def __init__(self, keys: KeyCache, throttle: Throttle, failures: Throttle, denials: Denials) -> None:
        self.keys, self.throttle, self.failures, self.denials = keys, throttle, failures, denials

    @staticmethod
    def client_address(request: Request) -> str:
        """The peer, or the client a trusted proxy forwarded (uvicorn's ``forwarded_allow_ips``)."""
        return request.client.host[:64] if request.client else "unknown"

    @staticmethod
    def key_of(request: Request, key: str | None) -> str | None:
        if not key and request.headers.get("authorization", "").lower().startswith("bearer "):
            key = request.headers["authorization"][7:].strip()  # what Prometheus' scrape config can send
        return key

    async def authorize(self, request: Request, key: str | None, permission: str) -> Principal:
        """The principal of ``key`` if it may ``permission``; the request's role and key name go on its state."""
        key = self.key_of(request, key)
        known, who = self.keys.cached(key)
        if not known:  # the copy of the keys is too old to answer: read again, off the event loop
            who = await run_in_threadpool(self.keys.lookup, key)
        if who is None or not any(permission in ROLES[r] for r in who.roles):
            await run_in_threadpool(self.refuse, request, who, permission)  # the audit log may be written
        request.state.role = ",".join(who.roles)
        request.state.who = who.name
        wait = self.throttle.allow(who.name)
        if wait:
            raise HTTPException(429, f"too many requests for key {who.name!r}", headers=retry_after(wait))
        return who

    def refuse(self, request: Request, who: Principal | None, permission: str) -> None:
        """Raise the refusal (429, 401 or 403) of a request whose key failed, throttled and audited per client."""
        # only now, after the lookup, are failures throttled, per client: a valid key never waits for them
        address, endpoint = self.client_address(request), request.url.path
        wait = self.failures.allow(address)
        self.denials.record(address, 429 if wait else 401 if who is None else 403, endpoint)
        if wait:
            raise HTTPException(429, "too many failed requests from this client", headers=retry_after(wait))
        if who is None:
            raise HTTPException(401, "missing, unknown or expired API key (send it in the X-API-Key header)")
        raise HTTPException(403, f"key {who.name!r} ({', '.join(who.roles)}) may not {permission}")

    def require(self, permission: str, after: Callable[..., Any] = passed) -> Callable[..., Any]:
        """A dependency: the caller's :class:`Principal` if its key may ``permission``."""

        async def authorized(request: Request, x_api_key: str | None = Header(None),
                             _: Any = Depends(after)) -> Principal:
            return await self.authorize(request, x_api_key, permission)

        return authorized


class Ticket:
    """A worker or queue place: given back when the inference it was handed to ends, or with the request if it was
    never handed over."""

    def __init__(self, slots: threading.BoundedSemaphore) -> None:
        self.slots, self.handed = slots, False

    def hand_over(self, future: Future) -> None:
        future.add_done_callback(lambda _: self.slots.release())  # the place frees when the work really ends
        self.handed = True


class Admission:
    """Who gets an inference worker: ``workers`` run at once and ``queue`` more may wait; a request finding the
    model not loaded yet, or every worker and queue place taken, is answered 503 with Retry-After at once."""

    def __init__(self, holder: ModelHolder, workers: int, queue: int) -> None:
        self.holder = holder
        self.slots = threading.BoundedSemaphore(workers + queue)

    def loaded(self, after: Callable[..., Any] = passed) -> Callable[..., Any]:
        """A dependency: 503 while no model is loaded."""

        async def loaded(_: Any = Depends(after)) -> None:
            if self.holder.segmenter is None:
                raise HTTPException(503, "model not loaded yet", headers={"Retry-After": "5"})

        return loaded

    def slot(self, after: Callable[..., Any] = passed) -> Callable[..., AsyncIterator[Ticket]]:
        """A dependency: a :class:`Ticket` for a worker or queue place; 503 when none is free (never queued)."""

        async def slot(_: Any = Depends(after)) -> AsyncIterator[Ticket]:
            if not self.slots.acquire(blocking=False):  # pool and queue full: say so now, do not queue more
                raise HTTPException(503, "busy: every inference worker and queue place is taken",
                                    headers={"Retry-After": "1"})
            ticket = Ticket(self.slots)
            try:
                yield ticket
            finally:
                if not ticket.handed:
                    self.slots.release()

        return slot


class Limits:
    """What a request may be: a volume's media type (415), at most ``max_bytes`` of body (413) and ``max_voxels``
    voxels, one inference within ``memory_budget`` bytes and, with ``gpu_slots``, within one inference's share of a
    GPU's memory, estimated from the body's header before any voxel is read (413), and answered within
    ``timeout_s`` (504)."""

    def __init__(self, holder: ModelHolder, max_bytes: int, max_voxels: int, memory_budget: int | None,
                 timeout_s: float, gpu_slots: GpuSlots | None = None) -> None:
        self.holder, self.max_bytes, self.max_voxels = holder, max_bytes, max_voxels
        self.memory_budget, self.timeout_s, self.gpu_slots = memory_budget, timeout_s, gpu_slots

    def media_type(self, after: Callable[..., Any] = passed) -> Callable[..., Any]:
        """A dependency: 415 unless the Content-Type, when given, is a volume's."""

        async def media_type(request: Request, _: Any = Depends(after)) -> None:
            media = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if media and media not in BODY_TYPES:
                raise HTTPException(415, f"Content-Type {media!r} is not a volume: send one of "
                                         f"{', '.join(BODY_TYPES)}")

        return media_type

    def declared_size(self, after: Callable[..., Any] = passed) -> Callable[..., Any]:
        """A dependency: 413 when the Content-Length declares more than ``max_bytes``."""

        async def declared_size(request: Request, _: Any = Depends(after)) -> None:
            declared = request.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise HTTPException(413, f"body of {declared} bytes exceeds the limit of {self.max_bytes}")

        return declared_size

    def acceptable(self, after: Callable[..., Any] = passed) -> Callable[..., Any]:
        """A dependency: 406 unless the ``Accept`` header, when given, accepts a format the answer comes in (a mask
        as ``.npy``, NIfTI or gzip-compressed NIfTI; with ``summary=true``, JSON)."""

        async def acceptable(request: Request, _: Any = Depends(after)) -> None:
            accept = request.headers.get("accept", "")
            summary = getattr(request.state, "summary", False)
            if answer_format(accept, "npy", summary) is None:
                offered = "application/json" if summary else ", ".join(ANSWER_TYPES)
                raise HTTPException(406, f"cannot answer in {accept[:200]!r}: accept one of {offered}")

        return acceptable

    async def body(self, request: Request) -> bytearray:
        """The body, read as it streams in (413 past ``max_bytes``) into one buffer of the declared length (no
        chunk kept, no join), its header checked against the budgets."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit():  # declared_size refused more than max_bytes before
            body, size = bytearray(int(declared)), 0
            view = memoryview(body)
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnect()
                chunk = message.get("body", b"")
                if size + len(chunk) > len(body):
                    raise HTTPException(400, "body longer than its Content-Length")
                view[size:size + len(chunk)] = chunk
                size += len(chunk)
                if not message.get("more_body", False):
                    break
            view.release()
            if size < len(body):
                raise HTTPException(400, f"body of {size} bytes, shorter than its Content-Length")
        else:  # chunked: collected, then joined once
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_bytes:
                    raise HTTPException(413, f"body exceeds the limit of {self.max_bytes} bytes")
                chunks.append(chunk)
            body = bytearray().join(chunks)
        if body and (self.memory_budget is not None or self.gpu_slots is not None):
            self.check_budget(body, request.headers.get("content-type", ""))
        return body

    def check_budget(self, body: bytes | bytearray, content_type: str) -> None:
        """413 when the volume the header declares would not fit the memory budget or a GPU's share; 422 when its
        spacing is not finite and positive. A body without a readable header, or over ``max_voxels``, is left to
        decoding, which says what is wrong with it."""
        try:
            shape, dtype, spacing = declared_volume(body, content_type)
        except VolumeError:
            return  # no readable header: decoding says what is wrong with it
        if math.prod(shape) > self.max_voxels:
            return  # decoding refuses it from the header (413, too-large)
        if not all(math.isfinite(s) and s > 0 for s in spacing):
            raise HTTPException(422, "cannot decode the volume: bad-affine: the header's voxel spacing is not "
                                     f"finite and positive ({', '.join(f'{s:g}' for s in spacing)})")
        config = getattr(self.holder.segmenter, "config", None)
        need = working_set_bytes(shape, dtype, spacing, config)
        budget = self.memory_budget
        if budget is not None and need > budget:
            raise HTTPException(413, f"a volume of shape {list(shape)} ({dtype}) needs about {need / 2**20:.0f} MiB "
                                     f"to segment, over the per-request budget of {budget / 2**20:.0f} MiB")
        replicas = self.holder.replicas
        if self.gpu_slots is not None and replicas:  # the least a GPU must hold: the windows (stitching on the CPU)
            share = min(r.share_bytes for r in replicas.values())
            device_need = device_working_set_bytes(model_grid_voxels(shape, spacing, config), config, stitched=False)
            if device_need > share:
                raise HTTPException(413, f"a volume of shape {list(shape)} needs about {device_need / 2**20:.0f} MiB "
                                         f"of GPU memory to segment, over the {share / 2**20:.0f} MiB budget one "
                                         "inference has on a GPU")

    async def in_time(self, future: Future) -> Any:
        """What ``future`` returns, or 504 after ``timeout_s`` (the work itself runs on)."""
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(504, f"inference took longer than {self.timeout_s:g} s") from None
