"""Serving overhead: HTTP latency of `POST /v1/segment` ÷ the same inference called in-process.

Side by side, at each of ``--sizes`` (96³ and 160³): the demo spec's network (untrained weights: latency does not
depend on them) segments a float32 volume in this process, and the service (``voxelflow.serving.serve.create_app``
under uvicorn, in a process of its own, as it is deployed) answers the same volume sent as ``.npy`` over loopback,
one request at a time; the two alternate request by request (in-process first on even requests, HTTP first on odd
ones), so load from other jobs falls on both alike. Prints ``serve_p50_ratio`` (HTTP p50 ÷ in-process p50) and
``serve_p99_ratio`` (HTTP p99 ÷ in-process p50) for each size, as JSON lines with a ``size`` field; the p99 line
also carries the in-process p99 ÷ p50 and, as a diagnostic, both sides against the in-process median of the pairs
around each request (:func:`local_window_ratios`).

Then saturation at ``--saturation-size``: ``--clients`` clients at once against the service (threads of this process
sending a prepared request on raw keep-alive sockets, :class:`RawClient`, or with ``--saturation-client httpx``, httpx
clients, whose CPU, on the same cores, then counts against the service), and as many threads
in-process as the service has inference workers, in the order in-process, HTTP, HTTP, in-process
(``--saturation-seconds`` each), so a drift in the machine's load cancels; prints ``serve_saturation_ratio``
(requests/s ÷ volumes/s).

Then liveness under load: 32 clients (a process of their own) send 64³ volumes as fast as they are
answered while a probe asks ``/health/live`` every 50 ms on a new connection, as the kubelet does;
prints ``serve_live_p99_ms`` (goal ≤ 100: far inside a probe's 1 s default timeout).
``--live-only`` runs just that part (about ``--live-seconds`` plus the service's start); ``--no-live`` skips it.
Both sides keep freed memory for the next volume (:func:`voxelflow.core.memory.keep_freed_memory`, as ``voxelflow
serve`` does); ``--glibc-default`` runs both with glibc's default malloc instead.
``--http`` and ``--loop`` choose uvicorn's HTTP parser and event loop (default: uvicorn's ``auto``, httptools
and uvloop when installed).
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
if sys.argv[6:7] != ["glibc-default"]:
    from voxelflow.core.memory import keep_freed_memory
    keep_freed_memory()  # as `voxelflow serve` does first
import uvicorn
from voxelflow.core.db import Database
from voxelflow.learn.model import Segmenter
from voxelflow.serving.serve import KeyStore, ModelHolder, create_app, proxy_options
work, port, workers, http, loop = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
config = json.loads((work / "model.json").read_text())
seg = Segmenter(config, (work / "weights.safetensors").read_bytes(), device="cpu")
holder = ModelHolder(lambda: (seg, "1"))
holder.reload()
db = Database(f"sqlite:///{work}/voxelflow.db")
app = create_app(holder, KeyStore(db), db=db, workers=workers, queue=64, rate=1e6, burst=10**6)
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", http=http, loop=loop,
            **proxy_options(""))  # as `voxelflow serve`
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


def write_model(work: Path) -> Path:
    """The demo spec's network (seeded, untrained) and its model config in ``work``."""
    import torch

    from voxelflow.learn.train import build_network, state_dict_bytes
    from voxelflow.pipeline import model_config
    from voxelflow.spec.config import load_spec

    spec = load_spec(REPO / "deployments/specs/demo.yaml")
    torch.manual_seed(0)
    (work / "model.json").write_text(json.dumps(model_config(spec)))
    (work / "weights.safetensors").write_bytes(state_dict_bytes(build_network(spec.train.network)))
    return work


def segmenter(work: Path):
    from voxelflow.learn.model import Segmenter

    return Segmenter(json.loads((work / "model.json").read_text()), (work / "weights.safetensors").read_bytes(),
                     device="cpu")


def volume_of(size: int):
    import numpy as np

    return np.random.default_rng(size).random((size,) * 3, dtype=np.float32)


def npy_body(size: int) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, volume_of(size), allow_pickle=False)
    return buf.getvalue()


def service_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "src")])}


