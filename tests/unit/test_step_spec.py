"""``steps:`` entries are checked when the spec loads: their keys, their place, and their function (allowed
package, plain function taking the context, ``with`` against its signature)."""

from __future__ import annotations

import copy
import sys
import textwrap

import pytest

from voxelflow.spec.config import SpecError, validate_spec
from voxelflow.spec.step_spec import StepSpec

QC = {"id": "qc", "uses": "voxelflow.steps:label_volume_check", "after": "preprocess",
      "with": {"min_ml": 20, "max_ml": 900}, "when": "ingest.new_cases > 0", "gate": True, "retries": 2,
      "timeout_s": 600, "work_pool": "cpu", "higher_is_better": {"outliers": False}}


@pytest.fixture
def spec_data(demo_data) -> dict:
    data = copy.deepcopy(demo_data)
    data["steps"] = [copy.deepcopy(QC)]
    return data


@pytest.fixture
def step_package(tmp_path, monkeypatch):
    """An importable package of a user's step functions (``vf_steps``), allowed by the setting."""
    root = tmp_path / "pkgs"
    (root / "vf_steps").mkdir(parents=True)
    (root / "vf_steps" / "__init__.py").write_text(textwrap.dedent('''
        from os import system

        from voxelflow.steps import StepContext, step


        @step(outputs=["bias"])
        def bias_field(ctx: StepContext, threshold: float, channels: int = 1):
            return {"bias": 0.0}


        def keyword_context(*, ctx):
            return None


        def nothing():
            return None


        class NotAStep:
            def __init__(self, ctx):
                self.ctx = ctx
    '''))
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("VOXELFLOW_ALLOWED_IMPORTS", "monai,torch,voxelflow,vf_steps")
    yield "vf_steps"
    for name in [m for m in sys.modules if m == "vf_steps" or m.startswith("vf_steps.")]:
        del sys.modules[name]


def refused(data: dict, key: str, message: str) -> str:
    with pytest.raises(SpecError) as err:
        validate_spec(data, "demo")
    text = str(err.value)
    assert f"demo: {key}: " in text, text
    assert message in text, text
    return text


def test_a_step_of_every_key_is_accepted(spec_data):
    spec = validate_spec(spec_data, "demo")
    (qc,) = spec.steps
    assert (qc.id, qc.after, qc.needs, qc.with_, qc.gate, qc.retries, qc.timeout_s, qc.work_pool) == \
        ("qc", "preprocess", None, {"min_ml": 20, "max_ml": 900}, True, 2, 600.0, "cpu")
    from voxelflow.steps import label_volume_check, outputs

    assert qc.function() is label_volume_check
    assert qc.declared_outputs() == {"passed", "outliers", *outputs(label_volume_check)}
    assert qc.model_dump(by_alias=True)["with"] == {"min_ml": 20, "max_ml": 900}
    assert spec.step_directions() == {"qc.outliers": False}
    # the dump validates back to the same spec (what a step placed on a work pool receives)
    assert validate_spec(spec.model_dump(mode="json", by_alias=True), "dump") == spec


def test_defaults_and_needs(spec_data):
    spec_data["steps"] = [{"id": "qc", "uses": "voxelflow.steps:label_volume_check", "after": "preprocess"},
                          {"id": "report", "uses": "voxelflow.steps:label_volume_check", "needs": ["train", "qc"]}]
    qc, report = validate_spec(spec_data, "demo").steps
    assert (qc.with_, qc.when, qc.gate, qc.retries, qc.timeout_s, qc.work_pool, qc.higher_is_better) == \
        ({}, None, False, 0, None, None, {})
    assert report.needs == ["train", "qc"] and report.predecessors() == ["train", "qc"]


@pytest.mark.parametrize("key, value, message", [
    ("id", "QC", "String should match pattern"),
    ("id", "train", "'train' is a built-in step"),
    ("id", "ingest", "'ingest' is a built-in step"),
    ("uses", "voxelflow.steps.label_volume_check", "String should match pattern"),
    ("after", "Pre-process", "String should match pattern"),
    ("when", "", "at least 1 character"),
    ("gate", "perhaps", "valid boolean"),
    ("retries", -1, "greater than or equal to 0"),
    ("timeout_s", 0, "greater than 0"),
    ("work_pool", "my pool", "String should match pattern"),
    ("colour", "red", "unknown key"),
])
def test_a_bad_key_is_refused_naming_it(spec_data, key, value, message):
    spec_data["steps"][0][key] = value
    refused(spec_data, f"steps.0.{key}", message)


def test_needs_names_step_ids(spec_data):
    del spec_data["steps"][0]["after"]
    spec_data["steps"][0]["needs"] = ["preprocess", "Bad"]
    refused(spec_data, "steps.0.needs.1", "'Bad' is not a step id")
    spec_data["steps"][0]["needs"] = ["preprocess", "preprocess"]
    refused(spec_data, "steps.0.needs", "names a step twice")
    spec_data["steps"][0]["needs"] = []
    refused(spec_data, "steps.0.needs", "at least 1 item")


def test_higher_is_better_names_metrics(spec_data):
    spec_data["steps"][0]["higher_is_better"] = {"out liers": False}
    refused(spec_data, "steps.0.higher_is_better.out liers", "is not a metric name")


def test_ids_are_unique(spec_data):
    spec_data["steps"].append({**QC, "after": "train"})
    refused(spec_data, "steps.1.id", "'qc' is the id of steps.0 too")


