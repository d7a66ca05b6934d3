"""Small helpers the unit tests share (fixtures live in conftest.py)."""

from __future__ import annotations

import io

import numpy as np


def npy(array: np.ndarray) -> bytes:
    """``array`` as the bytes of a ``.npy`` file, as a client sends a volume."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def serving_url(server: dict, timeout_s: float = 120) -> str:
    """The URL of an `mlflow models serve` process (``server``: proc, url, log) once its ``/ping`` answers."""
    import time
    import urllib.error
    import urllib.request

    import pytest

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server["proc"].poll() is not None:
            pytest.fail(f"mlflow models serve exited {server['proc'].returncode}:\n"
                        f"{server['log'].read_text(errors='replace')[-4000:]}")
        try:
            with urllib.request.urlopen(f"{server['url']}/ping", timeout=2) as response:
                if response.status == 200:
                    return server["url"]
        except (urllib.error.URLError, OSError):
            time.sleep(0.25)
    pytest.fail(f"mlflow models serve did not answer in {timeout_s:.0f} s:\n"
                f"{server['log'].read_text(errors='replace')[-4000:]}")
