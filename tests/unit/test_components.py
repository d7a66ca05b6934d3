"""A spec's import paths resolve only to the kind they are used as, from the packages
``VOXELFLOW_ALLOWED_IMPORTS`` allows (read when the spec is validated)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from voxelflow.spec.config import SpecError, validate_spec

DANGEROUS = ["subprocess:Popen", "os:system", "builtins:eval"]


def _place(data: dict, kind: str, path: str, args: dict | None = None) -> str:
    """Put ``path`` into the demo spec as a component of ``kind``; return the key the error must name."""
    args = dict(args or {})
    if kind in ("network", "loss", "optimizer", "scheduler"):
        data["train"][kind] = {path: args}
        return f"train.{kind}"
    if kind == "transform":
        data["preprocess"]["transforms"].insert(0, {path: {"keys": ["image"], **args}})
        return "preprocess.transforms"
    if kind == "augment":
        data["train"]["augment"] = [{path: {"keys": ["image"], **args}}]
        return "train.augment"
    if kind == "metric":
        data["evaluate"]["metrics"] = ["dice", "mine"]
        data["evaluate"]["custom_metrics"] = {"mine": {"function": path, "higher_is_better": True, "args": args}}
        return "evaluate.custom_metrics.mine"
    raise AssertionError(kind)


KINDS = ["network", "loss", "optimizer", "scheduler", "transform", "augment", "metric"]


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """An importable package of a user's components (``vf_mine``), allowed by the setting."""
    root = tmp_path / "pkgs"
    (root / "vf_mine").mkdir(parents=True)
    (root / "vf_mine" / "__init__.py").write_text(textwrap.dedent('''
        import torch
        from os import system
        from subprocess import Popen
        from monai.transforms import MapTransform


        class Net(torch.nn.Module):
            def __init__(self, channels: int = 2):
                super().__init__()
                self.conv = torch.nn.Conv3d(1, channels, 1)

            def forward(self, x):
                return self.conv(x)


        class NotANet:
            def __init__(self, channels: int = 2):
                self.channels = channels


        class OneArgLoss(torch.nn.Module):
            def forward(self, x):
                return x.mean()


        class PairLoss:
            def __call__(self, input, target):
                return (input - target).abs().mean()


        class Clip(MapTransform):
            def __call__(self, data):
                return data


        def total(y_pred, y):
            return y_pred.sum()


        def one(y_pred):
            return y_pred


        class NotAMetric:
            pass
    '''))
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("VOXELFLOW_ALLOWED_IMPORTS", "monai,torch,voxelflow,vf_mine")
    yield "vf_mine"
    for name in [m for m in sys.modules if m == "vf_mine" or m.startswith("vf_mine.")]:
        del sys.modules[name]


@pytest.mark.parametrize("path", DANGEROUS)
@pytest.mark.parametrize("kind", KINDS)
def test_dangerous_callables_are_refused_as_any_component_naming_the_key(demo_data, monkeypatch, kind, path):
    monkeypatch.delenv("VOXELFLOW_ALLOWED_IMPORTS", raising=False)
    key = _place(demo_data, kind, path)
    with pytest.raises(SpecError) as err:
        validate_spec(demo_data, "demo")
    message = str(err.value)
    assert f"demo: {key}: " in message and path in message
    assert "not among the allowed imports" in message and "VOXELFLOW_ALLOWED_IMPORTS=monai,torch,voxelflow" in message


@pytest.mark.parametrize("kind", KINDS)
def test_re_exports_are_judged_by_where_the_object_is_defined(demo_data, user_package, kind):
    # vf_mine is allowed, but Popen and system only pass through it
    for path in (f"{user_package}:Popen", f"{user_package}:system"):
        data = {**demo_data, "train": dict(demo_data["train"]), "evaluate": dict(demo_data["evaluate"]),
                "preprocess": {**demo_data["preprocess"], "transforms": list(demo_data["preprocess"]["transforms"])}}
        key = _place(data, kind, path)
        with pytest.raises(SpecError, match=rf"demo: {key}: .*{path}.* is defined in '(subprocess|posix|os)', "
                                            "which is not among the allowed imports"):
            validate_spec(data, "demo")


def test_a_re_export_inside_monai_is_refused(demo_data, monkeypatch):
    monkeypatch.delenv("VOXELFLOW_ALLOWED_IMPORTS", raising=False)
    # monai.apps.utils imports urlretrieve, which takes two positional arguments like a metric
    _place(demo_data, "metric", "monai.apps.utils:urlretrieve")
    with pytest.raises(SpecError, match=r"evaluate.custom_metrics.mine: .*defined in 'urllib.request'"):
        validate_spec(demo_data, "demo")


