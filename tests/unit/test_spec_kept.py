"""Specs validated before (``voxelflow.spec.checked``): the second load of a spec gives the same spec as the
full check, without importing MONAI; a kept form that was tampered with, is unreadable or names a package the key
does not cover is checked in full; a spec that names a user's component, or a bad spec, is never kept."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO

SPECS = sorted((REPO / "deployments/specs").glob("*.yaml"))
CANDIDATES = {"grid": {"train.learning_rate": [0.01, 0.003]}, "select": {"metric": "dice"}}


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("VOXELFLOW_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _kept(home):
    return sorted((home / "cache" / "specs").glob("*.json"))


def _same(a, b) -> None:
    assert a.model_dump(mode="json", by_alias=True) == b.model_dump(mode="json", by_alias=True)
    assert a.digest() == b.digest()
    assert [(c.index, c.overrides, c.spec.digest()) for c in a.candidate_specs()] == \
        [(c.index, c.overrides, c.spec.digest()) for c in b.candidate_specs()]


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_a_kept_spec_loads_as_the_full_check_made_it(home, path):
    from voxelflow.spec import checked
    from voxelflow.spec.config import load_spec

    full = load_spec(path)
    [kept] = _kept(home)
    with checked.trusted():  # what the second load does: no component is imported
        again = load_spec(path)
    _same(full, again)
    assert _kept(home) == [kept]


def test_candidates_and_overlays_are_kept_as_their_own_specs(home, tmp_path):
    from voxelflow.spec.config import load_spec, validate_spec

    data = yaml.safe_load((REPO / "deployments/specs/demo.yaml").read_text())
    data["candidates"] = CANDIDATES
    first = validate_spec(json.loads(json.dumps(data)))
    assert len(first.candidate_specs()) == 2
    _same(first, validate_spec(json.loads(json.dumps(data))))
    quick = load_spec(REPO / "deployments/specs/demo.yaml", [REPO / "deployments/params/quick.yaml"])
    plain = load_spec(REPO / "deployments/specs/demo.yaml")
    assert len(_kept(home)) == 3 and quick.digest() != plain.digest()
    _same(quick, load_spec(REPO / "deployments/specs/demo.yaml", [REPO / "deployments/params/quick.yaml"]))


def test_the_second_load_in_a_new_process_imports_no_monai(home):
    code = ("import sys; from voxelflow.spec.config import load_spec; "
            "s = load_spec('deployments/specs/demo.yaml'); "
            "print(s.name, 'monai' in sys.modules, 'torch' in sys.modules)")
    outs = [subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                           env={**__import__("os").environ, "VOXELFLOW_HOME": str(home)}).stdout.split()
            for _ in range(2)]
    assert outs[0] == ["demo-spheres", "True", "True"]  # the full check imports them
    assert outs[1] == ["demo-spheres", "False", "False"]


@pytest.mark.parametrize("tamper", ["outside", "disallowed", "garbage", "invalid"])
def test_a_tampered_kept_form_is_checked_in_full(home, monkeypatch, tamper):
    from voxelflow.spec.config import load_spec

    path = REPO / "deployments/specs/demo.yaml"
    full = load_spec(path)
    [kept] = _kept(home)
    form = json.loads(kept.read_text())
    if tamper == "outside":  # a package whose code the key does not cover
        form["train"]["network"] = {"os.path:join": {}}
    elif tamper == "disallowed":  # a covered package the allow-list does not name
        monkeypatch.setenv("VOXELFLOW_ALLOWED_IMPORTS", "monai,voxelflow")
        full = load_spec(path)  # another allow-list: another key, checked in full
        [kept] = [k for k in _kept(home) if k != kept]
        form["train"]["network"] = {"torch.nn:Identity": {}}
    elif tamper == "invalid":
        form["train"]["batch_size"] = "many"
    if tamper == "garbage":
        kept.write_text("{not json")
    else:
        kept.write_text(json.dumps(form))
    again = load_spec(path)
    _same(full, again)
    assert "os.path" not in kept.read_text() and "torch.nn:Identity" not in kept.read_text()


def test_a_spec_naming_a_users_component_or_a_bad_spec_is_never_kept(home, monkeypatch):
    from voxelflow.spec.config import SpecError, validate_spec

    monkeypatch.setenv("VOXELFLOW_ALLOWED_IMPORTS", "monai,torch,voxelflow,tests")
    data = yaml.safe_load((REPO / "deployments/specs/demo.yaml").read_text())
    own = json.loads(json.dumps(data))
    own["train"]["network"] = {"tests.unit.test_train_patches:TinyNet": {"channels": 3}}
    own["train"]["augment"] = []
    own["train"]["batch_size"] = 1
    validate_spec(own)
    assert _kept(home) == []
    bad = json.loads(json.dumps(data))
    bad["train"]["network"] = {"UNet": {"channels": "abc"}}
    for _ in range(2):
        with pytest.raises(SpecError, match="channels"):
            validate_spec(json.loads(json.dumps(bad)))
    assert _kept(home) == []


def test_another_allow_list_is_another_key(home, monkeypatch):
    from voxelflow.spec.config import SpecError, validate_spec

    data = yaml.safe_load((REPO / "deployments/specs/demo.yaml").read_text())
    data["train"]["optimizer"] = {"torch.optim:SGD": {"lr": 0.01}}
    validate_spec(json.loads(json.dumps(data)))
    monkeypatch.setenv("VOXELFLOW_ALLOWED_IMPORTS", "monai,voxelflow")
    with pytest.raises(SpecError, match="not among the allowed imports"):
        validate_spec(json.loads(json.dumps(data)))
