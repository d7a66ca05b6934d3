"""The ``when`` language: a condition over the outputs of the steps that run before a step.

Comparisons (``== != < <= > >=``, chains like ``0 < a.b <= 1``), ``and``/``or``/``not``, parentheses,
numbers, quoted strings, ``true``/``false`` and ``<step>.<output>`` names. Parsed by its own tokenizer and
recursive-descent parser (never ``eval``): anything else is refused with the column where it was found.
"""

from __future__ import annotations

import difflib
import keyword
import numbers
import operator
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

MAX_LENGTH = 500
MAX_DEPTH = 20
_STEP = re.compile(r"[a-z][a-z0-9_]*")
_OUTPUT = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_TOKEN = re.compile(r"""(?P<ws>\s+)
    |(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    |(?P<name>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]*)*)
    |(?P<str>'(?:[^'\\]|\\['"])*'|"(?:[^"\\]|\\['"])*")
    |(?P<op>==|!=|<=|>=|<|>|\(|\)|-)""", re.X)
_REFUSED = {"=": "assignment '=' is not allowed (compare with '==')", "&": "use 'and' instead of '&&'",
            "|": "use 'or' instead of '||'", "!": "use 'not' instead of '!'", "[": "subscripts are not allowed",
            "]": "subscripts are not allowed", "'": "unterminated string (the only escapes are \\' and \\\")",
            '"': "unterminated string (the only escapes are \\' and \\\")"}
_LITERALS = {"true": True, "True": True, "false": False, "False": False}
_ORDERING = ("<", "<=", ">", ">=")
_COMPARE = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt,
            ">=": operator.ge}


class ConditionError(ValueError):
    """A condition that cannot be parsed, refers to unknown things, or compares values of the wrong types."""


class MissingOutput(LookupError):
    """A condition read an output that was not produced (a skipped step, a stage that had nothing to do)."""

    def __init__(self, step: str, output: str, text: str = "") -> None:
        where = f"when: {_show(text)}: " if text else ""
        super().__init__(f"{where}output '{step}.{output}' was not produced (step '{step}' was skipped or gave "
                         f"no '{output}')")
        self.step, self.output, self.text = step, output, text

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.step, self.output, self.text)


class _Token(NamedTuple):
    kind: str  # num, str, bool, name, kw, op
    value: Any
    col: int
    raw: str


def _show(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:57] + "...")


def _fail(text: str, what: str, col: int, more: str = "") -> ConditionError:
    return ConditionError(f"when: {_show(text)}: {what} at column {col}{more}")


def _name(text: str, raw: str, col: int, called: bool) -> _Token:
    parts = raw.split(".")
    if any(p.startswith("__") for p in parts):
        raise _fail(text, f"dunder names are not allowed ({raw!r})", col)
    if called and raw not in ("and", "or", "not"):
        raise _fail(text, f"calls are not allowed ({raw!r})", col)
    if len(parts) == 1:
        if raw in ("and", "or", "not"):
            return _Token("kw", raw, col, raw)
        if raw in _LITERALS:
            return _Token("bool", _LITERALS[raw], col, raw)
        if keyword.iskeyword(raw) or raw.lower() in ("null", "none"):
            raise _fail(text, f"{raw!r} is not supported", col)
        raise _fail(text, f"name {raw!r} has one part: a name is <step>.<output>", col)
    if len(parts) > 2:
        raise _fail(text, f"attribute chains beyond <step>.<output> are not allowed ({raw!r})", col)
    step, out = parts
    if not _STEP.fullmatch(step):
        raise _fail(text, f"step id {step!r} must match [a-z][a-z0-9_]*", col)
    if not _OUTPUT.fullmatch(out):
        raise _fail(text, f"output name {out!r} of {raw!r} must match [A-Za-z][A-Za-z0-9_]*", col)
    return _Token("name", (step, out), col, raw)


