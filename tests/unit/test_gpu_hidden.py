"""On a GPU node the CPU suite must not see the GPUs: the conftest hides them from the test process and
its children unless only the ``gpu`` tests run."""

from __future__ import annotations

import os
import subprocess
import sys


def test_the_suite_sees_no_gpu_in_its_process_and_children():
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == ""
    out = subprocess.run([sys.executable, "-c", "import os, torch; print(repr(os.environ['CUDA_VISIBLE_DEVICES']), "
                          "torch.cuda.device_count())"], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["''", "0"]