def start_service(work: Path, code: str, workers: int, extra: list[str] = (), env: dict[str, str] | None = None
                  ) -> tuple[subprocess.Popen, str, str]:
    """The service (``code``) in a process of its own on a free port, ready; with a predictor key."""
    import httpx

    from flows.server import free_port
    from voxelflow.core.db import Database
    from voxelflow.serving.serve import KeyStore

    db = Database(f"sqlite:///{work}/voxelflow.db")
    key = KeyStore(db).create("bench", ["predictor"])
    db.dispose()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", code, str(work), str(port), str(workers), *extra],
                              env={**service_env(), **(env or {})}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                return server, url, key
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(f"service did not start: {server.communicate()[1][-2000:]}")
        time.sleep(0.2)


def stop_service(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def paired(seg, url: str, key: str, size: int, requests: int) -> tuple[list[float], list[float]]:
    """Latencies (s) of the same volume in-process and over HTTP, alternating request by request."""
    import httpx
    import numpy as np

    from voxelflow.serving.serve import NPY

    volume, body = volume_of(size), npy_body(size)
    affine = np.eye(4)
    headers = {"X-API-Key": key, "Content-Type": NPY}
    local, remote = [], []
    with httpx.Client(timeout=300) as client:

        def over_http() -> None:
            start = time.perf_counter()
            r = client.post(f"{url}/v1/segment", content=body, headers=headers)
            remote.append(time.perf_counter() - start)
            assert r.status_code == 200, r.text
            assert np.load(io.BytesIO(r.content)).shape == volume.shape

        def here() -> None:
            start = time.perf_counter()
            seg.segment(volume, affine)
            local.append(time.perf_counter() - start)

        for _ in range(3):
            here()
            over_http()
        local.clear()
        remote.clear()
        for i in range(requests):
            for step in ((here, over_http) if i % 2 == 0 else (over_http, here)):
                step()
    return local, remote


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system) used so far by this process, or by process ``pid``."""
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


class RawClient:
    """One prepared ``POST`` sent again and again on a keep-alive connection, each answer read into a reused buffer
    and only its status line and length parsed: a load generator that takes little of the two cores it shares with
    the service, as a load tool would (httpx took about 4.3 ms of CPU a request here, 7 % of the request's own)."""

    def __init__(self, url: str, path: str, headers: dict[str, str], body: bytes) -> None:
        from urllib.parse import urlsplit

        where = urlsplit(url)
        self.address = (where.hostname, where.port)
        head = (f"POST {path} HTTP/1.1\r\nHost: {where.netloc}\r\n"
                + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                + f"Content-Length: {len(body)}\r\n\r\n")
        self.request = head.encode("latin-1") + body
        self.buffer = bytearray(1 << 21)
        self.sock = None

    def post(self) -> int:
        import socket

        if self.sock is None:
            self.sock = socket.create_connection(self.address, timeout=300)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(self.request)
        got, end = 0, -1
        while end < 0:
            got += self._receive(got)
            end = self.buffer.find(b"\r\n\r\n", 0, got)
        head = bytes(self.buffer[:end]).decode("latin-1").lower().split("\r\n")
        fields = dict(line.split(":", 1) for line in head[1:])
        if "content-length" not in fields:
            raise RuntimeError(f"an answer without Content-Length: {head}")
        total = end + 4 + int(fields["content-length"])
        if total > len(self.buffer):
            self.buffer.extend(bytes(total - len(self.buffer)))
        while got < total:
            got += self._receive(got)
        if fields.get("connection", "").strip() == "close":
            self.close()
        return int(head[0].split(" ", 2)[1])

    def _receive(self, at: int) -> int:
        if at == len(self.buffer):
            self.buffer.extend(bytes(len(self.buffer)))
        with memoryview(self.buffer) as view:
            n = self.sock.recv_into(view[at:])
        if n == 0:
            raise ConnectionError("the service closed the connection")
        return n

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def saturation(seg, url: str, key: str, size: int, workers: int, clients: int, seconds: float,
               server_pid: int | None = None, client: str = "raw") -> tuple[float, float, list[int], dict[str, float]]:
    """Volumes/s in-process with ``workers`` threads and requests/s with ``clients`` over HTTP, in the order
    in-process, HTTP, HTTP, in-process (``seconds`` each); and the CPU seconds a volume or a request cost: this
    process's (inference in-process; the clients over HTTP) and the service's."""
    import httpx
    import numpy as np

    from voxelflow.serving.serve import NPY

    volume, body, affine = volume_of(size), npy_body(size), np.eye(4)
    headers = {"X-API-Key": key, "Content-Type": NPY}
    codes: list[int] = []
    cpu = {"in_process": 0.0, "clients": 0.0, "service": 0.0}

    def local_round() -> tuple[int, float]:
        done = [0]
        stop_at = time.perf_counter() + seconds

        def spin() -> None:
            while time.perf_counter() < stop_at:
                seg.segment(volume, affine)
                done[0] += 1

        before = cpu_seconds()
        elapsed = in_threads(spin, workers)
        cpu["in_process"] += cpu_seconds() - before
        return done[0], elapsed

    def http_round() -> tuple[int, float]:
        got: list[int] = []
        stop_at = time.perf_counter() + seconds

        def hammer() -> None:
            if client == "raw":
                raw = RawClient(url, "/v1/segment", headers, body)
                try:
                    while time.perf_counter() < stop_at:
                        got.append(raw.post())
                finally:
                    raw.close()
                return
            with httpx.Client(timeout=300) as c:
                while time.perf_counter() < stop_at:
                    got.append(c.post(f"{url}/v1/segment", content=body, headers=headers).status_code)

        before, service_before = cpu_seconds(), cpu_seconds(server_pid) if server_pid else 0.0
        elapsed = in_threads(hammer, clients)
        cpu["clients"] += cpu_seconds() - before
        cpu["service"] += (cpu_seconds(server_pid) - service_before) if server_pid else float("nan")
        codes.extend(got)
        return got.count(200), elapsed

    rounds = [local_round(), http_round(), http_round(), local_round()]
    local = sum(n for n, _ in (rounds[0], rounds[3])) / sum(t for _, t in (rounds[0], rounds[3]))
    remote = sum(n for n, _ in rounds[1:3]) / sum(t for _, t in rounds[1:3])
    volumes, answered = sum(n for n, _ in (rounds[0], rounds[3])), sum(n for n, _ in rounds[1:3])
    per = {"in_process_cpu_s_per_volume": cpu["in_process"] / max(1, volumes),
           "clients_cpu_s_per_request": cpu["clients"] / max(1, answered),
           "service_cpu_s_per_request": cpu["service"] / max(1, answered)}
    return local, remote, codes, per


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=60, help="paired requests per size")
    parser.add_argument("--sizes", default="96,160", help="comma-separated; empty: saturation (and liveness) only")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--saturation-size", type=int, default=96)
    parser.add_argument("--saturation-seconds", type=float, default=6.0)
    parser.add_argument("--saturation-client", choices=["raw", "httpx"], default="raw",
                        help="the saturation clients: prepared requests on raw sockets (default), or httpx")
    parser.add_argument("--http", default="auto", help="uvicorn's HTTP parser: auto, httptools, h11")
    parser.add_argument("--loop", default="auto", help="uvicorn's event loop: auto, uvloop, asyncio")
    parser.add_argument("--glibc-default", action="store_true",
                        help="both sides with glibc's default malloc (freed large blocks go back to the system)")
    parser.add_argument("--live-clients", type=int, default=32)
    parser.add_argument("--live-size", type=int, default=64)
    parser.add_argument("--live-seconds", type=float, default=20.0)
    parser.add_argument("--live-only", action="store_true", help="measure serve_live_p99_ms alone")
    parser.add_argument("--no-live", action="store_true", help="skip serve_live_p99_ms")
    args = parser.parse_args()

    from voxelflow.core.memory import keep_freed_memory

    if not args.glibc_default:
        keep_freed_memory()  # the in-process side keeps freed memory as the service does: like against like
    work = write_model(Path(tempfile.mkdtemp(prefix="voxelflow-bench-serve-")))
    workers = max(1, os.cpu_count() or 1)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()] if not args.live_only else []
    seg = segmenter(work) if not args.live_only else None
    server, url, key = start_service(work, SERVER, workers, extra=[args.http, args.loop,
                                                                   "glibc-default" if args.glibc_default else "keep"])
    pairs, saturated = {}, None
    try:
        for size in sizes:
            pairs[size] = paired(seg, url, key, size, args.requests)
        if not args.live_only:
            saturated = saturation(seg, url, key, args.saturation_size, workers, args.clients,
                                   args.saturation_seconds, server.pid, args.saturation_client)
        if not args.no_live:
            probes, live_codes = live_under_load(url, key, service_env(), args.live_clients, args.live_seconds,
                                                 args.live_size)
    finally:
        stop_service(server)

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"uvicorn http={args.http} loop={args.loop}; malloc {'glibc default' if args.glibc_default else 'freed memory kept'}; "
          f"load average {os.getloadavg()[0]:.1f}")
    metrics = []
    for size, (local, remote) in pairs.items():
        p50_local = statistics.median(local)
        print(f"{size}^3 ({len(npy_body(size)) / 1e6:.1f} MB body), {args.requests} paired requests: "
              f"in-process p50 {p50_local * 1000:.1f} ms, p99 {percentile(local, 0.99) * 1000:.1f} ms; "
              f"HTTP p50 {statistics.median(remote) * 1000:.1f} ms, p99 {percentile(remote, 0.99) * 1000:.1f} ms")
        metrics.append({"metric": "serve_p50_ratio", "size": size,
                        "value": round(statistics.median(remote) / p50_local, 4), "goal": 1.10,
                        "higher_is_better": False})
        windowed = local_window_ratios(local, remote)
        print(f"{size}^3 against the in-process p50 of the {2 * WINDOW + 1} pairs around each request (the "
              f"machine's speed drifts over seconds): HTTP p50 {windowed['http_p50']:.4f}, p99 "
              f"{windowed['http_p99']:.4f}; in-process p99 {windowed['in_process_p99']:.4f} (over the whole run: "
              f"{percentile(local, 0.99) / p50_local:.4f})")
        metrics.append({"metric": "serve_p99_ratio", "size": size,
                        "value": round(percentile(remote, 0.99) / p50_local, 4), "goal": 1.3,
                        "higher_is_better": False,
                        "in_process_p99_ratio": round(percentile(local, 0.99) / p50_local, 4),
                        "local_window": {k: round(v, 4) for k, v in windowed.items()}})
    if saturated is not None:
        local_rps, remote_rps, codes, per = saturated
        print(f"saturation at {args.saturation_size}^3: in-process {local_rps:.2f} volumes/s with {workers} threads, "
              f"HTTP {remote_rps:.2f} requests/s with {args.clients} {args.saturation_client} clients (statuses "
              f"{ {str(c): codes.count(c) for c in sorted(set(codes))} }); CPU a volume in-process "
              f"{per['in_process_cpu_s_per_volume'] * 1000:.1f} ms, a request: service "
              f"{per['service_cpu_s_per_request'] * 1000:.1f} ms, clients {per['clients_cpu_s_per_request'] * 1000:.1f} ms "
              f"(on the same {os.cpu_count()} cores)")
        metrics.append({"metric": "serve_saturation_ratio", "size": args.saturation_size,
                        "value": round(remote_rps / local_rps, 4), "goal": 0.9, "higher_is_better": True})
    if not args.no_live:
        print(f"/health/live: {len(probes)} probes every 50 ms, p50 {statistics.median(probes) * 1000:.1f} ms, "
              f"max {max(probes) * 1000:.1f} ms, while {args.live_clients} clients sent {args.live_size}^3 volumes "
              f"to {workers} workers (statuses {live_codes})")
        metrics.append({"metric": "serve_live_p99_ms", "value": round(percentile(probes, 0.99) * 1000, 1),
                        "goal": 100, "higher_is_better": False})
    for metric in metrics:
        print(json.dumps(metric))


WINDOW = 5  # pairs on each side of a request whose in-process median it is compared with


def local_window_ratios(local: list[float], remote: list[float]) -> dict[str, float]:
    """Each pair's latencies ÷ the in-process median of the ``2 * WINDOW + 1`` pairs around it (a second or two).

    A diagnostic beside ``serve_p99_ratio``, not a replacement: on a shared VM the in-process inference alone
    runs faster and slower for seconds at a time, so the whole run's p99 ÷ p50 holds that drift on both sides.
    Against the median of its neighbours in time, a request's ratio is what the service adds at that moment;
    a tail of the inference's own (a slow call among fast ones) still shows, in ``in_process_p99`` too."""
    http, here = [], []
    for i, (lo, re) in enumerate(zip(local, remote)):
        around = statistics.median(local[max(0, i - WINDOW): i + WINDOW + 1])
        http.append(re / around)
        here.append(lo / around)
    return {"http_p50": statistics.median(http), "http_p99": percentile(http, 0.99),
            "in_process_p99": percentile(here, 0.99)}


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
