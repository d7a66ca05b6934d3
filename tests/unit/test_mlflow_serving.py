"""MLflow serving of a registered model: `mlflow.pyfunc.load_model` and `mlflow models serve` give the masks
voxelflow's own service gives, with the affine passed as a param, and the model loads in an environment
that holds only its requirements.txt (voxelflow's code travels inside the model).

The served model runs in a venv made here from this venv's installed distributions: exactly the
model's requirements and their dependencies (no extras), linked, not downloaded, so the test runs
offline in seconds. `import voxelflow` fails there. What it does not check is that PyPI still serves
those versions.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from tests.unit.helpers import serving_url
from voxelflow.release import registry
from voxelflow.spec.config import Settings

# A real scan shipped with nibabel: 33x41x25 int16, 2 mm voxels, x flipped (LAS). The model's
# Orientationd turns it to RAS and Spacingd resamples it, so its affine changes the mask.
CASE = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"


@pytest.fixture(scope="module")
def champion(tmp_path_factory, tiny_spec, tiny_model_config, tiny_weights):
    """The tiny model logged by ``registry.log_model``, registered and made champion: (tracking URI, name)."""
    settings = Settings(home=tmp_path_factory.mktemp("mlflow-serving"), mlflow_tracking_uri=None)
    uri, name = settings.tracking_uri, tiny_spec.promote.model_name
    lineage = {"dataset_digest": "0123456789abcdef"}
    run_id = registry.start_run(uri, settings.artifact_root, tiny_spec, lineage)
    version = registry.register(uri, registry.log_model(uri, run_id, tiny_model_config, tiny_weights[0]), name,
                                run_id, lineage)
    registry.promote(uri, name, version)
    return uri, name


@pytest.fixture(scope="module")
def case():
    img = nib.load(CASE)
    return np.asanyarray(img.dataobj), np.asarray(img.affine, dtype=np.float64)


@pytest.fixture(scope="module")
def expected(champion, case, tmp_path_factory):
    """Masks of the case by the Segmenter the service loads (``registry.load_segmenter``), in-process."""
    uri, name = champion
    segmenter, _ = registry.load_segmenter(uri, name, tmp_path_factory.mktemp("segmenter-cache"))
    volume, affine = case
    masks = {"affine": segmenter.segment(volume, affine), "grid": segmenter.segment(volume, None),
             "spacing": segmenter.segment(volume, np.diag([2.0, 2.0, 2.0, 1.0]))}
    mask = masks["affine"]
    assert mask.shape == volume.shape and set(np.unique(mask)) == {0, 1}, "the model must give a non-trivial mask"
    assert (mask != masks["grid"]).sum() > 100, "the affine must change the mask, or dropping it goes unseen"
    return masks


# ---------------------------------------------------------------- a venv holding only the model's requirements


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_closure(requirements: list[str]) -> dict:
    """The installed distributions that `pip install -r requirements.txt` would bring: them and their dependencies."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement

    found, todo = {}, [Requirement(line) for line in requirements]
    while todo:
        req = todo.pop()
        name = _normalize(req.name)
        if name in found:
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:  # a dependency for another platform or Python
            continue
        found[name] = dist
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker is None or sub.marker.evaluate({"extra": ""}):
                todo.append(sub)
    return found


