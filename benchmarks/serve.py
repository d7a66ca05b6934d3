"""Serving overhead: HTTP latency of `POST /v1/segment` ÷ the same inference called in-process.

One run, side by side: the demo spec's network (untrained weights: latency does not depend on
them) segments a 96³ volume in this process, then the service (``voxelflow.serve.create_app`` under
uvicorn, in a process of its own, as it is deployed) answers the same volume sent as ``.npy``
over loopback, one request at a time; then N clients at once measure requests/s at saturation
against in-process volumes/s with the same number of inference workers.
Prints ``serve_p50_ratio``, ``serve_p99_ratio`` and ``serve_saturation_ratio`` as JSON lines.
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
from voxelflow.db import Database
from voxelflow.model import Segmenter
from voxelflow.serve import KeyStore, ModelHolder, create_app
work, port, workers = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
config = json.loads((work / "model.json").read_text())
seg = Segmenter(config, (work / "weights.safetensors").read_bytes(), device="cpu")
holder = ModelHolder(lambda: (seg, "1"))
holder.reload()
db = Database(f"sqlite:///{work}/voxelflow.db")
app = create_app(holder, KeyStore(db), db=db, workers=workers, queue=64, rate=1e6, burst=10**6)
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()

    import httpx
    import numpy as np
    import torch

    from flows.server import free_port
    from voxelflow.config import load_spec
    from voxelflow.db import Database
    from voxelflow.model import Segmenter
    from voxelflow.pipeline import model_config
    from voxelflow.serve import NPY, KeyStore
    from voxelflow.train import build_network, state_dict_bytes

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

    seg = Segmenter(config, weights, device="cpu")
    for _ in range(3):
        seg.segment(volume, affine)
    local = []
    for _ in range(args.requests):
        start = time.perf_counter()
        seg.segment(volume, affine)
        local.append(time.perf_counter() - start)

    # in-process throughput with the same number of workers as the service
    done = [0]
    stop_at = time.perf_counter() + 10

    def spin() -> None:
        while time.perf_counter() < stop_at:
            seg.segment(volume, affine)
            done[0] += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=spin) for _ in range(workers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    local_rps = done[0] / (time.perf_counter() - started)

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
        headers = {"X-API-Key": key, "Content-Type": NPY}
        with httpx.Client(timeout=120) as client:
            for _ in range(3):
                assert client.post(f"{url}/v1/segment", content=body, headers=headers).status_code == 200
            remote = []
            for _ in range(args.requests):
                start = time.perf_counter()
                r = client.post(f"{url}/v1/segment", content=body, headers=headers)
                remote.append(time.perf_counter() - start)
                assert r.status_code == 200, r.text
                mask = np.load(io.BytesIO(r.content))
                assert mask.shape == volume.shape

        codes: list[int] = []
        stop_at = time.perf_counter() + 10

        def hammer() -> None:
            with httpx.Client(timeout=120) as c:
                while time.perf_counter() < stop_at:
                    codes.append(c.post(f"{url}/v1/segment", content=body, headers=headers).status_code)

        started = time.perf_counter()
        threads = [threading.Thread(target=hammer) for _ in range(args.clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        remote_rps = codes.count(200) / (time.perf_counter() - started)
    finally:
        server.terminate()
        server.wait(timeout=20)

    p50_local = statistics.median(local)
    print(f"in-process: p50 {p50_local * 1000:.1f} ms, p99 {percentile(local, 0.99) * 1000:.1f} ms, "
          f"{local_rps:.2f} volumes/s with {workers} threads")
    print(f"HTTP:       p50 {statistics.median(remote) * 1000:.1f} ms, p99 {percentile(remote, 0.99) * 1000:.1f} ms, "
          f"{remote_rps:.2f} requests/s with {args.clients} clients (statuses {sorted(set(codes))})")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{args.size}^3 float32 volume, {len(body) / 1e6:.1f} MB body")
    print(json.dumps({"metric": "serve_saturation_ratio", "value": round(remote_rps / local_rps, 4), "goal": None,
                      "higher_is_better": True}))
    print(json.dumps({"metric": "serve_p99_ratio", "value": round(percentile(remote, 0.99) / p50_local, 4),
                      "goal": 1.3, "higher_is_better": False}))
    print(json.dumps({"metric": "serve_p50_ratio", "value": round(statistics.median(remote) / p50_local, 4),
                      "goal": 1.10, "higher_is_better": False}))


if __name__ == "__main__":
    main()