def _tokens(text: str) -> list[_Token]:
    toks: list[_Token] = []
    pos = 0
    while pos < len(text):
        m, col = _TOKEN.match(text, pos), pos + 1
        if m is None:
            ch = text[pos]
            what = _REFUSED.get(ch, "arithmetic is not supported" if ch in "+*/%" else f"unexpected character {ch!r}")
            raise _fail(text, what, col)
        kind, raw, pos = m.lastgroup or "", m.group(), m.end()
        if kind == "num":
            if pos < len(text) and (text[pos].isalnum() or text[pos] in "_."):
                raise _fail(text, f"malformed number {raw + text[pos]!r}", col)
            toks.append(_Token("num", float(raw) if any(c in raw for c in ".eE") else int(raw), col, raw))
        elif kind == "name":
            toks.append(_name(text, raw, col, text[pos:].lstrip().startswith("(")))
        elif kind == "str":
            if pos < len(text) and (text[pos].isalnum() or text[pos] in "_'\""):
                raise _fail(text, f"text right after the string {raw}: escape a quote inside it as \\{raw[0]}", col)
            toks.append(_Token("str", re.sub(r"\\(['\"])", r"\1", raw[1:-1]), col, raw))
        elif kind == "op":  # not whitespace
            toks.append(_Token("op", raw, col, raw))
    return toks


class _Parser:
    """or < and < not < comparison < unary minus < atom; a node is a tuple headed by its kind."""

    def __init__(self, text: str) -> None:
        self.text, self.toks, self.i, self.depth = text, _tokens(text), 0, 0
        self.cols: dict[tuple[str, str], int] = {}  # each name read -> where it first appears

    def peek(self, kind: str, *values: str) -> _Token | None:
        tok = self.toks[self.i] if self.i < len(self.toks) else None
        return tok if tok is not None and tok.kind == kind and tok.value in values else None

    def nested(self, col: int, sub: Any) -> tuple[Any, ...]:
        self.depth, self.i = self.depth + 1, self.i + 1
        if self.depth > MAX_DEPTH:
            raise _fail(self.text, f"nesting deeper than {MAX_DEPTH}", col)
        node = sub()
        self.depth -= 1
        return node

    def parse(self) -> tuple[Any, ...]:
        node = self.chain("or")
        if self.i < len(self.toks):
            raise _fail(self.text, f"unexpected {self.toks[self.i].raw!r}", self.toks[self.i].col)
        return node

    def chain(self, kw: str) -> tuple[Any, ...]:
        sub = (lambda: self.chain("and")) if kw == "or" else self.not_
        nodes = [sub()]
        while self.peek("kw", kw):
            self.i += 1
            nodes.append(sub())
        return nodes[0] if len(nodes) == 1 else (kw, tuple(nodes))

    def not_(self) -> tuple[Any, ...]:
        tok = self.peek("kw", "not")
        return ("not", self.nested(tok.col, self.not_)) if tok else self.comparison()

    def comparison(self) -> tuple[Any, ...]:
        first = left = self.unary()
        rest = []
        while op := self.peek("op", *_COMPARE):
            self.i += 1
            right = self.unary()
            if op.value in _ORDERING and any(n[0] == "lit" and isinstance(n[1], (str, bool)) for n in (left, right)):
                raise _fail(self.text, f"{op.value!r} orders numbers only (strings and booleans compare with == "
                                       "and !=)", op.col)
            rest.append((op.value, right, op.col))
            left = right
        return ("cmp", first, tuple(rest)) if rest else first

    def unary(self) -> tuple[Any, ...]:
        if not (tok := self.peek("op", "-")):
            return self.atom()
        node = self.nested(tok.col, self.unary)
        if node[0] == "lit" and isinstance(node[1], (str, bool)):
            raise _fail(self.text, "'-' applies to numbers only", tok.col)
        return ("lit", -node[1]) if node[0] == "lit" else ("neg", node, tok.col)

    def atom(self) -> tuple[Any, ...]:
        if self.i >= len(self.toks):
            raise _fail(self.text, "expected a value", len(self.text) + 1)
        tok = self.toks[self.i]
        if tok.raw == "(":
            node = self.nested(tok.col, lambda: self.chain("or"))
            if not self.peek("op", ")"):
                col = self.toks[self.i].col if self.i < len(self.toks) else len(self.text) + 1
                raise _fail(self.text, "expected ')'", col)
        elif tok.kind == "name":
            node = ("name", *tok.value)
            self.cols.setdefault(tok.value, tok.col)
        elif tok.kind in ("num", "str", "bool"):
            node = ("lit", tok.value)
        else:
            raise _fail(self.text, f"expected a value, found {tok.raw!r}", tok.col)
        self.i += 1
        if self.peek("op", "("):
            raise _fail(self.text, "calls are not allowed", tok.col)
        return node