def test_after_or_needs_exactly_one(spec_data):
    spec_data["steps"][0]["needs"] = ["train"]
    refused(spec_data, "steps.0.needs", "gives both after and needs")
    del spec_data["steps"][0]["needs"]
    del spec_data["steps"][0]["after"]
    refused(spec_data, "steps.0.after", "is not placed: give after: ID")


def test_unknown_with_argument(spec_data):
    spec_data["steps"][0]["with"]["min_mll"] = 3
    refused(spec_data, "steps.0.with", "has no argument min_mll")


def test_with_argument_of_the_wrong_type(spec_data):
    spec_data["steps"][0]["with"]["min_ml"] = "twenty"
    refused(spec_data, "steps.0.with", "argument 'min_ml' = 'twenty' does not fit")


def test_the_context_is_not_an_argument(spec_data):
    spec_data["steps"][0]["with"]["ctx"] = {}
    refused(spec_data, "steps.0.with", "'ctx' is the step's context")


def test_a_required_argument_missing_from_with(spec_data, step_package):
    spec_data["steps"][0] = {"id": "bias", "uses": f"{step_package}:bias_field", "after": "ingest"}
    refused(spec_data, "steps.0.with", "needs the argument(s) threshold in with")
    spec_data["steps"][0]["with"] = {"threshold": 0.5}
    (bias,) = validate_spec(spec_data, "demo").steps
    assert bias.declared_outputs() == {"passed", "bias"}


@pytest.mark.parametrize("name, message", [
    ("NotAStep", "is a class; uses names a function"),
    ("keyword_context", "must take the step's context as its first positional parameter"),
    ("nothing", "must take the step's context as its first positional parameter"),
    ("missing", "has no function or class 'missing'"),
])
def test_uses_must_be_a_step_function(spec_data, step_package, name, message):
    spec_data["steps"][0] = {"id": "mine", "uses": f"{step_package}:{name}", "after": "ingest"}
    refused(spec_data, "steps.0.uses", message)


def test_a_class_in_uses_is_refused_from_voxelflow_too(spec_data):
    spec_data["steps"][0]["uses"] = "voxelflow.steps:StepResult"
    refused(spec_data, "steps.0.uses", "is a class")


@pytest.mark.parametrize("path", ["subprocess:Popen", "os:system", "builtins:eval"])
def test_dangerous_callables_are_refused(spec_data, monkeypatch, path):
    monkeypatch.delenv("VOXELFLOW_ALLOWED_IMPORTS", raising=False)
    spec_data["steps"][0]["uses"] = path
    spec_data["steps"][0]["with"] = {"args": ["touch", "/nonexistent/ran"]}
    text = refused(spec_data, "steps.0.uses", "not among the allowed imports")
    assert path in text and "VOXELFLOW_ALLOWED_IMPORTS=monai,torch,voxelflow" in text


def test_a_re_export_is_judged_by_where_it_is_defined(spec_data, step_package):
    spec_data["steps"][0] = {"id": "mine", "uses": f"{step_package}:system", "after": "ingest"}
    refused(spec_data, "steps.0.uses", "is defined in 'posix', which is not among the allowed imports")


def test_a_package_not_allowed_is_never_imported(spec_data, tmp_path, monkeypatch):
    monkeypatch.delenv("VOXELFLOW_ALLOWED_IMPORTS", raising=False)
    marker = tmp_path / "imported"
    (tmp_path / "vf_step_side_effect.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                                     "def check(ctx):\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec_data["steps"][0] = {"id": "mine", "uses": "vf_step_side_effect:check", "after": "ingest"}
    refused(spec_data, "steps.0.uses", "'vf_step_side_effect' is not among the allowed imports")
    assert not marker.exists() and "vf_step_side_effect" not in sys.modules
    # allowed, the same function loads
    monkeypatch.setenv("VOXELFLOW_ALLOWED_IMPORTS", "monai,torch,voxelflow,vf_step_side_effect")
    try:
        assert validate_spec(spec_data, "demo").steps[0].function().__name__ == "check"
        assert marker.exists()
    finally:
        sys.modules.pop("vf_step_side_effect", None)


def test_a_gate_on_a_step_metric_needs_its_direction(spec_data):
    spec_data["promote"]["gates"]["absolute"] = {"qc.outliers": 0}
    spec = validate_spec(spec_data, "demo")
    assert spec.promote.gates.absolute == {"qc.outliers": 0} and spec.step_directions()["qc.outliers"] is False
    spec_data["promote"]["gates"]["absolute"] = {"qc.volume": 900}
    refused(spec_data, "(top level)", "steps.0.higher_is_better does not declare 'volume'")
    spec_data["promote"]["gates"]["absolute"] = {"other.outliers": 0}
    refused(spec_data, "(top level)", "there is no step 'other' in steps")
    # evaluation's own metrics are checked as before
    spec_data["promote"]["gates"]["absolute"] = {"iou": 0.5}
    refused(spec_data, "(top level)", "add iou to evaluate.metrics")


def test_the_graph_is_checked_at_load(spec_data):
    spec_data["steps"][0]["after"] = "nosuch"
    refused(spec_data, "steps.0.after", "unknown step 'nosuch'")


def test_a_step_entry_validates_on_its_own():
    step = StepSpec.model_validate({"id": "qc", "uses": "voxelflow.steps:label_volume_check", "after": "train",
                                    "with": {"max_ml": 10.0}})
    assert step.with_ == {"max_ml": 10.0} and step.function().__name__ == "label_volume_check"
