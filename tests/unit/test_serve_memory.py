"""Bounded memory: a request's working set is estimated from its header and refused before any voxel is read."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
import textwrap
import time

import nibabel as nib
import numpy as np
import pytest
from fastapi.testclient import TestClient

from voxelflow.serving.serve import NPY, KeyStore, ModelHolder, create_app, declared_volume, working_set_bytes


def npy_header_only(shape, dtype="<f4") -> bytes:
    """A .npy header declaring ``shape`` with no voxels behind it."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def nifti_bomb(shape, dtype=np.uint8, zeros: int = 0) -> bytes:
    """A gzip NIfTI whose header declares ``shape`` followed by ``zeros`` zero bytes (inflating far past the body)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(dtype)
    hdr.set_data_shape(shape)
    hdr.set_data_offset(352)
    return gzip.compress(hdr.binaryblock + b"\0" * (4 + zeros), compresslevel=9)


def test_header_is_read_without_the_voxels():
    assert declared_volume(npy_header_only((30000, 30000, 30000)), NPY)[0] == (30000, 30000, 30000)
    shape, dtype, spacing = declared_volume(nifti_bomb((500, 500, 500)), "application/gzip")
    assert shape == (500, 500, 500) and dtype == np.uint8 and spacing == (1.0, 1.0, 1.0)


def test_working_set_counts_the_model_not_only_the_input(tiny_model_config):
    shape = (64, 64, 64)
    input_bytes = 64**3
    need = working_set_bytes(shape, np.dtype(np.uint8), (1.0, 1.0, 1.0), tiny_model_config)
    assert need > 10 * input_bytes  # float copies, logits per channel
    wider = dict(tiny_model_config, network={"UNet": {**next(iter(tiny_model_config["network"].values())),
                                                      "out_channels": 8}})
    assert working_set_bytes(shape, np.dtype(np.uint8), (1.0, 1.0, 1.0), wider) > need
    pixdim = next(t["Spacingd"]["pixdim"] for t in tiny_model_config["transforms"] if "Spacingd" in t)
    coarse = tuple(4 * float(p) for p in pixdim)  # resampled to the model's spacing: 64x the voxels
    assert working_set_bytes(shape, np.dtype(np.uint8), coarse, tiny_model_config) > 4 * need


def test_over_the_budget_is_413_and_within_it_is_segmented(segmenter, db):
    keys = KeyStore(db)
    key = keys.create("clinic", ["predictor"])
    holder = ModelHolder(lambda: (segmenter, "1"))
    holder.reload()
    need = working_set_bytes((14, 12, 10), np.dtype(np.float32), (1.0, 1.0, 1.0), segmenter.config)
    client = TestClient(create_app(holder, keys, db=db, memory_budget=need + 1))
    ok = io.BytesIO()
    np.save(ok, np.random.default_rng(0).random((14, 12, 10), dtype=np.float32))
    headers = {"X-API-Key": key, "content-type": NPY}
    assert client.post("/v1/segment", content=ok.getvalue(), headers=headers).status_code == 200
    big = io.BytesIO()
    np.save(big, np.zeros((30, 30, 30), np.float32))
    response = client.post("/v1/segment", content=big.getvalue(), headers=headers)
    assert response.status_code == 413 and "budget" in response.json()["detail"]
    assert client.get("/health/live").status_code == 200


SERVER = textwrap.dedent("""
    import sys
    from pathlib import Path

    from voxelflow.core.db import Database
    from voxelflow.learn.model import Segmenter
    from voxelflow.serving.serve import KeyStore, ModelHolder, Server, create_app

    model_dir, db_url = sys.argv[1], sys.argv[2]
    seg = Segmenter.from_dir(model_dir, device="cpu")
    holder = ModelHolder(lambda: (seg, "1"))
    holder.reload()
    db = Database(db_url)
    server = Server(create_app(holder, KeyStore(db), db=db, workers=1, queue=1,
                                   memory_budget=192 * 2**20)).start()
    print(server.port, flush=True)
    sys.stdin.read()
    server.stop()
""")


def peak_rss(pid: int) -> int:
    """The process's peak resident set (Linux VmHWM), bytes."""
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS is read from /proc")
def test_server_peak_rss_stays_bounded_under_a_gzip_bomb_and_an_absurd_header(
        tmp_path, tiny_model_config, tiny_weights, db, sqlite_url):
    """A 120 KiB body declaring 500^3 voxels (inside the voxel limit) and headers declaring 30000^3: refused from the
    header alone under a 192 MiB per-request budget; the server's peak RSS grows by less than 256 MiB."""
    import httpx
    import psutil

    (tmp_path / "model.json").write_text(json.dumps(tiny_model_config))
    (tmp_path / "weights.safetensors").write_bytes(tiny_weights[0])
    key = KeyStore(db).create("clinic", ["predictor"])
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(tmp_path), sqlite_url],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        process = psutil.Process(proc.pid)
        url = f"http://127.0.0.1:{port}/v1/segment"
        headers = {"X-API-Key": key}
        with httpx.Client(timeout=60) as client:
            warm = io.BytesIO()
            np.save(warm, np.random.default_rng(0).random((24, 24, 24), dtype=np.float32))
            assert client.post(url, content=warm.getvalue(), headers={**headers, "content-type": NPY}).status_code \
                == 200
            time.sleep(0.2)
            idle = max(peak_rss(proc.pid), process.memory_info().rss)
            bomb = nifti_bomb((500, 500, 500), zeros=500**3)  # ~120 KiB on the wire, 125 MB inflated
            assert len(bomb) < 1024**2
            absurd = nifti_bomb((30000, 30000, 30000), np.float32, zeros=8 * 1024**2)
            for body, content_type, why in ((bomb, "application/gzip", "budget"),
                                            (absurd, "application/gzip", "too-large"),
                                            (npy_header_only((30000, 30000, 30000)), NPY, "too-large")):
                for _ in range(3):
                    response = client.post(url, content=body, headers={**headers, "content-type": content_type})
                    assert response.status_code == 413, (response.status_code, response.headers)
                    assert why in response.json()["detail"]
            assert client.get(f"http://127.0.0.1:{port}/health/live").status_code == 200
        grown = peak_rss(proc.pid) - idle
        print(f"idle peak RSS {idle / 2**20:.0f} MiB, growth under the attack {grown / 2**20:.1f} MiB")
        assert grown < 256 * 1024**2, f"peak RSS grew by {grown / 2**20:.0f} MiB"
        # a real volume: what the inference really took stays within the estimate the budget is checked against
        real = np.random.default_rng(1).random((96, 96, 96), dtype=np.float32)
        before = peak_rss(proc.pid)
        with httpx.Client(timeout=120) as client:
            assert client.post(url, content=_npy(real), headers={**headers, "content-type": NPY}).status_code == 200
        used = peak_rss(proc.pid) - before
        estimate = working_set_bytes(real.shape, real.dtype, (1.0, 1.0, 1.0), tiny_model_config)
        print(f"96^3 float32: peak RSS grew {used / 2**20:.1f} MiB, estimated working set {estimate / 2**20:.1f} MiB")
        assert used <= estimate
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
