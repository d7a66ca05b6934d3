"""Where one `POST /v1/segment` spends its time, end to end, at each size.

The service of ``benchmarks/serve.py`` (the demo spec's network, uvicorn in a process of its own) answers
``--requests`` volumes one at a time; both processes stamp each step with ``time.perf_counter`` (the same
monotonic clock in both on Linux), so the steps add up to the client's whole request:

- ``client → app``: the client writes the request line and headers, uvicorn parses them and calls the app;
- ``auth``: the API key's lookup and throttle; ``routing``: the rest before the body (middleware, the other checks);
- ``body``: the body arriving (the client writing it, uvicorn parsing it, the app collecting it) and its budget check;
- ``queued``: handed to an inference worker; ``decode``; ``preprocess`` (the model's transforms); ``network``
  (sliding-window logits); ``invert`` (the logits back onto the input's grid, the argmax); ``postprocess``;
  ``encode`` (the mask in the answer's format); ``answer``: back to the event loop and sent;
- ``→ client``: the client reading and parsing the answer.

Between requests this process runs the same inference (``in-process segment``) to compare with the service's
(``service segment``: preprocess + network + invert + postprocess). Prints a table of medians (ms) per size and one JSON line per size. ``--cprofile`` adds the service's event loop
under cProfile (its top functions by own time) for the last size. ``--http``/``--loop`` pick uvicorn's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import npy_body, segmenter, start_service, stop_service, volume_of, write_model  # noqa: E402

PROFILED = r"""
import cProfile, inspect, io, json, os, pstats, sys, time
from pathlib import Path
from voxelflow.core.memory import keep_freed_memory
keep_freed_memory()  # as `voxelflow serve` does first
import monai.transforms
import uvicorn
from voxelflow.core.db import Database
from voxelflow.learn import model as learn_model
from voxelflow.learn.model import Segmenter
from voxelflow.serving import serve_keys
from voxelflow.serving.api import deps, predict
from voxelflow.serving.serve import ModelHolder, create_app, proxy_options
work, port, workers, http, loop = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
now = time.perf_counter
records, cur = [], {}

def timed(owner, name, key):
    fn = getattr(owner, name)
    if inspect.iscoroutinefunction(fn):
        async def waited(*a, **k):
            start = now()
            try:
                return await fn(*a, **k)
            finally:
                cur[key] = cur.get(key, 0.0) + now() - start
                cur.setdefault(key + "_at", start)
        return setattr(owner, name, waited)
    def wrapper(*a, **k):
        start = now()
        try:
            return fn(*a, **k)
        finally:
            cur[key] = cur.get(key, 0.0) + now() - start
            cur.setdefault(key + "_at", start)
    setattr(owner, name, wrapper)

timed(deps.Authentication, "authorize", "auth")
timed(deps.Limits, "check_budget", "budget")
timed(predict, "decode_volume", "decode")
timed(predict, "encode_mask", "encode")
timed(Segmenter, "segment", "segment")
timed(Segmenter, "logits", "network")
timed(Segmenter, "postprocess", "postprocess")

class TimedInvertd(monai.transforms.Invertd):
    def __call__(self, data):
        start = now()
        try:
            return super().__call__(data)
        finally:
            cur["invert"] = now() - start
monai.transforms.Invertd = TimedInvertd

call = predict.Inference.__call__
def inference(self, *a, **k):
    cur["worker_at"] = now()
    try:
        return call(self, *a, **k)
    finally:
        cur["worker_end"] = now()
predict.Inference.__call__ = inference

config = json.loads((work / "model.json").read_text())
seg = Segmenter(config, (work / "weights.safetensors").read_bytes(), device="cpu")
holder = ModelHolder(lambda: (seg, "1"))
holder.reload()
db = Database(f"sqlite:///{work}/voxelflow.db")
app = create_app(holder, serve_keys.KeyStore(db), db=db, workers=workers, queue=64, rate=1e6, burst=10**6)

