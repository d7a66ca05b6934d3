"""CPU inferences share the cores: a lone one gets every torch thread, each of several at once its share.

Two workers' inferences that each spread over all the cores keep twice as many threads busy as there are cores;
:class:`~voxelflow.serving.api.predict.CpuShare` gives each its share when it starts (torch's intra-op thread count
is the calling thread's), so a lone request keeps the in-process latency.
"""

from __future__ import annotations

import io
import threading

import numpy as np
import torch

from tests.unit.helpers import npy
from voxelflow.serving.api.metrics import ServiceMetrics
from voxelflow.serving.api.predict import CpuShare, Inference
from voxelflow.serving.serve import NPY, ModelHolder
from voxelflow.serving.serve_guard import Throttle


def in_thread(fn):
    out: list = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # noqa: BLE001 - raised again in the test's thread
            errors.append(exc)

    th = threading.Thread(target=run)
    th.start()
    return th, out, errors


def test_a_lone_inference_gets_every_thread_and_concurrent_ones_their_share():
    share = CpuShare(4)
    first_in, release = threading.Event(), threading.Event()
    seen: dict[str, tuple[int, int]] = {}

    def first() -> None:
        with share.share() as n:
            seen["first"] = (n, torch.get_num_threads())
            first_in.set()
            assert release.wait(10)

    def second() -> None:
        assert first_in.wait(10)
        with share.share() as n:
            seen["second"] = (n, torch.get_num_threads())
        release.set()

    runs = [in_thread(first), in_thread(second)]
    for th, _, errors in runs:
        th.join(20)
        assert not errors, errors
    assert seen == {"first": (4, 4), "second": (2, 2)}
    assert share.running == 0

    def alone() -> int:
        with share.share() as n:
            return n

    th, out, errors = in_thread(alone)
    th.join(10)
    assert not errors and out == [4]  # the cores are all free again


def test_the_share_never_drops_below_one_thread():
    share = CpuShare(2)
    share.running = 5  # five already running on two threads' worth of cores
    before = torch.get_num_threads()
    with share.share() as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert share.running == 5
    assert torch.get_num_threads() == before  # the caller's own count is back


def test_a_cpu_inference_runs_on_its_share(segmenter):
    """The service's inference sets the share before the segmenter runs, and answers the real mask."""
    holder = ModelHolder(lambda: (segmenter, "1"))
    holder.reload()
    metrics = ServiceMetrics(holder, Throttle(1e6, 10**6, 100), Throttle(1e6, 10**6, 100), None, ())
    inference = Inference(holder, metrics, 256**3)
    inference.cpu = CpuShare(7)  # a count no default of torch's is likely to match
    inference.cpu.running = 1  # another inference is running: this one gets 7 // 2
    threads: list[int] = []
    real = segmenter.segment

    def recorded(volume, affine):
        threads.append(torch.get_num_threads())
        return real(volume, affine)

    segmenter.segment = recorded
    try:
        volume = np.random.default_rng(0).random((24, 24, 24), dtype=np.float32)
        metrics.waiting.inc()
        answer = inference(npy(volume), NPY, summary=False, accept=NPY)
    finally:
        del segmenter.segment
    assert answer.status_code == 200
    assert threads == [3]
    mask = np.load(io.BytesIO(answer.body))
    assert mask.shape == volume.shape and mask.dtype == np.uint8
    assert inference.cpu.running == 1
