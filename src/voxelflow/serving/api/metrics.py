"""The service's Prometheus metrics: one registry per app, its counters, histograms and gauges."""

from __future__ import annotations

from typing import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from voxelflow.serving.serve_gpu import GpuSlots
from voxelflow.serving.serve_guard import Throttle
from voxelflow.serving.serve_model import ModelHolder


class ServiceMetrics:
    """What ``/metrics`` shows: requests and their time by route, inference time, the queue and in-flight
    inferences, out-of-memory answers, inferences per GPU, the served model, hot swaps and throttle buckets."""

    def __init__(self, holder: ModelHolder, throttle: Throttle, failures: Throttle,
                 gpu_slots: GpuSlots | None = None, gpus: Sequence[str] = ()) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("voxelflow_requests", "Requests by route, status and role",
                                ["route", "status", "role"], registry=registry)
        self.request_seconds = Histogram("voxelflow_request_seconds", "Whole request time by route", ["route"],
                                         registry=registry,
                                         buckets=(0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.latency = Histogram("voxelflow_inference_seconds", "Inference time per volume", registry=registry,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.waiting = Gauge("voxelflow_queue_depth", "Requests admitted and waiting for an inference worker",
                             registry=registry)
        self.in_flight = Gauge("voxelflow_inference_in_flight", "Inferences running now", registry=registry)
        self.out_of_memory = Counter("voxelflow_inference_out_of_memory", "Inferences that ran out of device "
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
        buckets = Gauge("voxelflow_throttle_buckets", "Token buckets held, per key and per failing client "
                        "(bounded)", ["kind"], registry=registry)
        buckets.labels("key").set_function(lambda: len(throttle))
        buckets.labels("failed").set_function(lambda: len(failures))


class SwapFailures:
    """``voxelflow_model_swap_failures_total``: the holder's failed loads, read when scraped."""

    def __init__(self, holder: ModelHolder) -> None:
        self.holder = holder

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        yield CounterMetricFamily("voxelflow_model_swap_failures", "Model loads that failed (the model loaded "
                                  "before, if any, kept serving)", value=self.holder.swap_failures)
