"""keep_freed_memory: a worker thread that allocates the same large arrays again reuses what it freed.

Each case runs in a fresh interpreter (malloc's settings are the whole process's): 48 MB arrays made, written and
dropped 12 times in a thread, reading the process's resident memory once each is dropped. glibc's default gives
each back to the system (the next one is faulted in and zeroed again); kept, it stays for the next.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's malloc only")

LOOP = r"""
import json, os, sys, threading
import numpy as np
def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
if sys.argv[1] == "keep":
    from voxelflow.core.memory import keep_freed_memory
    assert keep_freed_memory() is True
held = []
def work():
    for _ in range(12):
        before = resident()
        a = np.empty(12 * 2**20, dtype=np.float32)  # 48 MB
        a.fill(1.0)
        del a
        held.append(resident() - before)
th = threading.Thread(target=work)
th.start()
th.join()
print(json.dumps(held))
"""


def held(mode: str) -> list[int]:
    """Bytes of resident memory each round left behind after dropping its array."""
    done = subprocess.run([sys.executable, "-c", LOOP, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_freed_blocks_stay_for_the_next_array_instead_of_going_back():
    default, kept = held("default"), held("keep")
    size = 48 * 2**20
    # glibc's default: the freed array went back to the system, every round
    assert max(default) < size // 4, default
    # kept: the first round's array stays resident once freed, and the later rounds reuse it (nothing more held)
    assert kept[0] > size * 3 // 4 and max(abs(x) for x in kept[1:]) < size // 4, kept
