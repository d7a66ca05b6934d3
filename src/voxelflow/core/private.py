"""A folder only this user can use, for what this user's processes trust from one another (warm-start sockets, the
MLflow schema every new tracking database is copied from)."""

from __future__ import annotations

import os
from pathlib import Path


def private_folder(where: Path) -> Path:
    """``where``, made 0700 if missing; PermissionError when another user owns it or anyone else may use it."""
    where.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = where.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise PermissionError(f"{where} is not a folder only this user can use (owner {info.st_uid}, mode "
                              f"{oct(info.st_mode & 0o777)})")
    return where
