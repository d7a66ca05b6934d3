"""The graph of a spec: the built-in chain with the user's steps placed into it.

``after: X`` inserts a step right after X in X's chain: what followed X now follows it (several
steps after one X run in the order listed, each after the ones before it). ``needs: [ids]`` starts a
branch that waits for those steps and runs beside the rest; steps ``after:`` a branch step go into
that branch. A step's ``when`` may read the outputs of the steps that run before it: its ancestors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from voxelflow.spec.conditions import Condition, ConditionError, parse
from voxelflow.spec.contracts import BUILTIN, STAGES, outputs_of


@dataclass(frozen=True)
class Node:
    id: str
    step: Any = None  # the StepSpec of a user's step; None for a built-in stage
    deps: tuple[str, ...] = ()  # what must have finished first: the one before it in its chain, or its needs
    condition: Condition | None = None
    branch: int = 0  # 0: the lifecycle's chain; n > 0: the branch started by a `needs` step

    @property
    def builtin(self) -> bool:
        return self.step is None

    @property
    def gate(self) -> bool:
        return bool(self.step is not None and self.step.gate)

    @property
    def pool(self) -> str | None:
        return self.step.work_pool if self.step is not None else None


@dataclass
class Graph:
    nodes: list[Node]  # an order to start them in: every node after its deps
    ancestors: dict[str, set[str]] = field(default_factory=dict)
    pools: dict[str, str | None] = field(default_factory=dict)  # built-in stage -> its section's work_pool

    def __getitem__(self, node_id: str) -> Node:
        return next(n for n in self.nodes if n.id == node_id)

    @property
    def order(self) -> list[str]:
        return [n.id for n in self.nodes]

    def after_promote(self, node_id: str) -> bool:
        """Whether the node runs after ``promote``: inside the release transaction."""
        return "promote" in self.ancestors[node_id]

    def tree(self) -> str:
        """The resolved graph, one line a node, branches indented under the step they wait for."""
        lines = []
        for n in self.nodes:
            indent = "    " if n.branch else ""
            kind = "stage" if n.builtin else n.step.uses
            extra = []
            if n.step is not None and n.step.needs:
                extra.append("needs " + ", ".join(n.step.needs))
            if n.condition is not None:
                extra.append(f"when {n.condition.text}")
            if n.gate:
                extra.append("gate")
            if n.step is not None and n.step.retries:
                extra.append(f"retries {n.step.retries}")
            pool = n.pool if n.step is not None else self.pools.get(n.id)
            if pool:
                extra.append(f"pool {pool}")
            if not n.builtin and self.after_promote(n.id):
                extra.append("in the release transaction")
            arrow = "└─ " if n.branch else ""
            lines.append(f"{indent}{arrow}{n.id} ({kind})" + (f"  [{'; '.join(extra)}]" if extra else ""))
        return "\n".join(lines)


def _outputs(node_id: str, steps: dict[str, Any], spec: Any) -> set[str]:
    if node_id in STAGES:
        return outputs_of(node_id, spec)
    return set(steps[node_id].declared_outputs())


def build(spec: Any) -> Graph:
    """The graph of ``spec``; a step that names an unknown step, a cycle, or a condition that reads what does not
    run before it is refused with a ``ValueError`` naming ``steps.<i>.<key>``."""
    steps = {s.id: s for s in spec.steps}
    index = {s.id: i for i, s in enumerate(spec.steps)}
    if len(steps) != len(spec.steps):
        seen: set[str] = set()
        dup = next(s.id for s in spec.steps if s.id in seen or seen.add(s.id))  # type: ignore[func-returns-value]
        raise ValueError(f"steps.{index[dup]}.id: {dup!r} is used by more than one step")
    chains: list[list[str]] = [list(BUILTIN)]
    where: dict[str, int] = {sid: 0 for sid in BUILTIN}
    inserted_after: dict[str, list[str]] = {}  # X -> the steps placed right after it, in order
    waiting = list(spec.steps)
    while waiting:
        progressed = False
        for s in list(waiting):
            anchors = [s.after] if s.after else list(s.needs or [])
            for key, a in ((("after" if s.after else "needs"), a) for a in anchors):
                if a not in where and a not in steps:
                    known = ", ".join([*BUILTIN, *steps])
                    raise ValueError(f"steps.{index[s.id]}.{key}: unknown step {a!r} (steps: {known})")
                if a == s.id:
                    raise ValueError(f"steps.{index[s.id]}.{key}: a step cannot run after itself")
            if not all(a in where for a in anchors):
                continue
            if s.after:
                chain = chains[where[s.after]]
                last = s.after
                stack = list(inserted_after.get(s.after, []))
                while stack:  # after the ones already placed after X, and what was placed after them
                    last = stack[-1]
                    stack = list(inserted_after.get(last, []))
                chain.insert(chain.index(last) + 1, s.id)
                inserted_after.setdefault(s.after, []).append(s.id)
                where[s.id] = where[s.after]
            else:
                chains.append([s.id])
                where[s.id] = len(chains) - 1
            waiting.remove(s)
            progressed = True
        if not progressed:
            ids = ", ".join(s.id for s in waiting)
            raise ValueError(f"steps.{index[waiting[0].id]}: the steps {ids} wait for each other (a cycle)")
    deps: dict[str, tuple[str, ...]] = {}
    for chain in chains:
        for i, nid in enumerate(chain):
            s = steps.get(nid)
            deps[nid] = tuple(s.needs) if (i == 0 and s is not None and s.needs) else ((chain[i - 1],) if i else ())
    ancestors: dict[str, set[str]] = {}

    def up(nid: str) -> set[str]:
        if nid not in ancestors:
            found: set[str] = set()
            for d in deps[nid]:
                found |= {d} | up(d)
            ancestors[nid] = found
        return ancestors[nid]

    for nid in deps:
        up(nid)
    nodes: list[Node] = []
    done: set[str] = set()
    pending = [nid for chain in chains for nid in chain]
    while pending:  # an order to start them in: chain order, a branch once what it needs is placed
        if not any(all(d in done for d in deps[nid]) for nid in pending):
            raise ValueError(f"steps: {', '.join(pending)} wait for each other (a cycle)")
        # a branch as soon as what it waits for is placed: it starts beside the chain, not after it
        for nid in sorted(pending, key=lambda n: where[n] == 0):
            if all(d in done for d in deps[nid]):
                s = steps.get(nid)
                condition = None
                if s is not None and s.when:
                    known = {a: _outputs(a, steps, spec) for a in ancestors[nid]}
                    try:
                        condition = parse(s.when, known)
                    except ConditionError as exc:
                        raise ValueError(f"steps.{index[nid]}.when: {exc}") from None
                nodes.append(Node(nid, s, deps[nid], condition, where[nid]))
                done.add(nid)
                pending.remove(nid)
                break
    _check_gates(spec, steps, index, ancestors)
    pools = {sid: getattr(getattr(spec, STAGES[sid].section), "work_pool", None) for sid in BUILTIN}
    return Graph(nodes, ancestors, pools)


def _check_gates(spec: Any, steps: dict[str, Any], index: dict[str, int], ancestors: dict[str, set[str]]) -> None:
    """``promote.gates.absolute`` on a step's metric needs that step to run before ``promote``."""
    for metric in spec.promote.gates.absolute:
        sid, dot, name = metric.partition(".")
        if not dot:
            continue
        if sid not in steps:
            raise ValueError(f"promote.gates.absolute.{metric}: no step {sid!r} in steps")
        if sid not in ancestors["promote"]:
            raise ValueError(f"promote.gates.absolute.{metric}: step {sid!r} does not run before promote (place it "
                             "with after: on the chain before promote)")
        if name not in (steps[sid].higher_is_better or {}):
            raise ValueError(f"promote.gates.absolute.{metric}: steps.{index[sid]}.higher_is_better does not declare "
                             f"{name!r}, so the gate has no direction")
