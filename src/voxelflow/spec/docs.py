"""The spec's JSON Schema and its reference page, both generated from :class:`voxelflow.spec.config.PipelineSpec`.

``voxelflow schema --output docs/spec.schema.json`` and ``voxelflow schema --markdown`` write them;
the unit tests fail when the committed files differ from what these functions give.
"""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

SCHEMA_ID = "urn:voxelflow:pipeline-spec:1"
DRAFT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_PATH = Path("docs/spec.schema.json")
MARKDOWN_PATH = Path("docs/spec-reference.md")
REGENERATE = "voxelflow schema --output docs/spec.schema.json && voxelflow schema --markdown"
EXAMPLE_SPECS = ("deployments/specs/demo.yaml", "deployments/specs/spleen.yaml")  # where examples are taken from


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a spec file, as editors and ``jsonschema`` read it."""
    from voxelflow.spec.config import PipelineSpec

    body = PipelineSpec.model_json_schema(mode="validation", by_alias=True)
    return {"$schema": DRAFT, "$id": SCHEMA_ID, **body, "title": "voxelflow pipeline spec",
            "description": "One lifecycle of a medical-imaging model (voxelflow validate SPEC checks what the "
            "schema cannot: components, signatures, the step graph)."}


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=False) + "\n"


# --- the reference page ------------------------------------------------------------------------------------------


def _component_anyof() -> list[dict[str, Any]]:
    from voxelflow.spec.components import _COMPONENT

    return _COMPONENT["anyOf"]


def _type(p: dict[str, Any]) -> str:
    if "$ref" in p:
        return "section"
    if "anyOf" in p:
        component = _component_anyof()
        if all(c in p["anyOf"] for c in component):  # a component, or a component or null
            rest = [_type(x) for x in p["anyOf"] if x not in component]
            return " or ".join(["component: Name or {Name: {argument: value}}", *rest])
        return " or ".join(dict.fromkeys(_type(x) for x in p["anyOf"]))
    if "const" in p:
        return {bool: "boolean", int: "integer", float: "number", str: "string"}.get(type(p["const"]), "any")
    t = p.get("type")
    if t == "array":
        return f"list of {_type(p.get('items', {}))}"
    if t == "object":
        extra = p.get("additionalProperties")
        return f"mapping of name to {_type(extra)}" if isinstance(extra, dict) and extra else "mapping"
    return {"string": "string", "integer": "integer", "number": "number", "boolean": "boolean",
            "null": "null"}.get(t, "any")


def _allowed(p: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for sub in p.get("anyOf", []):
        if sub not in _component_anyof() and "$ref" not in sub:
            out += _allowed(sub)
    if "enum" in p:
        out.append("one of " + ", ".join(f"`{json.dumps(v)}`" for v in p["enum"]))
    if "const" in p:
        out.append(f"`{json.dumps(p['const'])}`")
    for key, word in (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"), ("exclusiveMaximum", "<")):
        if key in p:
            out.append(f"{word} {p[key]}")
    if "pattern" in p:
        out.append(f"matches `{p['pattern']}`")
    for key, word in (("minItems", "at least {} item(s)"), ("maxItems", "at most {} item(s)"),
                      ("minLength", "at least {} character(s)")):
        if key in p:
            out.append(word.format(p[key]))
    if p.get("type") == "array" and isinstance(p.get("items"), dict):
        out += [f"each {a}" for a in _allowed(p["items"])]
    return out


def _submodel(annotation: Any) -> tuple[str, type[BaseModel]] | None:
    """The section a field holds: ("", Model), a mapping of them (".<name>", Model) or a list ("[]", Model)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "", annotation
    if origin in (typing.Union, types.UnionType):
        found = [s for s in (_submodel(a) for a in args) if s]
        return found[0] if found else None
    if origin is dict and len(args) == 2 and isinstance(args[1], type) and issubclass(args[1], BaseModel):
        return ".<name>", args[1]
    if origin is list and args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
        return "[]", args[0]
    return None


def _shipped_values() -> list[dict[str, Any]]:
    root = Path(__file__).resolve().parents[3]
    return [yaml.safe_load((root / f).read_text()) for f in EXAMPLE_SPECS if (root / f).exists()]


def _find(data: Any, path: list[str]) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return PydanticUndefined
        data = data[key]
    return data


