"""Serving overhead: HTTP latency of `POST /v1/segment` ÷ the same inference called in-process.

One run, side by side: the demo spec's network (untrained weights: latency does not depend on
them) segments a 96³ volume in this process, then the service (``voxelflow.serving.serve.create_app`` under
uvicorn, in a process of its own, as it is deployed) answers the same volume sent as ``.npy``
over loopback, one request at a time; then N clients at once measure requests/s at saturation
against in-process volumes/s with the same number of inference workers.
Prints ``serve_p50_ratio``, ``serve_p99_ratio`` and ``serve_saturation_ratio`` as JSON lines.

Then liveness under load: 32 clients (a process of their own) send 64³ volumes as fast as they are
answered while a probe asks ``/health/live`` every 50 ms on a new connection, as the kubelet does;
prints ``serve_live_p99_ms`` (goal ≤ 100: far inside a probe's 1 s default timeout).
``--live-only`` runs just that part (about ``--live-seconds`` plus the service's start).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SERVER = r"""
import sys, json
from pathlib import Path
import uvicorn
from voxelflow.core.db import Database
from voxelflow.learn.model import Segmenter
from voxelflow.serving.serve import KeyStore, ModelHolder, create_app, proxy_options
work, port, workers = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
config = json.loads((work / "model.json").read_text())
seg = Segmenter(config, (work / "weights.safetensors").read_bytes(), device="cpu")
holder = ModelHolder(lambda: (seg, "1"))
holder.reload()
db = Database(f"sqlite:///{work}/voxelflow.db")
app = create_app(holder, KeyStore(db), db=db, workers=workers, queue=64, rate=1e6, burst=10**6)
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", **proxy_options(""))  # as `voxelflow serve`
"""


LOAD = r"""
import io, json, sys, threading, time
import httpx, numpy as np
url, key, clients, seconds, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
buf = io.BytesIO()
np.save(buf, np.random.default_rng(1).random((size,) * 3, dtype=np.float32), allow_pickle=False)
body, codes = buf.getvalue(), []
stop_at = time.perf_counter() + seconds
def hammer():
    with httpx.Client(timeout=120) as c:
        while time.perf_counter() < stop_at:
            codes.append(c.post(f"{url}/v1/segment", content=body,
                                headers={"X-API-Key": key, "Content-Type": "application/x-npy"}).status_code)
threads = [threading.Thread(target=hammer) for _ in range(clients)]
for th in threads:
    th.start()
for th in threads:
    th.join()
