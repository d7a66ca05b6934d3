"""The library's layout: packages by concern whose imports only go down, no import cycle, no module over
about 500 lines, and never Prefect."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "voxelflow"
# lowest first: a package may import its own modules and those of the packages before it
LAYERS = ["core", "spec", "data", "learn", "release", "serving", "steps", "stages", "pipeline"]
MAX_LINES = 550
COMPAT = {"model"}  # voxelflow.model: the import path models registered before this layout name; re-exports only


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("")
        if "migrations" in rel.parts and "versions" in rel.parts:
            continue
        name = ".".join(("voxelflow", *rel.parts)).removesuffix(".__init__")
        out[name] = path
    return out


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_every_module_is_in_a_layer():
    stray = [m for m in modules() if m != "voxelflow" and layer(m) not in LAYERS and layer(m) not in COMPAT]
    assert not stray, f"modules outside the layers {LAYERS}: {stray}"


def test_imports_only_go_down():
    mods = modules()
    up = []
    for name, path in mods.items():
        mine = layer(name)
        if mine is None or mine in COMPAT:
            continue
        for target in imports(path):
            if not target.startswith("voxelflow.") or target not in mods:
                continue
            theirs = layer(target)
            if theirs in LAYERS and LAYERS.index(theirs) > LAYERS.index(mine):
                up.append(f"{name} imports {target}")
    assert not up, "imports that go up a layer:\n" + "\n".join(sorted(up))


def test_no_import_cycle():
    mods = modules()
    graph = {m: {t for t in imports(p) if t in mods and t != m} for m, p in mods.items()}
    seen: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(graph[node]):
            if seen.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]) if nxt in stack else nxt)
            elif nxt not in seen:
                visit(nxt, stack + [nxt])
        seen[node] = 2

    for m in sorted(mods):
        if m not in seen:
            visit(m, [m])
    # a package's __init__ importing its own modules is not a cycle of its modules
    real = [c for c in cycles if not all(p.count(".") <= 1 for p in c.split(" -> "))]
    assert not real, "import cycles:\n" + "\n".join(real)


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_module_is_too_long(name):
    lines = len(modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines (at most {MAX_LINES}): split it by concern"


def test_the_library_never_imports_prefect():
    offenders = [n for n, p in modules().items() if any(i.split(".")[0] == "prefect" for i in imports(p))]
    assert not offenders, offenders


def test_the_registry_is_given_an_audit_sink_and_never_imports_the_audit_log():
    """voxelflow.release.registry records its moves through the AuditSink its caller gives it."""
    found = imports(modules()["voxelflow.release.registry"])
    assert not {t for t in found if t.startswith("voxelflow.core.audit") or t == "voxelflow.core.db.audit_log"}
