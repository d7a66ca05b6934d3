"""The prediction route, ``POST /v1/segment`` (role predictor), and :class:`Inference`, the work one request
hands to the inference pool: decode, segment (on the GPU running the fewest, with GPUs), encode or summarise.

A request is answered by the first check it fails, in this order: the query (422), the key (401, 403, 429), the
media type (415), the answer's media type (``Accept``, 406), the model loaded (503), the declared size (413), a worker or queue place (503), the body as it
streams (413), the memory budgets (413, 422); then the inference, within the time limit (504).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Request, Response

from voxelflow.data.formats import VolumeError
from voxelflow.serving.api.access import log
from voxelflow.serving.api.deps import AUTH_ERRORS, Admission, Authentication, Limits, Ticket, refusal
from voxelflow.serving.api.metrics import ServiceMetrics
from voxelflow.serving.serve_gpu import RETRY_AFTER_OOM, GpuSlots, out_of_memory, recover
from voxelflow.serving.serve_model import ModelHolder
from voxelflow.serving.serve_volumes import (
    ANSWER_TYPES,
    BODY_TYPES,
    NIFTI,
    NIFTI_PLAIN,
    NPY,
    VOLUME_STATUS,
    answer_format,
    decode_volume,
    encode_mask,
)

BINARY = {"schema": {"type": "string", "format": "binary"}}


class CpuShare:
    """The CPU's torch threads shared among the inferences running at once: a lone one gets all ``threads`` (its
    latency is the in-process one), each of ``n`` at once ``threads // n`` (at least one). Without it every
    worker's inference spreads over all the cores, so ``n`` of them keep ``n`` times as many threads busy as
    there are cores. torch's intra-op thread count is the calling thread's (OpenMP's), so each worker sets its
    own when its inference starts (and back when it ends); one already running keeps what it got."""

    def __init__(self, threads: int | None = None) -> None:
        import torch

        self.threads = max(1, threads or torch.get_num_threads())  # torch's default honours OMP_NUM_THREADS
        self.running = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def share(self) -> Iterator[int]:
        import torch

        with self._lock:
            self.running += 1
            threads = max(1, self.threads // self.running)
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            yield threads
        finally:
            torch.set_num_threads(before)
            with self._lock:
                self.running -= 1


class Inference:
    """One volume's inference on a pool worker: the mask in the input's grid (``X-Model-Version``), in the format
    the request's ``Accept`` asks for (the input's own without one: :func:`answer_format`), or with ``summary`` each
    label's volume in mL. A bad volume is answered as :data:`VOLUME_STATUS` says; one that
    runs out of GPU memory 503 with Retry-After, its memory handed back before the worker takes the next."""

    def __init__(self, holder: ModelHolder, metrics: ServiceMetrics, max_voxels: int,
                 gpu_slots: GpuSlots | None = None) -> None:
        self.holder, self.metrics, self.max_voxels, self.gpu_slots = holder, metrics, max_voxels, gpu_slots
        self.cpu = CpuShare()

    def __call__(self, body: bytes | bytearray, content_type: str, summary: bool, accept: str = "") -> Response:
        self.metrics.waiting.dec()
        self.metrics.in_flight.inc()
        try:
            try:
                return self.segment(body, content_type, summary, accept)
            except HTTPException as exc:
                return Response(json.dumps({"detail": exc.detail}), status_code=exc.status_code,
                                media_type="application/json")
            except Exception as exc:
                if not out_of_memory(exc):
                    raise
            # out of memory: the failed inference's tensors went with the traceback; its cached blocks go back
            recover()
            self.metrics.out_of_memory.inc()
            log.warning(json.dumps({"event": "inference.out_of_memory", "model_version": self.holder.version}))
            return Response(json.dumps({"detail": "the inference ran out of device memory; try again"}),
                            status_code=503, media_type="application/json",
                            headers={"Retry-After": str(RETRY_AFTER_OOM)})
        finally:
            self.metrics.in_flight.dec()

    def segment(self, body: bytes | bytearray, content_type: str, summary: bool, accept: str = "") -> Response:
        if not body:
            raise HTTPException(400, "empty body: send a NIfTI (.nii/.nii.gz) or .npy volume")
        try:
            volume, affine, fmt = decode_volume(body, content_type, self.max_voxels)
        except VolumeError as exc:  # the client's input: the header is checked before anything is allocated
            raise HTTPException(VOLUME_STATUS.get(exc.reason, 400), f"cannot decode the volume: {exc}") from None
        holder = self.holder
        with holder.lock:
            segmenter, version, replicas = holder.segmenter, holder.version, holder.replicas
        start = time.perf_counter()
        if self.gpu_slots is None or not replicas:
            with self.cpu.share():
                mask = segmenter.segment(volume, affine)
        else:
            with self.gpu_slots.take() as device:  # the GPU running the fewest inferences, its replica of the model
                mask = replicas[device].segmenter.segment(volume, affine)
        self.metrics.latency.observe(time.perf_counter() - start)
        headers = {"X-Model-Version": str(version), "Vary": "Accept"}
        if summary:
            spacing = np.sqrt((affine[:3, :3] ** 2).sum(0)) if affine is not None else np.ones(3)
            ml = float(np.prod(spacing)) / 1000.0
            labels, counts = np.unique(mask, return_counts=True)
            volumes = {str(int(v)): round(float(c) * ml, 3) for v, c in zip(labels, counts) if v != 0}
            return Response(json.dumps({"model_version": version, "voxel_ml": ml, "volumes_ml": volumes,
                                        "shape": list(mask.shape)}), media_type="application/json", headers=headers)
        answer = answer_format(accept, fmt)
        if answer is None:  # the route refused it before; a direct caller gets the same answer
            raise HTTPException(406, f"cannot answer in {accept[:200]!r}: accept one of {', '.join(ANSWER_TYPES)}")
        payload, media = encode_mask(mask, affine, answer)
        return Response(payload, media_type=media, headers=headers)


async def segment_query(request: Request, summary: bool = False) -> None:
    """The query, validated before anything else (a malformed one is answered 422, no key looked up). Its value
    goes on the request's state: the route declares only the last of its chained checks, since FastAPI reports a
    failing dependency's errors once for each path that reaches it."""
    request.state.summary = summary


