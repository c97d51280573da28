"""Requirements and rank expressions: operators, precedence, values, errors, and properties.

The property tests build random expression trees, render them with random spacing and redundant
parentheses, and check the parsed expression against a direct Python evaluation of the tree.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import pickle
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tm2fs.errors import InvalidArgument
from tm2fs.expressions import (
    MAX_DEPTH,
    ExpressionError,
    Rank,
    Requirements,
    parse_rank,
    parse_requirements,
)

G = 2**30
SSD = {"ID": 3, "NAME": "iscsi-fast-01", "STATE": "READY", "FREE": 30 * G, "USED": 10 * G,
       "CAPACITY": 40 * G, "COST": 10, "TAGS": ["SSD", "ISCSI"], "ROLE": "SAN", "NBVM": 2}
HDD = {"ID": 4, "NAME": "nfs-slow", "STATE": "READY", "FREE": 500 * G, "USED": 100 * G,
       "CAPACITY": 600 * G, "COST": 1.5, "TAGS": ["HDD7K"], "ROLE": "NAS", "NBVM": 0}
KNOWN = sorted(SSD)


def ok(text: str, attrs: dict[str, Any] = SSD) -> bool:
    return parse_requirements(text).matches(attrs)


# ---------------------------------------------------------------------------------------------
# Requirements: operators and values


@pytest.mark.parametrize(("text", "expected"), [
    ("COST = 10", True), ("COST = 11", False),
    ("COST != 10", False), ("COST != 11", True),
    ("COST > 9", True), ("COST > 10", False),
    ("COST < 11", True), ("COST < 10", False),
    ("COST >= 10", True), ("COST >= 10.5", False),
    ("COST <= 10", True), ("COST <= 9.99", False),
    ("COST > -1", True), ("COST = 10.0", True),
    ("NAME = iscsi-fast-01", True), ("NAME = ISCSI-FAST-01", False),  # values are case-sensitive
    ("NAME != nfs-slow", True), ('NAME = "iscsi-fast-01"', True), ("NAME = 'iscsi-fast-01'", True),
    ("TAGS @> SSD", True), ("TAGS @> ssd", False), ("TAGS @> HDD7K", False),
    ("NAME @> fast", True), ("NAME @> slow", False),
])
def test_each_operator(text: str, expected: bool) -> None:
    assert ok(text) is expected


@pytest.mark.parametrize(("text", "expected"), [
    ('NAME = "iscsi-fast*"', True), ("NAME = iscsi-fast*", True), ("NAME = iscsi-fast-0?", True),
    ("NAME = iscsi-fast-0[1-3]", True), ("NAME = iscsi-fast-0[4-9]", False),
    ("NAME = *slow", False), ('NAME != "nfs*"', True), ("NAME = ISCSI*", False),
    ("TAGS @> S*", True), ("TAGS @> HDD*", False), ("TAGS @> ?SCSI", True),
    ("NAME @> f*t", True), ("NAME @> s?ow", False),
    ("TAGS = SSD,ISCSI", True), ("TAGS = *ISCSI", True), ("TAGS = SSD", False),  # list = joined text
])
def test_wildcards_and_contains(text: str, expected: bool) -> None:
    assert ok(text) is expected


def test_quoted_strings_keep_spaces_and_escapes() -> None:
    attrs = {"NAME": 'fast "disk" \\ one'}
    assert parse_requirements(r'NAME = "fast \"disk\" \\ one"').matches(attrs)
    assert parse_requirements("NAME = 'fast \"disk\" \\\\ one'").matches(attrs)
    assert parse_requirements('NAME = "fast*one"').matches(attrs)
    assert parse_requirements('NAME @> "disk\\" "').matches(attrs)


@pytest.mark.parametrize(("text", "expected"), [
    ("FREE > 20G", True), ("FREE > 30G", False), ("FREE >= 30G", True), ("FREE = 30G", True),
    ("FREE = 30GiB", True), ("FREE = 30GB", True), ("FREE = 30g", True), ("FREE = 30720M", True),
    ("FREE = 31457280K", True), ("FREE = 31457280KiB", True), ("FREE < 0.03T", True),
    ("FREE > 0.029T", True), ("FREE < 1P", True), ("FREE = 32212254720", True), ("FREE = 32212254720B", True),
])
def test_sizes_are_bytes(text: str, expected: bool) -> None:
    assert ok(text) is expected


def test_size_with_fraction_rounds_down_to_bytes() -> None:
    assert ok("FREE = 1.5K", {"FREE": 1536})
    assert ok("FREE = 0.5", {"FREE": 0.5})


def test_attribute_on_either_side() -> None:
    assert ok("FREE > USED") and not ok("USED > FREE")
    assert ok("20G < FREE") and not ok("40G < FREE")
    assert ok('"iscsi*" = NAME') and not ok('"nfs*" = NAME')
    assert ok("FREE <= CAPACITY") and ok("CAPACITY != FREE")
    assert parse_requirements("FREE > USED").attributes == {"FREE", "USED"}


def test_right_hand_name_after_equality_is_a_word() -> None:
    """As in OpenNebula, `STATE = ERROR` compares with the word, never with the ERROR attribute."""
    req = parse_requirements("STATE != ERROR", known=["STATE", "ERROR"])
    assert req.attributes == {"STATE"}
    assert req.matches({"STATE": "READY", "ERROR": "READY"})
    assert not req.matches({"STATE": "ERROR", "ERROR": None})
    assert parse_requirements("TAGS @> SSD", known=["TAGS"]).attributes == {"TAGS"}


def test_numbers_against_strings() -> None:
    assert ok('COST = "10"') and ok('COST = "1*"') and not ok('COST = "x*"')
    assert ok('COST != "ten"')
    assert not ok('COST > "ten"') and not ok('COST < "ten"') and not ok('COST >= "ten"')
    assert ok('FREE > "20G"')  # a quoted number is still a number
    assert ok("ID = 3", {"ID": "3"}) and ok("ID > 2", {"ID": "3"}) and ok("ID = 3.0", {"ID": "3"})
    assert ok("NAME = 10", {"NAME": "10"}) and not ok("NAME = 10", {"NAME": "x10"})
    assert ok("NAME @> 10", {"NAME": "x10"})
    assert ok('NAME > "m"', {"NAME": "nfs"}) and not ok('NAME < "m"', {"NAME": "nfs"})
    assert not ok("TAGS > 1") and not ok('TAGS < "z"')


def test_lists_hold_numbers_too() -> None:
    assert ok("IDS @> 3", {"IDS": [1, 2, 3]}) and not ok("IDS @> 4", {"IDS": [1, 2, 3]})
    assert ok("IDS @> 3K", {"IDS": ["3072"]}) and ok('IDS @> "2"', {"IDS": [1, 2]})
    assert not ok("COST @> 1") and not ok("NAME @> TAGS")


@pytest.mark.parametrize("attrs", [{}, {"FREE": None, "TAGS": None, "NAME": None}])
def test_missing_or_none_attribute(attrs: dict[str, Any]) -> None:
    for text in ("FREE > 1", "FREE < 1", "FREE = 1", "FREE >= 0", "FREE <= 0", "TAGS @> SSD",
                 "NAME = *", "FREE > USED", "0 < FREE", "NAME = x"):
        assert not ok(text, attrs), text
    for text in ("FREE != 1", "NAME != x", "NAME != *"):
        assert ok(text, attrs), text
    assert ok("!(FREE > 1)", attrs)


def test_names_are_case_insensitive() -> None:
    req = parse_requirements("free > 20g & Tags @> SSD & state = READY")
    assert req.attributes == {"FREE", "TAGS", "STATE"}
    assert req.matches(SSD) and not req.matches(HDD)
    assert parse_requirements("free > 1", known=["Free"]).attributes == {"FREE"}


def test_boolean_operators_and_precedence() -> None:
    t, f = "COST = 10", "COST = 0"
    assert ok(f"{t} & {t}") and not ok(f"{t} & {f}") and not ok(f"{f} & {t}")
    assert ok(f"{t} | {f}") and ok(f"{f} | {t}") and not ok(f"{f} | {f}")
    assert not ok(f"!{t}") and ok(f"!{f}") and ok(f"!!{t}") and ok(f"! ! ({t})")
    # & binds tighter than |
    assert ok(f"{t} | {f} & {f}") and not ok(f"({t} | {f}) & {f}")
    assert ok(f"{f} & {f} | {t}") and not ok(f"{f} & ({f} | {t})")
    # ! binds tighter than & and |
    assert not ok(f"!{t} & {t}") and not ok(f"!({t} & {f}) & {f}") and ok(f"!({t} & {f})")
    assert ok(f"!{f} | {f}") and not ok(f"!({f} | {t})")
    assert ok(f"((({t})))") and ok(f"{t}&{t}|{f}")


def test_compact_spacing() -> None:
    assert ok("FREE>20G&TAGS@>SSD&STATE=READY") and ok("!(COST!=10)|NAME=x")
    assert ok("\tFREE\n>\r\n20G ")


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_requirements_match_everything(text: str) -> None:
    req = parse_requirements(text, known=[])
    assert req.matches({}) and req.matches(SSD) and req.attributes == frozenset()
    assert req.explain({}) == "no requirements"


def test_long_chains_do_not_recurse() -> None:
    text = " & ".join(f"COST > {i}" for i in range(-2000, 10))
    assert ok(text) and not ok(text + " & COST > 10")
    assert ok(" | ".join(["COST = 0"] * 3000 + ["COST = 10"]))


def test_explain_names_the_deciding_comparison() -> None:
    req = parse_requirements("FREE > 20G & TAGS @> SSD & STATE = READY")
    assert req.explain(HDD) == "TAGS @> SSD is false (TAGS = [HDD7K])"
    assert req.explain({**SSD, "FREE": None}) == "FREE > 20G is false (FREE is not set)"
    assert req.explain(SSD).startswith("FREE > 20G is true (FREE = 32212254720); TAGS @> SSD is true")
    either = parse_requirements("COST < 5 | (NAME = x*)")
    assert either.explain(SSD) == "COST < 5 is false (COST = 10); NAME = x* is false (NAME = iscsi-fast-01)"
    assert parse_requirements("!(TAGS @> SSD)").explain(SSD) == "TAGS @> SSD is true (TAGS = [SSD, ISCSI])"
    assert parse_requirements("FREE < USED").explain(SSD) == \
        f"FREE < USED is false (FREE = {30 * G}, USED = {10 * G})"
    assert parse_requirements("FREE > FREE").explain(SSD) == f"FREE > FREE is false (FREE = {30 * G})"


def test_objects_are_immutable_values() -> None:
    req = parse_requirements("COST > 1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        req.text = "x"  # type: ignore[misc]
    assert req == parse_requirements("COST > 1") and hash(req) == hash(parse_requirements("COST > 1"))
    assert str(req) == "COST > 1" and isinstance(req, Requirements)
    rank = parse_rank("COST")
    with pytest.raises(dataclasses.FrozenInstanceError):
        rank.attributes = frozenset()  # type: ignore[misc]
    assert isinstance(rank, Rank) and str(rank) == "COST"


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(("text", "column", "message"), [
    ("FREE >=", 8, "expected a value after '>=' at column 8"),
    ("FREE >= ", 9, "expected a value after '>=' at column 9"),
    ("FREE >= & COST = 1", 9, "expected a value after '>=' at column 9"),
    ("FREE == 1", 7, "expected a value after '=' at column 7"),
    ("FREE > 10)", 10, "unexpected ')' at column 10"),
    ("(FREE > 10", 1, "unclosed '(' opened at column 1"),
    ("  (FREE > 10 & (COST < 3)", 3, "unclosed '(' opened at column 3"),
    ('NAME = "fast', 8, "unterminated string at column 8"),
    ("NAME = 'fast\\'", 8, "unterminated string at column 8"),
    ("FREE > 10 COST < 3", 11, "expected '&', '|' or end of expression at column 11"),
    ("(FREE > 10 COST < 3)", 12, "expected '&', '|' or ')' at column 12"),
    ("FREE 10", 6, "expected a comparison operator (=, !=, >, <, >=, <=, @>) after 'FREE' at column 6"),
    ("FREE", 5, "expected a comparison operator (=, !=, >, <, >=, <=, @>) after 'FREE' at column 5"),
    ("FREE > 10 &", 12, "expected a comparison after '&' at column 12"),
    ("FREE > 10 | | COST = 1", 13, "expected a comparison after '|' at column 13"),
    ("& FREE > 1", 1, "expected a comparison at column 1"),
    ("()", 2, "expected a comparison after '(' at column 2"),
    ("!", 2, "expected a comparison after '!' at column 2"),
    ("FREE @ 1", 6, "unexpected character '@' at column 6"),
    ("10 > 5", 1, "comparison at column 1 has no attribute on either side"),
    ("x = 'a' & free-space > 1", 11, "'free-space' at column 11 is not an attribute name"),
    ("FREE > 1 = 2", 10, "expected '&', '|' or end of expression at column 10"),
])
def test_requirements_errors(text: str, column: int, message: str) -> None:
    with pytest.raises(ExpressionError) as info:
        parse_requirements(text)
    err = info.value
    assert (err.column, err.reason, err.text) == (column, message, text)
    assert str(err).splitlines()[0] == message


@pytest.mark.parametrize(("text", "column", "message"), [
    ("FREE +", 7, "expected a number, an attribute or '(' after '+' at column 7"),
    ("* FREE", 1, "expected a number, an attribute or '(' at column 1"),
    ("FREE * ()", 9, "expected a number, an attribute or '(' after '(' at column 9"),
    ("(FREE", 1, "unclosed '(' opened at column 1"),
    ("FREE)", 5, "unexpected ')' at column 5"),
    ("FREE COST", 6, "expected an operator (+, -, *, /) or end of expression at column 6"),
    ("(FREE * 2 COST)", 11, "expected an operator (+, -, *, /) or ')' at column 11"),
    ("2FREE", 1, "invalid number '2FREE' at column 1"),
    ("FREE - 1.2.3", 8, "invalid number '1.2.3' at column 8"),
    ("FREE > 1", 6, "unexpected character '>' at column 6"),
    ('FREE * "2"', 8, "unexpected character '\"' at column 8"),
])
def test_rank_errors(text: str, column: int, message: str) -> None:
    with pytest.raises(ExpressionError) as info:
        parse_rank(text)
    assert (info.value.column, info.value.reason) == (column, message)


def test_error_shows_a_caret_under_the_column() -> None:
    with pytest.raises(ExpressionError) as info:
        parse_requirements("FREE >= ")
    assert str(info.value) == "expected a value after '>=' at column 9\n  FREE >= \n          ^"
    with pytest.raises(ExpressionError) as info:
        parse_requirements("COST > 1 &\n\tFREE >")
    lines = str(info.value).splitlines()
    assert lines[1:] == ["  COST > 1 &  FREE >", "                    ^"]
    long = " & ".join(["COST > 1"] * 30) + " )"
    with pytest.raises(ExpressionError) as info:
        parse_requirements(long)
    _, line, caret = str(info.value).splitlines()
    assert line[len(caret) - 1] == ")" and line.startswith("  ...")


def test_error_is_an_invalid_argument_that_travels() -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_requirements("FREE >")
    err = info.value
    assert isinstance(err, ExpressionError) and err.errno == 22 and err.status == 400
    assert err.to_dict()["error"] == "invalid_argument"
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.reason, copy.text, copy.column, str(copy)) == (err.reason, err.text, err.column, str(err))


def test_unknown_attributes() -> None:
    with pytest.raises(ExpressionError) as info:
        parse_requirements("FRE > 20G", known=KNOWN)
    err = info.value
    assert err.reason == f"unknown attribute 'FRE' at column 1; known: {', '.join(KNOWN)}"
    assert err.column == 1 and err.hint == "did you mean FREE?"
    with pytest.raises(ExpressionError) as info:
        parse_requirements("FREE > 1 & 5 < costs", known=[k.lower() for k in KNOWN])
    assert info.value.column == 16 and info.value.reason.startswith("unknown attribute 'costs' at column 16")
    with pytest.raises(ExpressionError) as info:
        parse_requirements("FREE > USD", known=KNOWN)
    assert info.value.column == 8
    with pytest.raises(ExpressionError) as info:
        parse_rank("FREE - 2 * cots", known=KNOWN)
    assert info.value.column == 12 and info.value.hint == "did you mean COST?"
    with pytest.raises(ExpressionError) as info:
        parse_rank("X", known=[])
    assert info.value.reason == "unknown attribute 'X' at column 1; known: none"
    words = parse_requirements("tags @> WHATEVER & name = Anything", known=KNOWN)
    assert words.attributes == {"TAGS", "NAME"}
    assert parse_rank("free + Cost", known=KNOWN).attributes == {"FREE", "COST"}


def test_nesting_is_limited() -> None:
    ok_depth = "(" * MAX_DEPTH + "COST = 10" + ")" * MAX_DEPTH
    assert parse_requirements(ok_depth).matches(SSD)
    with pytest.raises(ExpressionError, match="nested more than"):
        parse_requirements("!" * (MAX_DEPTH + 1) + "COST = 10")
    with pytest.raises(ExpressionError) as info:
        parse_rank("-" * 500 + "1")
    assert info.value.column == MAX_DEPTH + 1


# ---------------------------------------------------------------------------------------------
# Rank


@pytest.mark.parametrize(("text", "expected"), [
    ("1 + 2 * 3", 7.0), ("(1 + 2) * 3", 9.0), ("10 - 4 - 3", 3.0), ("10 - (4 - 3)", 9.0),
    ("12 / 3 / 2", 2.0), ("12 / (3 / 3)", 12.0), ("-2 * 3", -6.0), ("- (2 + 3)", -5.0), ("--2", 2.0),
    ("+2 - -3", 5.0), ("2 * -3", -6.0), ("1.5 * 2", 3.0), ("1K", 1024.0), ("2G / 1M", 2048.0),
    ("1 / 0", 0.0), ("1 / (2 - 2)", 0.0), ("COST / 0", 0.0), ("7", 7.0),
    ("FREE / CAPACITY * 100", 75.0), ("free - 20G", 10.0 * G), ("-COST + NBVM * 2", -6.0),
    ("COST / NBVM", 5.0), ("ID / (NBVM - 2)", 0.0), ("CAPACITY / 1G / COST", 4.0),
])
def test_rank_arithmetic(text: str, expected: float) -> None:
    value = parse_rank(text).value(SSD)
    assert value == expected and isinstance(value, float)


def test_rank_attributes_and_missing_values() -> None:
    rank = parse_rank("FREE - 10 * COST")
    assert rank.attributes == {"FREE", "COST"}
    assert rank.value({"FREE": 100, "COST": 2}) == 80.0
    assert rank.value({"FREE": 100}) == 100.0 and rank.value({"FREE": None, "COST": None}) == 0.0
    assert rank.value({"FREE": "1K", "COST": "2.5"}) == 999.0  # numeric strings count
    assert parse_rank("").value({}) == 0.0 and parse_rank("  ").attributes == frozenset()


def test_rank_with_a_non_number_raises_at_evaluation() -> None:
    rank = parse_rank("FREE + 2 * TAGS")
    with pytest.raises(ExpressionError) as info:
        rank.value(SSD)
    assert info.value.column == 12
    assert info.value.reason == "attribute TAGS is not a number (TAGS = [SSD, ISCSI]) at column 12"
    with pytest.raises(ExpressionError):
        parse_rank("NAME").value(SSD)


# ---------------------------------------------------------------------------------------------
# Properties: requirements

SPACE = st.sampled_from(["", " ", "  ", "\t"])
WORDS = ["ssd", "hdd", "fast disk", "READY", "ERROR", "nfs-01", "iscsi-fast-01"]
PATTERNS = [*WORDS, "ssd*", "*disk", "?dd", "nfs-0[0-5]", "*", "iscsi*01", "*fast*"]
NUMBERS = {"0": 0, "1": 1, "7": 7, "-3": -3, "2.5": 2.5, "100": 100, "1K": 1024, "2k": 2048, "1KiB": 1024,
           "3KB": 3072}

ATTRS = st.fixed_dictionaries({}, optional={
    "FREE": st.one_of(st.none(), st.integers(-5, 3000)),
    "COST": st.one_of(st.none(), st.integers(-5, 120), st.sampled_from([2.5, 0.5, 1024.0])),
    "NAME": st.one_of(st.none(), st.sampled_from(WORDS)),
    "STATE": st.sampled_from(["READY", "ERROR", "INIT"]),
    "TAGS": st.one_of(st.none(), st.lists(st.sampled_from(["SSD", "HDD", "ISCSI", "NFS"]), max_size=3)),
})

# A tree node is (text, evaluate, precedence): 4 atom/comparison, 3 '!', 2 '&', 1 '|'.
Node = tuple[str, Callable[[dict[str, Any]], bool], int]


def _quoted(word: str) -> str:
    return '"' + word + '"' if " " in word else word


@st.composite
def numeric_leaf(draw: st.DrawFn) -> Node:
    attr = draw(st.sampled_from(["FREE", "COST"]))
    op = draw(st.sampled_from(["=", "!=", ">", "<", ">=", "<="]))
    literal = draw(st.sampled_from(sorted(NUMBERS)))
    n = NUMBERS[literal]
    compare = {"=": lambda v: v == n, "!=": lambda v: v != n, ">": lambda v: v > n, "<": lambda v: v < n,
               ">=": lambda v: v >= n, "<=": lambda v: v <= n}[op]
    s1, s2 = draw(SPACE), draw(SPACE)
    if draw(st.booleans()):  # the value on the left: `5 < FREE` means FREE > 5
        flipped = {">": "<", "<": ">", ">=": "<=", "<=": ">="}.get(op, op)
        text = f"{literal}{s1}{flipped}{s2}{attr.lower() if draw(st.booleans()) else attr}"
    else:
        text = f"{attr}{s1}{op}{s2}{literal}"

    def evaluate(attrs: dict[str, Any]) -> bool:
        v = attrs.get(attr)
        return op == "!=" if v is None else compare(v)

    return text, evaluate, 4


@st.composite
def text_leaf(draw: st.DrawFn) -> Node:
    attr = draw(st.sampled_from(["NAME", "STATE"]))
    op = draw(st.sampled_from(["=", "!=", "@>"]))
    pattern = draw(st.sampled_from(PATTERNS))
    quote = draw(st.booleans())
    literal = f'"{pattern}"' if quote else _quoted(pattern)
    text = f"{attr}{draw(SPACE)}{op}{draw(SPACE)}{literal}"

    def evaluate(attrs: dict[str, Any]) -> bool:
        v = attrs.get(attr)
        if v is None:
            return op == "!="
        if op == "@>":
            return fnmatch.fnmatchcase(v, f"*{pattern}*")
        return fnmatch.fnmatchcase(v, pattern) == (op == "=")

    return text, evaluate, 4


@st.composite
def tags_leaf(draw: st.DrawFn) -> Node:
    pattern = draw(st.sampled_from(["SSD", "HDD", "ISCSI", "ssd", "*SD", "?DD", "N*", "X"]))
    text = f"TAGS{draw(SPACE)}@>{draw(SPACE)}{pattern}"

    def evaluate(attrs: dict[str, Any]) -> bool:
        tags = attrs.get("TAGS")
        return tags is not None and any(fnmatch.fnmatchcase(t, pattern) for t in tags)

    return text, evaluate, 4


@st.composite
def two_attr_leaf(draw: st.DrawFn) -> Node:
    op = draw(st.sampled_from([">", "<", ">=", "<="]))
    compare = {">": lambda a, b: a > b, "<": lambda a, b: a < b, ">=": lambda a, b: a >= b,
               "<=": lambda a, b: a <= b}[op]
    text = f"FREE{draw(SPACE)}{op}{draw(SPACE)}COST"

    def evaluate(attrs: dict[str, Any]) -> bool:
        a, b = attrs.get("FREE"), attrs.get("COST")
        return a is not None and b is not None and compare(a, b)

    return text, evaluate, 4


LEAVES = st.one_of(numeric_leaf(), text_leaf(), tags_leaf(), two_attr_leaf())


def _wrap(node: Node, below: int, space: str) -> str:
    return f"({space}{node[0]}{space})" if node[2] < below else node[0]


def _combine(children: st.SearchStrategy[Node]) -> st.SearchStrategy[Node]:
    def negate(child: Node, space: str) -> Node:
        inner = child[1]
        return f"!{space}{_wrap(child, 3, space)}", lambda attrs: not inner(attrs), 3

    def both(a: Node, b: Node, space: str) -> Node:
        fa, fb = a[1], b[1]
        return f"{_wrap(a, 2, space)}{space}&{space}{_wrap(b, 2, space)}", lambda x: fa(x) and fb(x), 2

    def either(a: Node, b: Node, space: str) -> Node:
        fa, fb = a[1], b[1]
        return f"{a[0]}{space}|{space}{b[0]}", lambda x: fa(x) or fb(x), 1

    def parens(child: Node, space: str) -> Node:
        return f"({space}{child[0]}{space})", child[1], 4

    return st.one_of(
        st.builds(negate, children, SPACE),
        st.builds(both, children, children, SPACE),
        st.builds(either, children, children, SPACE),
        st.builds(parens, children, SPACE),
    )


TREES = st.recursive(LEAVES, _combine, max_leaves=10)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(TREES, ATTRS)
def test_requirements_agree_with_python(tree: Node, attrs: dict[str, Any]) -> None:
    text, evaluate, _ = tree
    req = parse_requirements(text, known=["FREE", "COST", "NAME", "STATE", "TAGS"])
    assert req.matches(attrs) is evaluate(attrs), text
    assert req.explain(attrs)


@FAST
@given(TREES, ATTRS)
def test_not_negates(tree: Node, attrs: dict[str, Any]) -> None:
    text = tree[0]
    assert parse_requirements(f"!({text})").matches(attrs) is not parse_requirements(text).matches(attrs)


@FAST
@given(TREES, TREES, ATTRS)
def test_de_morgan(x: Node, y: Node, attrs: dict[str, Any]) -> None:
    a, b = x[0], y[0]
    for left, right in ((f"!(({a}) & ({b}))", f"!({a}) | !({b})"), (f"!(({a}) | ({b}))", f"!({a}) & !({b})")):
        assert parse_requirements(left).matches(attrs) is parse_requirements(right).matches(attrs)


ANY_VALUE = st.one_of(st.none(), st.integers(-3, 3), st.floats(allow_nan=False, width=16),
                      st.sampled_from(["", "2", "1K", "abc", "a b"]),
                      st.lists(st.sampled_from(["2", "abc", "SSD"]), max_size=3))
ANY_LITERAL = st.sampled_from(["2", "-1", "1K", "0.5", "abc", '"a b"', '""', "a*", '"2"', "SSD", "S?D", "X"])


@FAST
@given(ANY_VALUE, ANY_LITERAL, st.booleans())
def test_not_equal_is_the_negation_of_equal(value: Any, literal: str, flip: bool) -> None:
    attrs = {"A": value}
    for op in ("=", "@>", ">", "<"):
        text = f"{literal} {op} A" if flip else f"A {op} {literal}"
        assert parse_requirements(f"!({text})").matches(attrs) is not parse_requirements(text).matches(attrs)
    eq = f"{literal} = A" if flip else f"A = {literal}"
    ne = f"{literal} != A" if flip else f"A != {literal}"
    assert parse_requirements(ne).matches(attrs) is not parse_requirements(eq).matches(attrs)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="AB12G. =!<>@&|()\"'*-", max_size=25), ANY_VALUE)
def test_any_text_parses_or_fails_cleanly(text: str, value: Any) -> None:
    try:
        req = parse_requirements(text)
    except ExpressionError as err:
        assert 1 <= err.column <= len(text) + 1 and err.text == text
        return
    req.matches({"A": value, "B": value})  # whatever it says, it must not raise
    req.explain({"A": value})


# ---------------------------------------------------------------------------------------------
# Properties: rank

RANK_NUMBERS = {"0": 0.0, "1": 1.0, "3": 3.0, "17": 17.0, "0.5": 0.5, "2.25": 2.25, "1K": 1024.0}
RANK_ATTRS = st.fixed_dictionaries({"A": st.integers(-4, 4), "B": st.sampled_from([0, 0.5, -2.0, 3])},
                                   optional={"C": st.one_of(st.none(), st.integers(0, 9))})
Num = tuple[str, Callable[[dict[str, Any]], float], int]  # text, evaluate, precedence


def _div(x: float, y: float) -> float:
    return x / y if y else 0.0


def _rank_leaf(draw: st.DrawFn) -> Num:
    if draw(st.booleans()):
        text = draw(st.sampled_from(sorted(RANK_NUMBERS)))
        value = RANK_NUMBERS[text]
        return text, lambda attrs: value, 4
    name = draw(st.sampled_from(["A", "B", "C"]))

    def get(attrs: dict[str, Any]) -> float:
        v = attrs.get(name)
        return 0.0 if v is None else float(v)

    return (name.lower() if draw(st.booleans()) else name), get, 4


RANK_LEAVES = st.composite(_rank_leaf)()


def _rank_combine(children: st.SearchStrategy[Num]) -> st.SearchStrategy[Num]:
    ops = {"+": (1, lambda x, y: x + y), "-": (1, lambda x, y: x - y), "*": (2, lambda x, y: x * y),
           "/": (2, _div)}

    def binary(a: Num, op: str, b: Num, space: str) -> Num:
        prec, f = ops[op]
        left = f"({a[0]})" if a[2] < prec else a[0]
        right = f"({b[0]})" if b[2] <= prec else b[0]  # left-associative: `a - (b - c)` keeps parens
        fa, fb = a[1], b[1]
        return f"{left}{space}{op}{space}{right}", lambda x: f(fa(x), fb(x)), prec

    def negate(a: Num, space: str) -> Num:
        fa = a[1]
        inner = f"({a[0]})" if a[2] < 3 else a[0]
        return f"-{space}{inner}", lambda x: -fa(x), 3

    def parens(a: Num, space: str) -> Num:
        return f"({space}{a[0]}{space})", a[1], 4

    return st.one_of(st.builds(binary, children, st.sampled_from(sorted(ops)), children, SPACE),
                     st.builds(negate, children, SPACE), st.builds(parens, children, SPACE))


RANK_TREES = st.recursive(RANK_LEAVES, _rank_combine, max_leaves=10)


@FAST
@given(RANK_TREES, RANK_ATTRS)
def test_rank_agrees_with_python(tree: Num, attrs: dict[str, Any]) -> None:
    text, evaluate, _ = tree
    got, want = parse_rank(text, known=["a", "b", "c"]).value(attrs), evaluate(attrs)
    assert got == want or (math.isnan(got) and math.isnan(want)), text


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="AB12G. +-*/()x", max_size=25), st.integers(-2, 2))
def test_any_rank_text_parses_or_fails_cleanly(text: str, value: int) -> None:
    try:
        rank = parse_rank(text)
    except ExpressionError as err:
        assert 1 <= err.column <= len(text) + 1
        return
    assert isinstance(rank.value({"A": value, "B": value}), float)
