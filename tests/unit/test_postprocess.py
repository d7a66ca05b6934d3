"""evaluate.postprocess: MONAI post transforms on the mask, checked at load, stored with the registered model.

One case (a real scan shipped with nibabel) is segmented by the tiny model with KeepLargestConnectedComponent
through each way a mask leaves voxelflow: the evaluation path (a Segmenter from the model config and weights,
as pipeline.evaluate_stage builds it), the service over HTTP on loopback, `voxelflow predict`, and
`mlflow models serve` in an environment holding only the model's requirements. All four masks are equal, and
not the mask without post-processing. A model registered before the key existed loads and segments as before.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
import yaml
from scipy import ndimage

from tests.unit.helpers import serving_url as wait_for
from tests.unit.test_mlflow_serving import free_port, invoke, requirements_venv
from tests.unit.test_predict import spec_data
from voxelflow import pipeline
from voxelflow.learn.model import Segmenter
from voxelflow.release import registry
from voxelflow.spec.config import Settings, SpecError, validate_spec

CASE = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"  # 33x41x25, 2 mm, LAS
MODEL = "tiny-post"
POST = [{"KeepLargestConnectedComponent": {"applied_labels": [1], "connectivity": 1}}]


def spec_with(postprocess, name: str = "post", source: str | Path = "unused"):
    data = spec_data(name, source)
    data["promote"]["model_name"] = MODEL
    data["evaluate"]["postprocess"] = postprocess
    return validate_spec(data, "post.yaml")


def components(mask: np.ndarray, label: int = 1) -> int:
    return ndimage.label(mask == label)[1]  # 6-connectivity, as connectivity: 1


# ---------------------------------------------------------------- the spec key


def test_postprocess_by_name_or_mapping_is_accepted_and_reaches_the_model_config():
    spec = spec_with(["FillHoles", {"KeepLargestConnectedComponent": {"applied_labels": [1]}},
                      {"RemoveSmallObjects": {"min_size": 10, "by_measure": True}}])
    expected = [{"FillHoles": {}}, {"KeepLargestConnectedComponent": {"applied_labels": [1]}},
                {"RemoveSmallObjects": {"min_size": 10, "by_measure": True}}]
    assert spec.evaluate.postprocess == expected
    assert pipeline.model_config(spec)["postprocess"] == expected
    assert spec_with(None).evaluate.postprocess == [] and pipeline.model_config(spec_with([]))["postprocess"] == []


@pytest.mark.parametrize("item,message", [
    ("NoSuchTransform", "unknown transform 'NoSuchTransform'"),
    ({"KeepLargestConnectedComponent": {"applied_label": [1]}}, "has no argument applied_label; it takes: "
                                                                 "applied_labels"),
    ({"KeepLargestConnectedComponent": {"connectivity": "six"}}, "argument 'connectivity' = 'six' does not fit"),
    ("os:system", "the package 'os' is not among the allowed imports"),
    ("KeepLargestConnectedComponentd", "is a dictionary transform; the mask takes array transforms "
                                       "(KeepLargestConnectedComponent)"),
    ("RandFlip", "is random"),
    ("LabelFilter", "needs the argument(s) applied_labels"),
    ("voxelflow.learn.model:Segmenter", "is not a MONAI transform"),
    ({"FillHoles": {}, "KeepLargestConnectedComponent": {}}, "one-key mapping"),
])
def test_a_bad_postprocess_entry_is_refused_naming_the_key(item, message):
    with pytest.raises(SpecError) as exc:
        spec_with([item])
    text = " ".join(str(exc.value).split())
    assert "post.yaml" in text and "evaluate.postprocess" in text and message in text, text


def test_a_users_transform_by_import_path_is_allowed_by_the_allow_list_and_travels_with_the_model(
        tmp_path, monkeypatch, tiny_weights):
    from voxelflow.core import user_code

    package = tmp_path / "vf_user_post"
    package.mkdir()
    (package / "__init__.py").write_text(
        "from monai.transforms import Transform\n\n\n"
        "class Erase(Transform):\n"
        "    def __init__(self, label: int = 1) -> None:\n"
        "        self.label = label\n\n"
        "    def __call__(self, img):\n"
        "        out = img.clone()\n"
        "        out[out == self.label] = 0\n"
        "        return out\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SpecError, match="'vf_user_post' is not among the allowed imports"):
        spec_with(["vf_user_post:Erase"])
    monkeypatch.setenv("VOXELFLOW_ALLOWED_IMPORTS", "monai,torch,voxelflow,vf_user_post")
    with pytest.raises(SpecError, match="has no argument lable"):
        spec_with([{"vf_user_post:Erase": {"lable": 1}}])
    spec = spec_with(["vf_user_post:Erase"])
    config = pipeline.model_config(spec)
    assert config["postprocess"] == [{"vf_user_post:Erase": {}}]
    assert user_code.packages(config) == user_code.spec_packages(spec) == ["vf_user_post"]
    assert user_code.code_paths(config) == [str(package)]  # shipped under the model's code/
    plain = Segmenter({**config, "postprocess": []}, tiny_weights[0], device="cpu")
    volume = np.random.default_rng(0).random((20, 20, 20), dtype=np.float32)
    assert (plain.segment(volume) == 1).any()
    assert not (Segmenter(config, tiny_weights[0], device="cpu").segment(volume) == 1).any()


def test_keep_largest_component_keeps_one_of_two_blobs_and_measures_use_the_affine(tiny_model_config, tiny_weights):
    labels = np.zeros((12, 12, 12), dtype=np.uint8)
    labels[1:3, 1:3, 1:3] = 1  # 8 voxels
    labels[5:10, 5:10, 5:10] = 1  # 125 voxels
    import torch

    seg = Segmenter({**tiny_model_config, "postprocess": POST}, tiny_weights[0], device="cpu")
    kept = seg.postprocess(torch.from_numpy(labels), np.eye(4))
    assert kept.dtype == np.uint8 and kept.shape == labels.shape
    assert components(labels) == 2 and components(kept) == 1 and (kept == 1).sum() == 125

    # by_measure: 20 mm^3 is 20 voxels at 1 mm (the small blob goes) and 2.5 voxels at 2 mm (it stays)
    small = Segmenter({**tiny_model_config, "postprocess": [{"RemoveSmallObjects": {"min_size": 20,
                                                                                      "by_measure": True}}]},
                      tiny_weights[0], device="cpu")
    assert (small.postprocess(torch.from_numpy(labels), np.eye(4)) == 1).sum() == 125
    assert (small.postprocess(torch.from_numpy(labels), np.diag([2.0, 2.0, 2.0, 1.0])) == 1).sum() == 133


# ---------------------------------------------------------------- one case, four ways out


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """The case in the folder layout, unlabelled: what `voxelflow predict` segments."""
    root = tmp_path_factory.mktemp("post-source") / "incoming"
    (root / "case_00").mkdir(parents=True)
    nib.save(nib.load(CASE), root / "case_00" / "image.nii.gz")
    return root


@pytest.fixture(scope="module")
def registered(tmp_path_factory, source, tiny_weights):
    """The tiny model with POST, logged by registry.log_model from pipeline.model_config and made champion:
    (tracking URI, spec, model config)."""
    spec = spec_with(POST, source=source)
    config = pipeline.model_config(spec)
    settings = Settings(home=tmp_path_factory.mktemp("post-mlflow"), mlflow_tracking_uri=None)
    uri, lineage = settings.tracking_uri, {"dataset_digest": "0123456789abcdef"}
    run_id = registry.start_run(uri, settings.artifact_root, spec, lineage)
    version = registry.register(uri, registry.log_model(uri, run_id, config, tiny_weights[0]), MODEL, run_id, lineage)
    registry.promote(uri, MODEL, version)
    return uri, spec, config


@pytest.fixture(scope="module")
def mlflow_served(registered, tmp_path_factory):
    """`mlflow models serve -m models:/tiny-post@champion --env-manager local` in a venv of the model's
    requirements.txt alone (voxelflow's code comes from inside the model); its URL, once started."""
    uri, _, _ = registered
    tmp = tmp_path_factory.mktemp("post-serve")
    model_dir = registry.download_model(uri, f"models:/{MODEL}@champion", tmp / "model")
    requirements = (model_dir / "requirements.txt").read_text().split()
    assert any(r.startswith("scikit-image==") for r in requirements), "the post transforms need scikit-image"
    bin_dir = requirements_venv(requirements, tmp / "venv")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(MLFLOW_TRACKING_URI=uri, PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}")
    port, log = free_port(), (tmp / "serve.log").open("wb")
    proc = subprocess.Popen(
        [str(bin_dir / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}@champion", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    yield {"url": f"http://127.0.0.1:{port}", "proc": proc, "log": tmp / "serve.log"}
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)
    log.close()




def test_evaluation_service_predict_and_mlflow_serving_give_the_same_post_processed_mask(
        registered, mlflow_served, source, tiny_weights, db, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app
    from voxelflow.serving.serve import KeyStore, ModelHolder, Server, create_app

    uri, spec, config = registered
    img = nib.load(CASE)
    volume, affine = np.asanyarray(img.dataobj), np.asarray(img.affine, dtype=np.float64)

    # (1) evaluation: the candidate as pipeline.evaluate_stage builds it, from the model config and its weights
    evaluated = Segmenter(config, tiny_weights[0]).segment(volume, affine)
    plain = Segmenter({**config, "postprocess": []}, tiny_weights[0]).segment(volume, affine)
    assert components(plain) > 1 and components(evaluated) == 1, "the case must need the post-processing"
    assert (evaluated != plain).sum() > 0 and ((evaluated == 1) <= (plain == 1)).all()

    # (2) the service, loaded as `voxelflow serve` loads it (the champion from the registry), over HTTP
    holder = ModelHolder(lambda: registry.load_segmenter(uri, MODEL, tmp_path / "cache"))
    holder.reload()
    keys = KeyStore(db)
    with Server(create_app(holder, keys, db=db)) as server:
        response = httpx.post(f"{server.url}/v1/segment", content=CASE.read_bytes(), timeout=60, headers={
            "content-type": "application/x-nifti", "X-API-Key": keys.create("clinic", ["predictor"])})
    assert response.status_code == 200, response.text
    served = np.asanyarray(nib.Nifti1Image.from_bytes(gzip.decompress(response.content)).dataobj)

    # (3) `voxelflow predict`: the case ingested, segmented by the champion, written as NIfTI; its spec names
    # no post-processing: the model carries its own
    data = spec_data("post-predict", source)
    data["promote"]["model_name"] = MODEL
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(data))
    env = {**os.environ, "VOXELFLOW_HOME": str(tmp_path / "home"), "VOXELFLOW_MLFLOW_TRACKING_URI": uri}
    result = CliRunner().invoke(app, ["predict", str(source), "--out", str(tmp_path / "masks"), "--spec",
                                      str(spec_file)], env=env)
    assert result.exit_code == 0, result.output
    written = list((tmp_path / "masks" / f"{MODEL}-v1").glob("*.nii.gz"))
    assert len(written) == 1, written
    predicted = np.asanyarray(nib.load(written[0]).dataobj)

    # (4) `mlflow models serve`, the affine as a param
    status, body = invoke(wait_for(mlflow_served), {"inputs": volume.tolist(),
                                                    "params": {"affine": affine.ravel().tolist()}})
    assert status == 200, body
    mlflow_mask = np.asarray(body["predictions"])

    for name, mask in {"service": served, "voxelflow predict": predicted, "mlflow models serve": mlflow_mask}.items():
        assert mask.shape == volume.shape and np.array_equal(mask, evaluated), name


def test_a_model_registered_without_postprocess_loads_and_segments_as_before(tiny_model_config, tiny_weights,
                                                                            tmp_path):
    assert "postprocess" not in tiny_model_config  # the model config of a model registered before the key
    folder = tmp_path / "artifacts"
    folder.mkdir()
    (folder / "model.json").write_text(json.dumps(tiny_model_config))
    (folder / "weights.safetensors").write_bytes(tiny_weights[0])
    old = Segmenter.from_dir(folder, device="cpu")  # as registry.load_version and the pyfunc's load_context do
    assert old.post is None
    img = nib.load(CASE)
    volume, affine = np.asanyarray(img.dataobj), img.affine
    mask = old.segment(volume, affine)
    none = Segmenter({**tiny_model_config, "postprocess": []}, tiny_weights[0], device="cpu").segment(volume, affine)
    post = Segmenter({**tiny_model_config, "postprocess": POST}, tiny_weights[0], device="cpu").segment(volume, affine)
    assert mask.dtype == np.uint8 and np.array_equal(mask, none) and components(mask) > 1
    assert not np.array_equal(mask, post)