async def stamped(scope, receive, send):
    if scope["type"] == "http" and scope["path"] == "/stop-profile":  # a normal exit: the records get written
        server.should_exit = True
        await send({"type": "http.response.start", "status": 204, "headers": []})
        return await send({"type": "http.response.body", "body": b""})
    if scope["type"] != "http" or scope["path"] != "/v1/segment":
        return await app(scope, receive, send)
    cur.clear()
    cur["start"] = now()
    async def rx():
        message = await receive()
        if message["type"] == "http.request":
            cur.setdefault("body_at", now())
            if not message.get("more_body"):
                cur["body_end"] = now()
        return message
    async def tx(message):
        if message["type"] == "http.response.start":
            cur["send_at"] = now()
        await send(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            cur["sent"] = now()
            rid = dict(scope["headers"]).get(b"x-request-id", b"").decode()
            records.append({"rid": rid, **cur})
    await app(scope, rx, tx)

profiler = cProfile.Profile() if os.environ.get("PROFILE_LOOP") else None
if profiler:
    profiler.enable()
try:
    server = uvicorn.Server(uvicorn.Config(stamped, host="127.0.0.1", port=port, log_level="warning", http=http,
                                           loop=loop, **proxy_options("")))
    server.run()
finally:
    if profiler:
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(22)
        (work / "loop_profile.txt").write_text(out.getvalue())
    (work / "records.json").write_text(json.dumps(records))
"""

STEPS = ("client → app", "auth", "routing", "body", "queued", "decode", "preprocess", "network", "invert",
         "postprocess", "encode", "answer", "→ client")


def breakdown(client: dict[str, float], server: dict[str, float]) -> dict[str, float]:
    """One request's steps (s) from the client's stamps (sent, done) and the service's."""
    s = server
    auth_at = s.get("auth_at", s["start"])
    segment = s["segment"]
    inner = s.get("network", 0.0) + s.get("invert", 0.0) + s.get("postprocess", 0.0)
    steps = {
        "client → app": s["start"] - client["sent"],
        "auth": s.get("auth", 0.0),
        "routing": (auth_at - s["start"]) + (s["body_at"] - auth_at - s.get("auth", 0.0)),
        "body": s["body_end"] - s["body_at"] + s.get("budget", 0.0),
        "queued": s["worker_at"] - s["body_end"] - s.get("budget", 0.0),
        "decode": s["decode"],
        "preprocess": segment - inner,
        "network": s.get("network", 0.0),
        "invert": s.get("invert", 0.0),
        "postprocess": s.get("postprocess", 0.0),
        "encode": s["encode"],
        "answer": s["sent"] - s["worker_end"] + (s["worker_end"] - s["worker_at"] - s["decode"] - segment
                                                 - s["encode"]),
        "→ client": client["done"] - s["sent"],
    }
    steps["total"] = client["done"] - client["sent"]
    return steps


def profile(work: Path, size: int, requests: int, http: str, loop: str, accept: str | None,
            cprofile: bool) -> tuple[dict[str, float], str]:
    import httpx
    import numpy as np

    env = {"PROFILE_LOOP": "1"} if cprofile else {}
    service, url, key = start_service(work, PROFILED, 2, extra=[http, loop], env=env)
    body = npy_body(size)
    headers = {"X-API-Key": key, "Content-Type": "application/x-npy", **({"Accept": accept} if accept else {})}
    stamps, here = {}, []
    seg, volume = segmenter(work), volume_of(size)
    try:
        with httpx.Client(timeout=300) as client:
            for i in range(3 + requests):
                start = time.perf_counter()
                seg.segment(volume, np.eye(4))  # the same inference in this process, between requests
                here.append(time.perf_counter() - start)
                rid = f"p{i}"
                sent = time.perf_counter()
                r = client.post(f"{url}/v1/segment", content=body, headers={**headers, "X-Request-ID": rid})
                stamps[rid] = {"sent": sent, "done": time.perf_counter()}
                assert r.status_code == 200, r.text
        httpx.get(f"{url}/stop-profile", timeout=10)
        service.wait(timeout=60)
    finally:
        stop_service(service)
    records = {r["rid"]: r for r in json.loads((work / "records.json").read_text())}
    rows = [breakdown(stamps[f"p{i}"], records[f"p{i}"]) for i in range(3, 3 + requests)]
    medians = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    medians["not inference"] = statistics.median(
        r["total"] - records[f"p{i}"]["segment"] for i, r in zip(range(3, 3 + requests), rows))
    medians["in-process segment"] = statistics.median(here[3:])
    medians["service segment"] = statistics.median(records[f"p{i}"]["segment"] for i in range(3, 3 + requests))
    medians["rows"] = [{**r, "segment": records[f"p{i}"]["segment"], "in-process": here[i]}
                       for i, r in zip(range(3, 3 + requests), rows)]
    loop_profile = (work / "loop_profile.txt").read_text() if cprofile else ""
    return medians, loop_profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="96,160")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--http", default="auto", help="uvicorn's HTTP parser: auto, h11, httptools")
    parser.add_argument("--loop", default="auto", help="uvicorn's event loop: auto, asyncio, uvloop")
    parser.add_argument("--accept", default=None, help="the Accept header sent (default: none)")
    parser.add_argument("--cprofile", action="store_true")
    parser.add_argument("--slowest", type=int, default=0, help="also print the N slowest requests' steps (the tail)")
    args = parser.parse_args()
    from voxelflow.core.memory import keep_freed_memory

    keep_freed_memory()  # this process's in-process segment as the service's (benchmarks/serve.py)
    work = write_model(Path(tempfile.mkdtemp(prefix="voxelflow-profile-serve-")))
    sizes = [int(s) for s in args.sizes.split(",")]
    results = {}
    for size in sizes:
        results[size], loop_profile = profile(work, size, args.requests, args.http, args.loop, args.accept,
                                              args.cprofile and size == sizes[-1])
    print(f"machine: {os.cpu_count()} cores; uvicorn http={args.http} loop={args.loop}; Accept {args.accept}; "
          f"medians of {args.requests} requests (ms)")
    print("| step | " + " | ".join(f"{s}³" for s in sizes) + " |")
    print("| --- |" + " --- |" * len(sizes))
    for step in (*STEPS, "total", "not inference", "service segment", "in-process segment"):
        print(f"| {step} | " + " | ".join(f"{results[s][step] * 1000:.2f}" for s in sizes) + " |")
    for size in sizes:
        rows = results[size].pop("rows")
        for row in sorted(rows, key=lambda r: -r["total"])[:args.slowest]:
            print(f"slowest at {size}³ (ms): " + ", ".join(f"{k} {v * 1000:.1f}" for k, v in row.items()))
        print(json.dumps({"size": size, "http": args.http, "loop": args.loop,
                          **{k: round(v * 1000, 3) for k, v in results[size].items()}}))
    if args.cprofile:
        print(loop_profile)


if __name__ == "__main__":
    main()
