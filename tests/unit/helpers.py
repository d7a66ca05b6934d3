"""Small helpers the unit tests share (fixtures live in conftest.py)."""

from __future__ import annotations

import io

import numpy as np


def npy(array: np.ndarray) -> bytes:
    """``array`` as the bytes of a ``.npy`` file, as a client sends a volume."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()