def requirements_venv(requirements: list[str], dest: Path) -> Path:
    """A venv (no pip) whose site-packages links exactly :func:`requirement_closure`'s files; returns its bin/."""
    dest = dest.resolve()
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(dest)], check=True, timeout=60)
    python = dest / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True, timeout=60).stdout.strip())
    for dist in requirement_closure(requirements).values():
        base = Path(dist.locate_file(""))
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in sorted(tops):
            if top != "__pycache__" and not top.endswith(".pth") and (base / top).exists() \
                    and not (site / top).exists():
                (site / top).symlink_to(base / top)
    for script, entry in (("mlflow", "from mlflow.cli import cli as main"), ("uvicorn", "from uvicorn.main import main")):
        path = dest / "bin" / script  # `mlflow models serve` runs `uvicorn` from PATH
        path.write_text(f"#!{python}\nimport sys\n{entry}\nsys.exit(main())\n")
        path.chmod(0o755)
    return dest / "bin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(champion, tmp_path_factory):
    """`mlflow models serve -m models:/NAME@champion --env-manager local` in the requirements-only venv.

    Started here and awaited by :func:`served`, so its ~15 s of imports overlap the in-process tests.
    """
    uri, name = champion
    tmp = tmp_path_factory.mktemp("mlflow-serve")
    model_dir = registry.download_model(uri, f"models:/{name}@champion", tmp / "model")
    requirements = (model_dir / "requirements.txt").read_text().split()
    bin_dir = requirements_venv(requirements, tmp / "venv")
    probe = subprocess.run([str(bin_dir / "python"), "-c", "import voxelflow"], capture_output=True, timeout=60,
                           cwd=tmp)
    assert probe.returncode != 0, "voxelflow is importable in the requirements-only venv: the test proves nothing"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(MLFLOW_TRACKING_URI=uri, PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}")
    port = free_port()
    log = (tmp / "serve.log").open("wb")
    proc = subprocess.Popen(
        [str(bin_dir / "mlflow"), "models", "serve", "-m", f"models:/{name}@champion", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    yield {"url": f"http://127.0.0.1:{port}", "proc": proc, "log": tmp / "serve.log"}
    os.killpg(proc.pid, signal.SIGTERM)  # the group holds mlflow and the uvicorn it started
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)
    log.close()


@pytest.fixture(scope="module")
def served(server) -> str:
    """The server's URL once `/ping` answers."""
    return serving_url(server)


def invoke(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# ---------------------------------------------------------------- the tests


def test_logged_model_names_published_requirements_and_carries_its_code(champion, server, tmp_path):
    # `server` only starts `mlflow models serve` here, so that it loads while the next tests run
    uri, name = champion
    local = registry.download_model(uri, f"models:/{name}@champion", tmp_path)
    requirements = (local / "requirements.txt").read_text().split()
    pinned = dict(line.split("==") for line in requirements)
    assert "voxelflow" not in pinned  # not on PyPI: its code is in code/ instead
    assert {"mlflow", "torch", "monai", "nibabel", "safetensors", "numpy"} <= set(pinned)
    from importlib.metadata import version

    for dist, pin in pinned.items():  # what resolved here, without local tags like +cpu that no index serves
        assert "+" not in pin and version(dist).split("+")[0] == pin, dist
    assert (local / "code" / "voxelflow" / "model.py").is_file()
    assert (local / "code" / "voxelflow" / "release" / "mlflow_model.py").is_file()
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert mlmodel["flavors"]["python_function"]["code"] == "code"
    params = {p["name"]: p for p in json.loads(mlmodel["signature"]["params"])}
    assert params["affine"]["type"] == params["spacing"]["type"] == "double"
    assert params["affine"]["shape"] == params["spacing"]["shape"] == [-1]


def test_pyfunc_predict_with_the_affine_equals_the_segmenter(champion, case, expected):
    import mlflow

    from voxelflow.learn.model import SegmentationModel

    uri, name = champion
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    path = list(sys.path)
    try:
        model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    finally:
        sys.path[:] = path  # loading prepends the model's code/ folder
    assert isinstance(model.unwrap_python_model(), SegmentationModel)
    volume, affine = case
    volume = volume.astype(np.float32)  # the signature's tensor type: MLflow refuses int16 in-process
    out = model.predict(volume, params={"affine": affine.ravel().tolist()})
    assert out.dtype == np.uint8 and np.array_equal(out, expected["affine"])
    assert np.array_equal(model.predict(volume), expected["grid"])
    assert np.array_equal(model.predict(volume, params={"spacing": [2, 2, 2]}), expected["spacing"])
    with pytest.raises(ValueError, match="not both"):
        model.predict(volume, params={"affine": affine.ravel().tolist(), "spacing": [1.0, 1.0, 1.0]})
    with pytest.raises(ValueError, match="16 numbers"):
        model.predict(volume, params={"affine": affine[:3].ravel().tolist()})
    with pytest.raises(ValueError, match="singular"):
        model.predict(volume, params={"affine": [0.0] * 15 + [1.0]})
    with pytest.raises(ValueError, match="positive"):
        model.predict(volume, params={"spacing": [1.0, 0.0, 1.0]})


def test_voxelflow_service_gives_the_same_mask(champion, expected, db, tmp_path):
    """voxelflow's own service, loaded as `voxelflow serve` loads it, segments the NIfTI file: the reference."""
    import gzip

    from fastapi.testclient import TestClient

    from voxelflow.serving.serve import KeyStore, ModelHolder, create_app

    uri, name = champion
    holder = ModelHolder(lambda: registry.load_segmenter(uri, name, tmp_path / "cache"))
    holder.reload()
    keys = KeyStore(db)
    client = TestClient(create_app(holder, keys, db=db))
    response = client.post("/v1/segment", content=CASE.read_bytes(),
                           headers={"content-type": "application/x-nifti", "X-API-Key": keys.create("clinic", ["predictor"])})
    assert response.status_code == 200, response.text
    mask = nib.Nifti1Image.from_bytes(gzip.decompress(response.content))
    assert np.array_equal(np.asanyarray(mask.dataobj), expected["affine"])


def test_mlflow_models_serve_answers_with_the_service_mask(served, case, expected):
    volume, affine = case
    status, body = invoke(served, {"inputs": volume.tolist(), "params": {"affine": affine.ravel().tolist()}})
    assert status == 200, body
    mask = np.asarray(body["predictions"])
    assert mask.shape == volume.shape and np.array_equal(mask, expected["affine"])

    status, body = invoke(served, {"inputs": volume.tolist()})  # no params: the voxel grid, as for .npy
    assert status == 200 and np.array_equal(np.asarray(body["predictions"]), expected["grid"])

    status, body = invoke(served, {"inputs": volume.tolist(), "params": {"spacing": [2.0, 2.0, 2.0]}})
    assert status == 200 and np.array_equal(np.asarray(body["predictions"]), expected["spacing"])

    status, body = invoke(served, {"inputs": volume.tolist(), "params": {"affine": [1.0, 2.0]}})
    assert status == 400
    # the served code is the copy inside the model: voxelflow is not installed in the server's venv
    assert re.search(r"code/voxelflow/learn/model\.py.*16 numbers", body["stack_trace"], re.S), body["stack_trace"][-2000:]
