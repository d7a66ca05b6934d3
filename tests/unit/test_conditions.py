"""The ``when`` language: what it accepts and what each accepted form means, what it refuses and how it says so,
and how evaluation treats missing outputs, short-circuits and values of the wrong types."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from voxelflow.spec.conditions import MAX_DEPTH, MAX_LENGTH, Condition, ConditionError, MissingOutput, parse

OUTPUTS = {
    "ingest": {"new_cases": 3, "source": "pacs", "empty": ""},
    "evaluate": {"dice": 0.84, "hausdorff95": 4.5, "passed": True},
    "promote": {"promoted": False},
    "deploy": {"temporary": False},
}


@pytest.mark.parametrize(("text", "expected"), [
    ("ingest.new_cases > 0", True),
    ("ingest.new_cases > 3", False),
    ("ingest.new_cases >= 3", True),
    ("ingest.new_cases == 3", True),
    ("ingest.new_cases == 3.0", True),
    ("ingest.new_cases != 3", False),
    ("ingest.new_cases < 1e1", True),
    ("ingest.new_cases <= 2.5E0", False),
    ("evaluate.dice > .8", True),
    ("evaluate.dice > 8e-1", True),
    ("evaluate.hausdorff95 > -1", True),
    ("-evaluate.hausdorff95 < -4", True),
    ("- -evaluate.hausdorff95 == 4.5", True),
    ("0 < evaluate.dice <= 1", True),
    ("0 < evaluate.dice <= 0.5", False),
    ("1 < 2 < 3", True),
    ("3 > 2 < 1", False),
    ("evaluate.dice >= 0.8 and evaluate.hausdorff95 < 5", True),
    ("evaluate.dice >= 0.9 or evaluate.hausdorff95 < 5", True),
    ("evaluate.dice >= 0.9 or evaluate.hausdorff95 > 5", False),
    ("not evaluate.dice >= 0.9", True),
    ("not (evaluate.dice >= 0.8 and ingest.new_cases > 0)", False),
    ("false or true and false", False),  # and binds tighter than or
    ("(false or true) and false", False),
    ("true or true and false", True),
    ("not false and false", False),  # not binds tighter than and
    ("not not true", True),
    ("True", True),
    ("False", False),
    ("promote.promoted", False),
    ("not deploy.temporary", True),
    ("evaluate.passed", True),
    ("evaluate.passed == true", True),
    ("evaluate.passed == 1", True),  # bool counts as 0/1 for == and !=
    ("promote.promoted != 0", False),
    ("ingest.source == 'pacs'", True),
    ('ingest.source == "pacs"', True),
    ("ingest.source != 'PACS'", True),
    ("ingest.source", True),
    ("ingest.empty", False),
    ("ingest.new_cases", True),
    (r"'it\'s' == " + '"it\'s"', True),
    (r'"say \"hi\"" == ' + "'say \"hi\"'", True),
    ("'a' == 'b' or 'x' == 'x'", True),
    ("\n ingest.new_cases\t>\n0 ", True),
    ("(" * MAX_DEPTH + "ingest.new_cases > 0" + ")" * MAX_DEPTH, True),
    ("not " * MAX_DEPTH + "false", False),
])
def test_accepted_forms_and_their_values(text: str, expected: bool) -> None:
    value = parse(text).evaluate(OUTPUTS)
    assert value is expected


def test_names_and_steps() -> None:
    c = parse("ingest.new_cases > 0 and (evaluate.dice > 0.8 or evaluate.hausdorff95 < 3 or ingest.new_cases > 9)")
    assert c.names == {("ingest", "new_cases"), ("evaluate", "dice"), ("evaluate", "hausdorff95")}
    assert c.steps == {"ingest", "evaluate"}
    assert parse("1 < 2").names == frozenset() and parse("1 < 2").steps == frozenset()
    assert c.text == str(c)
    assert c == parse(c.text) and hash(c) == hash(parse(c.text))


def test_condition_and_errors_survive_pickling() -> None:
    c = pickle.loads(pickle.dumps(parse("ingest.new_cases > 0")))
    assert c.evaluate(OUTPUTS) is True and c.evaluate({"ingest": {"new_cases": 0}}) is False
    err = pickle.loads(pickle.dumps(MissingOutput("qc", "outliers", "qc.outliers < 3")))
    assert (err.step, err.output) == ("qc", "outliers") and "qc.outliers" in str(err)


def test_a_condition_built_from_its_text_alone_evaluates() -> None:
    assert Condition("ingest.new_cases > 2", frozenset({("ingest", "new_cases")})).evaluate(OUTPUTS) is True


@pytest.mark.parametrize(("text", "message"), [
    ("ingest.new_cases > ", "when: 'ingest.new_cases > ': expected a value at column 20"),
    ("f(x)", "calls are not allowed ('f') at column 1"),
    ("ingest.new_cases(1)", "calls are not allowed ('ingest.new_cases') at column 1"),
    ("ingest.new_cases > 0 and open ('x')", "calls are not allowed ('open') at column 26"),
    ("(ingest.new_cases)(1)", "calls are not allowed at column 1"),
    ("ingest.new_cases[0] > 1", "subscripts are not allowed at column 17"),
    ("ingest[0]", "name 'ingest' has one part"),
    ("__import__('os')", "dunder names are not allowed ('__import__') at column 1"),
    ("ingest.__class__", "dunder names are not allowed ('ingest.__class__') at column 1"),
    ("ingest.new_cases.__class__ == 1", "dunder names are not allowed"),
    ("a.b.c", "attribute chains beyond <step>.<output> are not allowed ('a.b.c') at column 1"),
    ("ingest.new_cases.real > 0", "attribute chains beyond <step>.<output> are not allowed"),
    ("lambda: 1", "'lambda' is not supported at column 1"),
    ("1 if ingest.new_cases else 2", "'if' is not supported at column 3"),
    ("ingest.new_cases ; import os", "unexpected character ';' at column 18"),
    ("ingest.new_cases > 0 import os", "'import' is not supported at column 22"),
    ("foo", "name 'foo' has one part: a name is <step>.<output> at column 1"),
    ("ingest.new_cases > x", "name 'x' has one part"),
    ("null == ingest.new_cases", "'null' is not supported at column 1"),
    ("ingest.new_cases == None", "'None' is not supported at column 21"),
    ("ingest.new_cases > 0 && true", "use 'and' instead of '&&' at column 22"),
    ("ingest.new_cases > 0 || true", "use 'or' instead of '||' at column 22"),
    ("!promote.promoted", "use 'not' instead of '!' at column 1"),
    ("ingest.new_cases = 1", "assignment '=' is not allowed (compare with '==') at column 18"),
    ("ingest.new_cases + 1 > 2", "arithmetic is not supported at column 18"),
    ("ingest.new_cases > 0 ` ", "unexpected character '`' at column 22"),
    ("ingest.new_cases > 1 é", "unexpected character 'é' at column 22"),
    ("'it's' == ingest.source", "text right after the string 'it': escape a quote inside it as \\' at column 1"),
    ('"say "hi"" == ingest.source', 'text right after the string "say ": escape a quote inside it as \\" at column 1'),
    ("ingest.source == 'a''b'", "text right after the string 'a'"),
    ("ingest.source == 'pacs", "unterminated string (the only escapes are \\' and \\\") at column 18"),
    ("ingest.source == 'a\\n'", "unterminated string"),
    ("ingest.source == 'a' 'b'", "unexpected \"'b'\" at column 22"),
    ("ingest.source == \"x\" or __import__(\"os\")", "dunder names are not allowed"),
    ("ingest.new_cases > 1.2.3", "malformed number '1.2.' at column 20"),
    ("ingest.new_cases > 1e", "malformed number '1e' at column 20"),
    ("ingest.new_cases > 0x10", "malformed number '0x' at column 20"),
    ("ingest.", "output name '' of 'ingest.' must match [A-Za-z][A-Za-z0-9_]* at column 1"),
    ("ingest.1x > 0", "output name '1x' of 'ingest.1x' must match"),
    ("Ingest.new_cases > 0", "step id 'Ingest' must match [a-z][a-z0-9_]* at column 1"),
    ("_ingest.new_cases > 0", "step id '_ingest' must match"),
    ("(ingest.new_cases > 0", "expected ')' at column 22"),
    ("(ingest.new_cases > 0 true", "expected ')' at column 23"),
    ("ingest.new_cases > 0)", "unexpected ')' at column 21"),
    ("()", "expected a value, found ')' at column 2"),
    ("ingest.new_cases > > 0", "expected a value, found '>' at column 20"),
    ("and true", "expected a value, found 'and' at column 1"),
    ("true not", "unexpected 'not' at column 6"),
    ("ingest.new_cases 0", "unexpected '0' at column 18"),
    ("ingest.source < 'q'", "'<' orders numbers only (strings and booleans compare with == and !=) at column 15"),
    ("true >= promote.promoted", "'>=' orders numbers only"),
    ("-'a' == ingest.source", "'-' applies to numbers only at column 1"),
    ("-true", "'-' applies to numbers only at column 1"),
    ("", "when: empty condition"),
    ("  \n\t", "when: empty condition"),
    ("(" * (MAX_DEPTH + 1) + "true" + ")" * (MAX_DEPTH + 1), f"nesting deeper than {MAX_DEPTH} at column 21"),
    ("not " * (MAX_DEPTH + 1) + "true", f"nesting deeper than {MAX_DEPTH} at column 81"),
    ("-" * (MAX_DEPTH + 1) + "1 > 0", f"nesting deeper than {MAX_DEPTH} at column 21"),
])
def test_hostile_and_malformed_forms_are_refused(text: str, message: str) -> None:
    with pytest.raises(ConditionError) as info:
        parse(text)
    assert message in str(info.value)
    assert str(info.value).startswith("when:")


def test_very_long_text_is_refused_before_it_is_read() -> None:
    text = " or ".join(["ingest.new_cases > 0"] * 30)
    assert len(text) > MAX_LENGTH
    with pytest.raises(ConditionError, match=rf"{len(text)} characters, more than {MAX_LENGTH}") as info:
        parse(text)
    assert len(str(info.value)) < 200  # the text is shown shortened
    parse(("ingest.new_cases > 0 or " * 30)[:MAX_LENGTH - 20] + " true")  # at the limit: fine


def test_deep_nesting_far_past_the_limit_is_refused_not_a_recursion_error() -> None:
    with pytest.raises(ConditionError, match="nesting deeper"):
        parse("(" * 240 + "true" + ")" * 240)


@pytest.mark.parametrize("value", [True, 1, None, ["ingest.new_cases > 0"]])
def test_text_that_is_not_a_string_is_refused(value: object) -> None:
    with pytest.raises(ConditionError, match=rf"when: expected a string \(quote it in YAML\), got {type(value).__name__}"):
        parse(value)  # type: ignore[arg-type]


KNOWN = {"ingest": ["new_cases"], "preprocess": ["cases", "passed"],
         "evaluate": ["dice", "hausdorff95", "passed"]}


def test_known_names_are_accepted() -> None:
    c = parse("ingest.new_cases > 0 and evaluate.dice >= 0.8 and preprocess.passed", KNOWN)
    assert c.steps == {"ingest", "evaluate", "preprocess"}


def test_an_unknown_output_is_refused_listing_the_steps_outputs() -> None:
    with pytest.raises(ConditionError) as info:
        parse("ingest.new_cases > 0 and evaluate.dicee > 0.8", KNOWN)
    assert str(info.value) == ("when: 'ingest.new_cases > 0 and evaluate.dicee > 0.8': unknown output 'dicee' of step "
                               "'evaluate' at column 26; it has: dice, hausdorff95, passed (did you mean 'dice'?)")
    with pytest.raises(ConditionError, match=r"unknown output 'zzz' of step 'ingest' at column 1; it has: new_cases$"):
        parse("ingest.zzz", KNOWN)
    with pytest.raises(ConditionError, match=r"unknown output 'passed' of step 'ingest' at column 1; it has: "
                                             r"no outputs"):
        parse("ingest.passed", {"ingest": []})


def test_a_step_that_does_not_run_before_is_refused_listing_those_that_do() -> None:
    with pytest.raises(ConditionError) as info:
        parse("qc.outliers < 3", {"ingest": ["new_cases"], "preprocess": ["passed"]})
    assert str(info.value) == ("when: 'qc.outliers < 3': step 'qc' does not run before this step at column 1 "
                               "(steps before it: ingest, preprocess)")
    with pytest.raises(ConditionError, match=r"step 'ingest' does not run before this step at column 1 "
                                             r"\(steps before it: none\)"):
        parse("ingest.new_cases > 0", {})
    parse("qc.outliers < 3")  # without known, any well-formed name is accepted


def test_a_missing_output_raises_missing_output_naming_it() -> None:
    c = parse("ingest.new_cases > 0 and qc.outliers < 3")
    for outputs in ({"ingest": {"new_cases": 2}}, {"ingest": {"new_cases": 2}, "qc": {}},
                    {"ingest": {"new_cases": 2}, "qc": {"outliers": None}}):
        with pytest.raises(MissingOutput) as info:
            c.evaluate(outputs)
        assert (info.value.step, info.value.output) == ("qc", "outliers")
        assert "output 'qc.outliers' was not produced" in str(info.value)
        assert isinstance(info.value, LookupError) and not isinstance(info.value, ConditionError)


def test_and_or_short_circuit_past_a_missing_output() -> None:
    c = parse("ingest.new_cases > 0 and qc.outliers > 1")
    assert c.evaluate({"ingest": {"new_cases": 0}}) is False
    with pytest.raises(MissingOutput):
        c.evaluate({"ingest": {"new_cases": 1}})
    d = parse("ingest.new_cases > 0 or qc.outliers > 1")
    assert d.evaluate({"ingest": {"new_cases": 1}}) is True
    with pytest.raises(MissingOutput):
        d.evaluate({"ingest": {"new_cases": 0}})
    assert parse("0 > 1 < qc.outliers").evaluate({}) is False  # a chain stops at its first false link
    assert parse("false and (qc.outliers > 1 or qc.ratio < 2)").evaluate({}) is False


@pytest.mark.parametrize(("text", "outputs", "message"), [
    ("ingest.x < 3", {"ingest": {"x": "a"}}, "cannot compare str 'a' with int 3 using '<' at column 10"),
    ("ingest.x == 3", {"ingest": {"x": "3"}}, "cannot compare str '3' with int 3 using '=='"),
    ("ingest.x != 'a'", {"ingest": {"x": 1.5}}, "cannot compare float 1.5 with str 'a' using '!='"),
    ("ingest.x < ingest.y", {"ingest": {"x": "a", "y": "b"}}, "cannot compare str 'a' with str 'b' using '<'"),
    ("ingest.x > 0", {"ingest": {"x": True}}, "cannot compare bool True with int 0 using '>'"),
    ("ingest.x <= ingest.y", {"ingest": {"x": 1, "y": np.bool_(False)}},
     "cannot compare int 1 with bool False using '<='"),
    ("ingest.x == true", {"ingest": {"x": "yes"}}, "cannot compare str 'yes' with bool True using '=='"),
    ("-ingest.x > 0", {"ingest": {"x": "a"}}, "'-' applies to numbers only, not str 'a' at column 1"),
    ("-ingest.x > 0", {"ingest": {"x": False}}, "'-' applies to numbers only, not bool False"),
    ("ingest.x > 0", {"ingest": {"x": [1, 2]}}, "output 'ingest.x' is list; a condition reads numbers, strings"),
])
def test_values_of_the_wrong_types_are_refused_naming_both(text: str, outputs: dict, message: str) -> None:
    with pytest.raises(ConditionError) as info:
        parse(text).evaluate(outputs)
    assert message in str(info.value)


def test_numpy_values_compare_as_numbers_and_booleans() -> None:
    outputs = {"evaluate": {"dice": np.float32(0.75), "n": np.int64(4), "passed": np.bool_(True)}}
    assert parse("evaluate.dice < 0.8 and evaluate.n == 4 and evaluate.passed").evaluate(outputs) is True
    assert parse("evaluate.n >= 5 or not evaluate.passed").evaluate(outputs) is False


def test_nan_compares_false_and_the_result_is_always_a_bool() -> None:
    nan = {"evaluate": {"dice": float("nan")}}
    assert parse("evaluate.dice > 0").evaluate(nan) is False
    assert parse("evaluate.dice <= 0").evaluate(nan) is False
    assert parse("ingest.new_cases").evaluate(OUTPUTS) is True
    assert parse("ingest.source or false").evaluate(OUTPUTS) is True
    assert parse("2.5").evaluate({}) is True and parse("0").evaluate({}) is False