def parse(text: str, known: Mapping[str, Collection[str]] | None = None) -> Condition:
    """Parse ``text``; with ``known`` (each step that runs before -> its outputs), refuse names outside it."""
    if not isinstance(text, str):
        raise ConditionError(f"when: expected a string (quote it in YAML), got {type(text).__name__}")
    if not text.strip():
        raise ConditionError("when: empty condition")
    if len(text) > MAX_LENGTH:
        raise ConditionError(f"when: {_show(text)}: {len(text)} characters, more than {MAX_LENGTH}")
    parser = _Parser(text)
    tree = parser.parse()
    for (step, out), col in parser.cols.items() if known is not None else ():
        assert known is not None
        if step not in known:
            before = ", ".join(sorted(known)) or "none"
            raise _fail(text, f"step {step!r} does not run before this step", col, f" (steps before it: {before})")
        if out not in known[step]:
            has = sorted(known[step])
            close = difflib.get_close_matches(out, has, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise _fail(text, f"unknown output {out!r} of step {step!r}", col,
                        f"; it has: {', '.join(has) or 'no outputs'}{hint}")
    return Condition(text, frozenset(parser.cols), tree)


def _type(v: Any) -> str:
    return type(v).__name__


def _evaluate(node: tuple[Any, ...], outputs: Mapping[str, Mapping[str, Any]], text: str) -> Any:
    kind = node[0]
    if kind == "lit":
        return node[1]
    if kind == "name":
        _, step, out = node
        value = outputs.get(step, {}).get(out)
        if value is None:
            raise MissingOutput(step, out, text)
        if isinstance(value, bool) or getattr(getattr(value, "dtype", None), "kind", "") == "b":
            return bool(value)
        if isinstance(value, numbers.Integral):
            return int(value)
        if isinstance(value, numbers.Real):
            return float(value)
        if isinstance(value, str):
            return value
        raise ConditionError(f"when: {_show(text)}: output '{step}.{out}' is {_type(value)}; a condition reads "
                             "numbers, strings and booleans")
    if kind == "neg":
        value = _evaluate(node[1], outputs, text)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(text, f"'-' applies to numbers only, not {_type(value)} {value!r}", node[2])
        return -value
    if kind == "not":
        return not _evaluate(node[1], outputs, text)
    if kind in ("and", "or"):
        want = kind == "or"  # the value that settles it
        return want if any(bool(_evaluate(n, outputs, text)) is want for n in node[1]) else not want
    left = _evaluate(node[1], outputs, text)
    for op, right_node, col in node[2]:
        right = _evaluate(right_node, outputs, text)
        numeric = [isinstance(v, (int, float)) and (op not in _ORDERING or not isinstance(v, bool))
                   for v in (left, right)]
        if not (all(numeric) or (op in ("==", "!=") and isinstance(left, str) and isinstance(right, str))):
            raise _fail(text, f"cannot compare {_type(left)} {left!r} with {_type(right)} {right!r} using {op!r}",
                        col)
        if not _COMPARE[op](left, right):
            return False
        left = right
    return True


@dataclass(frozen=True)
class Condition:
    """A parsed ``when``: its text and every ``(step, output)`` it reads."""

    text: str
    names: frozenset[tuple[str, str]]
    _tree: tuple[Any, ...] | None = field(default=None, repr=False, compare=False)

    @property
    def steps(self) -> frozenset[str]:
        """The step ids it reads."""
        return frozenset(step for step, _ in self.names)

    def evaluate(self, outputs: Mapping[str, Mapping[str, Any]]) -> bool:
        """True or False over ``outputs`` (step id -> output -> value); :class:`MissingOutput` when a name it
        reaches was not produced, :class:`ConditionError` when values of the wrong types meet."""
        tree = self._tree if self._tree is not None else parse(self.text)._tree
        assert tree is not None
        return bool(_evaluate(tree, outputs, self.text))

    def __str__(self) -> str:
        return self.text