def _yaml(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip().removesuffix("...")\
        .strip()


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _rows(model: type[BaseModel], prefix: str, path: list[str] | None, shipped: list[dict[str, Any]],
          sections: list[tuple[str, str, list[list[str]]]], doc: str) -> None:
    """Append ``model``'s keys as one section (and its subsections after it) to ``sections``."""
    props = model.model_json_schema(mode="validation", by_alias=True).get("properties", {})
    rows: list[list[str]] = []
    sections.append((prefix.rstrip(".") or "(top level)", doc, rows))
    for name, field in model.model_fields.items():
        key = field.alias or name
        dotted = f"{prefix}{key}"
        prop = props.get(key, {})
        sub = _submodel(field.annotation)
        default = field.get_default(call_default_factory=True)
        if default is PydanticUndefined:
            shown_default = "required"
        elif isinstance(default, BaseModel):
            shown_default = "its keys' defaults"
        else:
            shown_default = f"`{_yaml(json.loads(json.dumps(default, default=str)))}`"
        example: Any = PydanticUndefined
        if field.examples:
            example = field.examples[0]
        elif path is not None:
            example = next((v for v in (_find(s, [*path, key]) for s in shipped) if v is not PydanticUndefined),
                           PydanticUndefined)
        if example is PydanticUndefined and default is not PydanticUndefined and default is not None \
                and not isinstance(default, BaseModel) and default not in ([], {}):
            example = default
        shown_example = "" if example is PydanticUndefined or (sub and sub[0] == "") else \
            f"`{key}: {_yaml(example)}`"
        kind = "section (below)" if sub and sub[0] == "" else \
            ("mapping of name to a section (below)" if sub and sub[0] == ".<name>" else
             "list of sections (below)" if sub else _type(prop))
        if sub and sub[0] == "" and "null" in _type(prop):
            kind += " or null"
        rows.append([f"`{dotted}`", kind, shown_default, "; ".join(_allowed(prop)),
                     field.description or "", shown_example])
        if sub:
            suffix, child = sub
            child_path = [*path, key] if path is not None and suffix == "" else None
            _rows(child, f"{dotted}{suffix}.", child_path, shipped, sections, child.__doc__ or "")


def _outputs_section() -> list[str]:
    try:
        from voxelflow.spec.contracts import STAGES
    except ImportError:  # the step graph's contracts are not part of this voxelflow
        return []
    lines = ["## Outputs of the built-in steps", "",
             "What a step's `when` (and a step function's `ctx.outputs`) may read as `<step>.<output>` of a "
             "built-in step that runs before it. Every own step has the output `passed`, the metrics its function "
             "declares with `@step(outputs=[...])` and those its `higher_is_better` names.", "",
             "| output | spec section | description |", "|---|---|---|"]
    for sid, stage in STAGES.items():
        for name, description in stage.outputs.items():
            lines.append(f"| `{sid}.{name}` | `{stage.section}` | {_cell(description)} |")
    return [*lines, ""]


def markdown() -> str:
    """The reference page: every key of the spec with its type, default, allowed values, description and an
    example; then what a ``when`` may read of the built-in steps."""
    from voxelflow.spec.config import PipelineSpec
    from voxelflow.spec.migrations import CURRENT, MIGRATIONS

    sections: list[tuple[str, str, list[list[str]]]] = []
    _rows(PipelineSpec, "", [], _shipped_values(), sections, "")
    out = ["# The pipeline spec: every key", "",
           "<!-- generated by `voxelflow schema --markdown` from voxelflow.spec.config; do not edit -->", "",
           "A spec is one YAML file (`deployments/specs/demo.yaml`); overlays and `--set key.path=value` are merged "
           "over it, then it is validated (`voxelflow validate SPEC`). Its JSON Schema is "
           "`docs/spec.schema.json`: a first line `# yaml-language-server: $schema=<path to it>` gives an editor "
           "completion and checks. Examples are taken from the shipped specs where they set the key.", "",
           f"The current spec version is {CURRENT}. A spec without `version` (or older) is migrated when it loads; "
           "each change is a warning (`voxelflow validate` prints them). Migrations: "
           + "; ".join(f"`{m.name}` (to version {m.version})" for m in MIGRATIONS) + ".", ""]
    for title, doc, rows in sections:
        out += [f"## `{title}`" if title != "(top level)" else "## Top level", ""]
        if doc:
            out += [" ".join(doc.split()), ""]
        out += ["| key | type | default | allowed | description | example |", "|---|---|---|---|---|---|"]
        out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
        out.append("")
    out += _outputs_section()
    return "\n".join(out).rstrip("\n") + "\n"