def test_a_package_not_allowed_is_never_imported(demo_data, tmp_path, monkeypatch):
    monkeypatch.delenv("VOXELFLOW_ALLOWED_IMPORTS", raising=False)
    marker = tmp_path / "imported"
    (tmp_path / "vf_side_effect.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Net: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _place(demo_data, "network", "vf_side_effect:Net")
    with pytest.raises(SpecError, match="train.network: .*'vf_side_effect' is not among the allowed imports"):
        validate_spec(demo_data, "demo")
    assert not marker.exists() and "vf_side_effect" not in sys.modules


def test_the_setting_is_read_when_the_spec_is_validated(demo_data, user_package, monkeypatch):
    _place(demo_data, "network", f"{user_package}:Net", {"channels": 2})
    assert validate_spec(demo_data, "demo").train.network == {f"{user_package}:Net": {"channels": 2}}
    monkeypatch.setenv("VOXELFLOW_ALLOWED_IMPORTS", "monai,torch,voxelflow")
    with pytest.raises(SpecError, match="'vf_mine' is not among the allowed imports"):
        validate_spec(demo_data, "demo")
    # a subpackage may be allowed on its own; bare MONAI names keep working without monai in the list
    monkeypatch.setenv("VOXELFLOW_ALLOWED_IMPORTS", "torch, vf_mine")
    assert validate_spec(demo_data, "demo").train.loss


@pytest.mark.parametrize("kind, name, message", [
    ("network", "vf_mine:NotANet", "is not a network: not a torch.nn.Module subclass"),
    ("network", "torch.optim:Adam", "is not a network"),
    ("loss", "vf_mine:OneArgLoss", r"is not a loss: .*loss\(input, target\)"),
    ("loss", "monai.networks.nets:UNet", "is not a loss"),
    ("optimizer", "torch.nn:Linear", "is not a torch.optim.Optimizer subclass"),
    ("scheduler", "torch.optim:Adam", "is not a torch.optim.lr_scheduler.LRScheduler subclass"),
    ("transform", "vf_mine:Net", r"is not a MONAI transform"),
    ("augment", "torch.nn:Linear", r"is not a MONAI transform"),
    ("metric", "vf_mine:NotAMetric", r"is not a metric: its instances must be called as metric\(y_pred, y\)"),
    ("metric", "vf_mine:one", r"must take \(y_pred, y\) as its first two arguments"),
    ("network", "vf_mine:total", "is not a class"),
])
def test_components_must_be_the_kind_they_are_used_as(demo_data, user_package, kind, name, message):
    key = _place(demo_data, kind, name)
    with pytest.raises(SpecError, match=rf"demo: {key}: .*{message}"):
        validate_spec(demo_data, "demo")


def test_components_of_the_right_kind_from_allowed_packages_load(demo_data, user_package):
    for kind, name in [("network", "vf_mine:Net"), ("loss", "vf_mine:PairLoss"), ("loss", "torch.nn:MSELoss"),
                       ("optimizer", "torch.optim:SGD"), ("scheduler", "torch.optim.lr_scheduler:StepLR"),
                       ("transform", "vf_mine:Clip"), ("metric", "vf_mine:total"),
                       ("metric", "monai.metrics:DiceMetric")]:
        data = {**demo_data, "train": dict(demo_data["train"]), "evaluate": dict(demo_data["evaluate"]),
                "preprocess": {**demo_data["preprocess"], "transforms": list(demo_data["preprocess"]["transforms"])}}
        args = {"lr": 0.1} if kind == "optimizer" else {"step_size": 2} if kind == "scheduler" else {}
        _place(data, kind, name, args)
        validate_spec(data, "demo")


def test_voxelflow_validate_refuses_popen_as_a_network(demo_spec_path, tmp_path):
    import yaml

    data = yaml.safe_load(demo_spec_path.read_text())
    data["train"]["network"] = {"subprocess:Popen": {"args": ["touch", str(tmp_path / "ran")]}}
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(data))
    env = {k: v for k, v in __import__("os").environ.items() if k != "VOXELFLOW_ALLOWED_IMPORTS"}
    done = subprocess.run([sys.executable, "-m", "flows.cli", "validate", str(spec)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "train.network" in done.stdout + done.stderr and "ok" not in done.stdout
    assert not (tmp_path / "ran").exists()
