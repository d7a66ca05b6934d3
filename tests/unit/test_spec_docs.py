"""The spec's JSON Schema and reference page are generated and current; every shipped spec and overlay
validates against the schema; every key is described."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

from flows.cli import app
from voxelflow.spec import docs as spec_docs
from voxelflow.spec.config import PipelineSpec, deep_merge

REPO = Path(__file__).resolve().parents[2]
SPECS = sorted((REPO / "deployments" / "specs").glob("*.yaml"))
MODELINE = "# yaml-language-server: $schema="


def _overlays() -> list[Path]:
    """YAML under deployments/ that is merged over a spec: neither a spec nor a Prefect deployment file."""
    out = []
    for path in sorted((REPO / "deployments").rglob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if path.parent.name != "specs" and isinstance(data, dict) and "deployments" not in data:
            out.append(path)
    return out


def _validator():
    """A draft 2020-12 validator of the committed schema: ``jsonschema`` if installed, else ``jsonschema_rs``."""
    schema = json.loads((REPO / spec_docs.SCHEMA_PATH).read_text())
    try:
        import jsonschema
    except ImportError:
        jsonschema_rs = pytest.importorskip("jsonschema_rs", reason="neither jsonschema nor jsonschema_rs installed")
        validator = jsonschema_rs.Draft202012Validator(schema)
        return lambda instance: [f"{'.'.join(map(str, e.instance_path))}: {e.message}"
                                 for e in validator.iter_errors(instance)]
    validator = jsonschema.Draft202012Validator(schema)
    return lambda instance: [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                             for e in validator.iter_errors(instance)]


@pytest.mark.parametrize("committed, fresh", [(spec_docs.SCHEMA_PATH, spec_docs.schema_text),
                                              (spec_docs.MARKDOWN_PATH, spec_docs.markdown)])
def test_the_committed_files_are_current(committed, fresh):
    path = REPO / committed
    assert path.exists() and path.read_text() == fresh(), \
        f"{committed} is stale: regenerate it with `{spec_docs.REGENERATE}`"


def test_the_schema_is_draft_2020_12_with_an_id_and_steps_under_their_alias():
    schema = spec_docs.json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] and schema["title"] == "voxelflow pipeline spec"
    assert list(schema["properties"])[0] == "version"
    step = schema["$defs"]["StepSpec"]
    assert "with" in step["properties"] and "with_" not in step["properties"]
    assert step["additionalProperties"] is False and set(step["required"]) == {"id", "uses"}


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.name)
def test_a_shipped_spec_names_the_schema_and_validates_against_it(spec):
    first = spec.read_text().splitlines()[0]
    assert first.startswith(MODELINE), f"{spec.name} must begin with {MODELINE}<relative path>"
    target = (spec.parent / first.removeprefix(MODELINE).strip()).resolve()
    assert target == (REPO / spec_docs.SCHEMA_PATH).resolve()
    data = yaml.safe_load(spec.read_text())
    assert _validator()(data) == []
    for overlay in _overlays():
        assert _validator()(deep_merge(data, yaml.safe_load(overlay.read_text()))) == [], overlay.name


def test_the_overlays_are_found():
    assert {p.name for p in _overlays()} >= {"quick.yaml", "gpu-pool.yaml"}


def test_the_schema_refuses_what_the_spec_refuses(demo_data):
    check = _validator()
    bad = [({"data": {**demo_data["data"], "layout": "zip"}}, "data.layout"),
           ({"steps": [{"id": "qc", "uses": "voxelflow.steps:label_volume_check", "colour": "red"}]}, "steps.0"),
           ({"steps": [{"id": "QC", "uses": "voxelflow.steps:label_volume_check"}]}, "steps.0.id"),
           ({"version": 2}, "version"), ({"train": {**demo_data["train"], "epochs": 0}}, "train.epochs")]
    for change, where in bad:
        errors = check({**demo_data, **change})
        assert any(e.startswith(f"{where}:") for e in errors), (change, errors)
    step = {"id": "qc", "uses": "voxelflow.steps:label_volume_check", "after": "preprocess", "with": {"min_ml": 2}}
    assert check({**demo_data, "steps": [step]}) == []


def _models(model: type[BaseModel], seen: set[type]) -> set[type]:
    seen.add(model)
    for field in model.model_fields.values():
        for t in _types(field.annotation):
            if isinstance(t, type) and issubclass(t, BaseModel) and t not in seen:
                _models(t, seen)
    return seen


def _types(annotation):
    yield annotation
    for arg in typing.get_args(annotation):
        yield from _types(arg)


def test_every_key_is_described():
    missing = [f"{m.__name__}.{name}" for m in _models(PipelineSpec, set())
               for name, field in m.model_fields.items() if not field.description]
    assert missing == []


def test_the_reference_lists_every_key_and_the_built_in_outputs():
    page = spec_docs.markdown()
    for key in ("version", "data.source", "train.epochs", "evaluate.sliding_window.roi_size",
                "evaluate.custom_metrics.<name>.function", "promote.gates.absolute",
                "deploy.kubernetes.autoscale.target", "steps[].id", "steps[].with", "steps[].when",
                "steps[].higher_is_better"):
        assert f"| `{key}` |" in page, key
    assert "| `steps[].with` | mapping | `{}` |" in page and "`with: {min_ml: 20, max_ml: 900}`" in page
    contracts = pytest.importorskip("voxelflow.spec.contracts")
    for sid, stage in contracts.STAGES.items():
        for name in stage.outputs:
            assert f"| `{sid}.{name}` | `{stage.section}` |" in page


def test_voxelflow_schema_prints_and_writes(tmp_path):
    runner = CliRunner()
    done = runner.invoke(app, ["schema"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout) == spec_docs.json_schema()
    done = runner.invoke(app, ["schema", "--markdown", str(tmp_path / "ref.md")])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "ref.md").read_text() == spec_docs.markdown()
    done = runner.invoke(app, ["schema", "--output", str(tmp_path / "s.json")])
    assert done.exit_code == 0 and (tmp_path / "s.json").read_text() == spec_docs.schema_text()
    assert runner.invoke(app, ["schema", str(tmp_path / "x.json")]).exit_code == 2


def test_voxelflow_validate_prints_migrations_and_the_graph(demo_data, tmp_path):
    data = {**demo_data, "data": {**demo_data["data"], "deidentify": "dicom-basic-profile"},
            "steps": [{"id": "qc", "uses": "voxelflow.steps:label_volume_check", "after": "preprocess",
                       "when": "ingest.new_cases > 0", "gate": True, "work_pool": "cpu"}]}
    spec = tmp_path / "old.yaml"
    spec.write_text(yaml.safe_dump(data))
    done = CliRunner().invoke(app, ["validate", str(spec)])
    assert done.exit_code == 0, done.output
    assert "warning: " in done.stderr and "data.deidentify: dicom-basic-profile is now called basic-profile" \
        in done.stderr
    graph = pytest.importorskip("voxelflow.spec.graph")
    from voxelflow.spec.config import load_spec
    from voxelflow.spec.migrations import SpecMigrated

    with pytest.warns(SpecMigrated):
        loaded = load_spec(spec)
    assert graph.build(loaded).tree() in done.stdout
    assert "qc (voxelflow.steps:label_volume_check)" in done.stdout and "version: 1" in done.stdout