print(json.dumps({str(c): codes.count(c) for c in sorted(set(codes))}))
"""


def live_under_load(url: str, key: str, env: dict[str, str], clients: int, seconds: float, size: int) -> tuple[
        list[float], dict[str, int]]:
    """/health/live latencies (s), one probe every 50 ms, while ``clients`` send ``size``³ volumes."""
    import socket
    from urllib.parse import urlsplit

    host, port = urlsplit(url).hostname, urlsplit(url).port

    def probe() -> bytes:  # a new connection each time and nothing else, as the kubelet's HTTP probe
        with socket.create_connection((host, port), timeout=30) as sock:
            sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        return answer

    load = subprocess.Popen([sys.executable, "-c", LOAD, url, key, str(clients), str(seconds + 3), str(size)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3)  # every client has a request in
    probes: list[float] = []
    stop_at = time.perf_counter() + seconds
    while time.perf_counter() < stop_at:
        start = time.perf_counter()
        answer = probe()
        probes.append(time.perf_counter() - start)
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b'{"status":"ok"}'), answer[:300]
        time.sleep(max(0.0, 0.05 - (time.perf_counter() - start)))
    out, err = load.communicate(timeout=300)
    if load.returncode:
        raise RuntimeError(f"load clients failed: {err[-2000:]}")
    return probes, json.loads(out.strip().splitlines()[-1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--live-clients", type=int, default=32)
    parser.add_argument("--live-size", type=int, default=64)
    parser.add_argument("--live-seconds", type=float, default=20.0)
    parser.add_argument("--live-only", action="store_true", help="measure serve_live_p99_ms alone")
    args = parser.parse_args()

    import httpx
    import numpy as np
    import torch

    from flows.server import free_port
    from voxelflow.core.db import Database
    from voxelflow.learn.model import Segmenter
    from voxelflow.learn.train import build_network, state_dict_bytes
    from voxelflow.pipeline import model_config
    from voxelflow.serving.serve import KeyStore
    from voxelflow.spec.config import load_spec

    spec = load_spec(REPO / "deployments/specs/demo.yaml")
    config = model_config(spec)
    torch.manual_seed(0)
    weights = state_dict_bytes(build_network(spec.train.network))
    work = Path(tempfile.mkdtemp(prefix="voxelflow-bench-serve-"))
    (work / "model.json").write_text(json.dumps(config))
    (work / "weights.safetensors").write_bytes(weights)
    workers = max(1, os.cpu_count() or 1)

    rng = np.random.default_rng(0)
    volume = rng.random((args.size,) * 3, dtype=np.float32)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    buf = io.BytesIO()
    np.save(buf, volume, allow_pickle=False)
    body = buf.getvalue()

    if not args.live_only:
        local, local_rps = in_process(Segmenter(config, weights, device="cpu"), volume, affine, args.requests,
                                      workers)

    key = KeyStore(Database(f"sqlite:///{work}/voxelflow.db")).create("bench", ["predictor"])
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "src")])}
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(work), str(port), str(workers)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"service did not start: {server.stderr.read()[-2000:]}")
            time.sleep(0.2)
        if not args.live_only:
            remote, remote_rps, codes = over_http(url, key, body, volume.shape, args.requests, args.clients)
        probes, live_codes = live_under_load(url, key, env, args.live_clients, args.live_seconds, args.live_size)
    finally:
        server.terminate()
        server.wait(timeout=20)

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    if not args.live_only:
        p50_local = statistics.median(local)
        print(f"in-process: p50 {p50_local * 1000:.1f} ms, p99 {percentile(local, 0.99) * 1000:.1f} ms, "
              f"{local_rps:.2f} volumes/s with {workers} threads")
        print(f"HTTP:       p50 {statistics.median(remote) * 1000:.1f} ms, p99 {percentile(remote, 0.99) * 1000:.1f} "
              f"ms, {remote_rps:.2f} requests/s with {args.clients} clients (statuses {sorted(set(codes))}); "
              f"{args.size}^3 float32 volume, {len(body) / 1e6:.1f} MB body")
    print(f"/health/live: {len(probes)} probes every 50 ms, p50 {statistics.median(probes) * 1000:.1f} ms, "
          f"max {max(probes) * 1000:.1f} ms, while {args.live_clients} clients sent {args.live_size}^3 volumes to "
          f"{workers} workers (statuses {live_codes})")
    if not args.live_only:
        print(json.dumps({"metric": "serve_saturation_ratio", "value": round(remote_rps / local_rps, 4),
                          "goal": None, "higher_is_better": True}))
        print(json.dumps({"metric": "serve_p99_ratio", "value": round(percentile(remote, 0.99) / p50_local, 4),
                          "goal": 1.3, "higher_is_better": False}))
        print(json.dumps({"metric": "serve_p50_ratio", "value": round(statistics.median(remote) / p50_local, 4),
                          "goal": 1.10, "higher_is_better": False}))
    print(json.dumps({"metric": "serve_live_p99_ms", "value": round(percentile(probes, 0.99) * 1000, 1),
                      "goal": 100, "higher_is_better": False}))


def in_process(seg, volume, affine, requests: int, workers: int) -> tuple[list[float], float]:
    """Per-volume latencies one at a time, then volumes/s with ``workers`` threads for 10 s."""
    for _ in range(3):
        seg.segment(volume, affine)
    local = []
    for _ in range(requests):
        start = time.perf_counter()
        seg.segment(volume, affine)
        local.append(time.perf_counter() - start)
    done = [0]
    stop_at = time.perf_counter() + 10

    def spin() -> None:
        while time.perf_counter() < stop_at:
            seg.segment(volume, affine)
            done[0] += 1

    return local, done[0] / in_threads(spin, workers)


def over_http(url: str, key: str, body: bytes, shape, requests: int, clients: int) -> tuple[
        list[float], float, list[int]]:
    """The same volume over loopback one request at a time, then requests/s with ``clients`` at once for 10 s."""
    import httpx
    import numpy as np

    from voxelflow.serving.serve import NPY

    headers = {"X-API-Key": key, "Content-Type": NPY}
    with httpx.Client(timeout=120) as client:
        for _ in range(3):
            assert client.post(f"{url}/v1/segment", content=body, headers=headers).status_code == 200
        remote = []
        for _ in range(requests):
            start = time.perf_counter()
            r = client.post(f"{url}/v1/segment", content=body, headers=headers)
            remote.append(time.perf_counter() - start)
            assert r.status_code == 200, r.text
            assert np.load(io.BytesIO(r.content)).shape == shape
    codes: list[int] = []
    stop_at = time.perf_counter() + 10

    def hammer() -> None:
        with httpx.Client(timeout=120) as c:
            while time.perf_counter() < stop_at:
                codes.append(c.post(f"{url}/v1/segment", content=body, headers=headers).status_code)

    return remote, codes.count(200) / in_threads(hammer, clients), codes


def in_threads(fn, n: int) -> float:
    """Run ``fn`` in ``n`` threads at once; the seconds until the last one ends."""
    started = time.perf_counter()
    threads = [threading.Thread(target=fn) for _ in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
