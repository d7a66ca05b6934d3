"""The walkthrough notebook runs top to bottom and shows its pictures and the closing report."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "notebooks" / "01-walkthrough.ipynb"
KERNEL = "python3"


def _runs_this_python(argv0: str) -> bool:
    """Whether a kernel spec's interpreter is the one running the tests (jupyter_client maps bare 'python')."""
    major, minor = sys.version_info[:2]
    if argv0 in ("python", f"python{major}", f"python{major}.{minor}"):
        return True
    found = shutil.which(argv0) or argv0
    return os.path.abspath(found) == os.path.abspath(sys.executable)


@pytest.fixture
def kernel_name(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> str:
    """A ``python3`` kernel spec that starts this interpreter; installed under a temporary prefix if needed."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        argv0 = KernelSpecManager().get_kernel_spec(KERNEL).argv[0]
    except NoSuchKernel:
        argv0 = None
    if argv0 is None or not _runs_this_python(argv0):
        prefix = tmp_path_factory.mktemp("kernel-prefix")
        subprocess.run(
            [sys.executable, "-m", "ipykernel", "install", "--prefix", str(prefix), "--name", KERNEL],
            check=True, capture_output=True,
        )
        jupyter_path = str(prefix / "share" / "jupyter")
        monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(filter(None, [jupyter_path, os.environ.get("JUPYTER_PATH")])))
    return KERNEL


def test_committed_notebook_has_no_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the walkthrough has no code cells"
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, f"clear the outputs of cells {dirty} before committing"
    assert "import prefect" not in "\n".join(c.source for c in code), "the walkthrough must not need Prefect"


@pytest.mark.slow
def test_walkthrough_notebook_runs(tmp_path: Path, kernel_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("VOXELFLOW_HOME", str(home))
    monkeypatch.setenv("VOXELFLOW_NOTEBOOK_EPOCHS", "4")
    monkeypatch.setenv("VOXELFLOW_DASK_WORKERS", "1")  # one worker starts faster on small CI machines
    for var in ("VOXELFLOW_SPEC", "VOXELFLOW_MLFLOW_TRACKING_URI", "VOXELFLOW_DASK_SCHEDULER"):
        monkeypatch.delenv(var, raising=False)

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name=kernel_name, resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    try:
        client.execute()
    finally:  # keep the executed notebook for inspection, failed or not
        nbformat.write(nb, tmp_path / NOTEBOOK.name)

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, f"cells raised: {[e.ename + ': ' + e.evalue for e in errors]}"

    pngs = [o.data["image/png"] for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) >= 2, f"expected at least 2 inline pictures, got {len(pngs)}"
    for i, png in enumerate(pngs):
        raw = base64.b64decode(png)
        assert raw.startswith(b"\x89PNG"), f"picture {i} is not a PNG"
        (tmp_path / f"figure-{i}.png").write_bytes(raw)

    markdown = [o.data["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert markdown, "no markdown output"
    assert "champion" in markdown[-1], markdown[-1]
    assert (home / "voxelflow.db").exists() and (home / "datasets").is_dir(), "the notebook did not use VOXELFLOW_HOME"