def router(pool: ThreadPoolExecutor, inference: Inference, auth: Authentication, admission: Admission,
           limits: Limits) -> APIRouter:
    """``POST /v1/segment``: the checks in order, then ``inference`` on ``pool`` within ``limits.timeout_s``."""
    routes = APIRouter()
    authorized = auth.require("segment", after=segment_query)
    typed = limits.media_type(after=authorized)
    accepted = limits.acceptable(after=typed)
    loaded = admission.loaded(after=accepted)
    sized = limits.declared_size(after=loaded)
    admitted = admission.slot(after=sized)

    @routes.post("/v1/segment", summary="segment a volume (role predictor)", responses={
        200: {"description": "the mask in the input's grid, in the format the Accept header asks for: "
                             f"{NPY} (.npy), {NIFTI_PLAIN} (NIfTI-1), {NIFTI} (NIfTI-1 gzip-compressed at level 1); "
                             "without Accept (or */*, application/octet-stream) the input's format (.npy for .npy, "
                             f"{NIFTI} for NIfTI); with summary=true, each label's volume in mL (application/json)",
              "content": {NPY: BINARY, NIFTI_PLAIN: BINARY, NIFTI: BINARY,
                          "application/json": {"schema": {"type": "object"}}}},
        **AUTH_ERRORS, 400: refusal("not a volume"),
        413: refusal("body, voxel count or memory budget over the limit"),
        406: refusal("the Accept header accepts none of the answer's formats"),
        415: refusal("Content-Type is not a volume's"),
        422: refusal("not a finite numeric 3-D volume, or a bad query parameter",
                     {"anyOf": [{"type": "string"}, {"type": "array"}]}),
        503: refusal("busy, loading or out of GPU memory (Retry-After)"), 504: refusal("over the time limit")},
        openapi_extra={"requestBody": {"required": True, "description": "a NIfTI (.nii, .nii.gz) or .npy volume",
                                       "content": {media: BINARY for media in BODY_TYPES}}})
    async def segment(request: Request, ticket: Ticket = Depends(admitted)) -> Response:
        body = await limits.body(request)
        inference.metrics.waiting.inc()
        future = pool.submit(inference, body, request.headers.get("content-type", ""), request.state.summary,
                             request.headers.get("accept", ""))
        ticket.hand_over(future)
        return await limits.in_time(future)

    return routes
