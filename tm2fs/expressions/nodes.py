"""What a parsed expression compiles to: closures over a backend's attributes.

Requirements become a tree of nodes (`Cmp`, `Not`, `Junction`), each holding its compiled `test`
and able to say `why` it decided, for `Requirements.explain`. A rank becomes `Num`s, folded at parse
time where every part is constant. Placement calls these once per backend and expression, so the
common shapes get closures without dispatch (`_attr_vs_lit`, the unrolled junctions).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .tokens import ExpressionError
from .values import ORDER, Attr, Lit, compare, num_of, show

Attrs = Mapping[str, Any]
Test = Callable[[Attrs], bool]
Value = Callable[[Attrs], float]


# ---------------------------------------------------------------------------------------------
# Requirements: nodes that compile to closures and can say why they decided


def always(attrs: Attrs) -> bool:
    return True


class Cmp:
    __slots__ = ("left", "op", "right", "source", "test")

    def __init__(self, op: str, left: Attr | Lit, right: Attr | Lit, source: str) -> None:
        self.op, self.left, self.right, self.source = op, left, right, source
        self.test: Test = self._compile()

    def _compile(self) -> Test:
        op, left, right = self.op, self.left, self.right
        if isinstance(left, Attr) and isinstance(right, Lit):
            return _attr_vs_lit(op, left.name, right)
        get_left, get_right = _getter(left), _getter(right)
        return lambda attrs: compare(op, get_left(attrs), get_right(attrs))

    def why(self, attrs: Attrs) -> list[str]:
        shown, names = [], []
        for side in (self.left, self.right):
            if isinstance(side, Attr) and side.name not in names:
                names.append(side.name)
                value = attrs.get(side.name)
                shown.append(f"{side.name} is not set" if value is None else f"{side.name} = {show(value)}")
        result = "true" if self.test(attrs) else "false"
        return [f"{self.source} is {result} ({', '.join(shown)})" if shown else f"{self.source} is {result}"]


def _getter(side: Attr | Lit) -> Callable[[Attrs], Any]:
    if isinstance(side, Attr):
        name = side.name
        return lambda attrs: attrs.get(name)
    return lambda attrs: side


def _attr_vs_lit(op: str, name: str, lit: Lit) -> Test:
    """The common `ATTR op value` shape, with a fast path for the usual value types."""
    if op in ORDER and lit.num is not None:
        order, number = ORDER[op], lit.num

        def ordered(attrs: Attrs) -> bool:
            v = attrs.get(name)
            if v.__class__ is int or v.__class__ is float:
                return order(v, number)
            return compare(op, v, lit)

        return ordered
    if op in ("=", "!=") and not lit.is_number:
        want, text, match = op == "=", lit.text, lit.match

        def equal(attrs: Attrs) -> bool:
            v = attrs.get(name)
            if v.__class__ is str:
                return (v == text if match is None else match(v) is not None) is want
            return compare(op, v, lit)

        return equal
    if op == "@>" and not lit.is_number and lit.match is None:
        needle = lit.text

        def contains(attrs: Attrs) -> bool:
            v: Any = attrs.get(name)
            cls = v.__class__
            if cls is list:
                return needle in v or any(e.__class__ is not str and str(e) == needle for e in v)
            if cls is str:
                return needle in v
            return compare(op, v, lit)

        return contains
    return lambda attrs: compare(op, attrs.get(name), lit)


class Not:
    __slots__ = ("child", "test")

    def __init__(self, child: Node) -> None:
        self.child = child
        inner = child.test
        self.test: Test = lambda attrs: not inner(attrs)

    def why(self, attrs: Attrs) -> list[str]:
        return self.child.why(attrs)


class Junction:
    """`a & b & ...`, or `a | b | ...` when `is_or`: short-circuit, like Python's `and`/`or`."""

    __slots__ = ("children", "is_or", "test")

    def __init__(self, children: list[Node], is_or: bool) -> None:
        self.children = children
        self.is_or = is_or
        self.test: Test = _join([c.test for c in children], is_or)

    def why(self, attrs: Attrs) -> list[str]:
        for child in self.children:
            if bool(child.test(attrs)) is self.is_or:
                return child.why(attrs)  # the first true one of an |, the first false one of an &
        return [r for child in self.children for r in child.why(attrs)]


def _join(tests: list[Test], is_or: bool) -> Test:
    """The tests joined; unrolled for two and three, the usual sizes, to save a generator."""
    if len(tests) == 2:
        a, b = tests
        if is_or:
            return lambda attrs: a(attrs) or b(attrs)
        return lambda attrs: a(attrs) and b(attrs)
    if len(tests) == 3:
        a, b, c = tests
        if is_or:
            return lambda attrs: a(attrs) or b(attrs) or c(attrs)
        return lambda attrs: a(attrs) and b(attrs) and c(attrs)
    join = any if is_or else all
    return lambda attrs: join(t(attrs) for t in tests)


Node = Cmp | Not | Junction


# ---------------------------------------------------------------------------------------------
# Rank: a tree of closures returning floats


def _div(x: float, y: float) -> float:
    """Division where a zero divisor gives 0: one empty backend must not abort placement."""
    return x / y if y else 0.0


_ARITH: dict[str, Callable[[float, float], float]] = {
    "+": operator.add, "-": operator.sub, "*": operator.mul, "/": _div,
}


@dataclass(slots=True)
class Num:
    """A rank subtree: `const` when it is known at parse time, else `fn` computes it."""

    fn: Value
    const: float | None = None


def constant(value: float) -> Num:
    return Num(lambda attrs: value, value)


def rank_attr(text: str, name: str, column: int) -> Num:
    """An attribute in a rank: a number, or a string that parses as one; missing or None is 0."""

    def get(attrs: Attrs) -> float:
        v: Any = attrs.get(name)
        cls = v.__class__
        if cls is float:
            return v
        if cls is int:
            return float(v)
        if v is None:
            return 0.0
        number = num_of(v) if isinstance(v, (str, int, float)) else None
        if number is None:
            reason = f"attribute {name} is not a number ({name} = {show(v)}) at column {column}"
            raise ExpressionError(reason, text, column, "a rank can only use numeric attributes")
        return float(number)

    return Num(get)


def rank_neg(child: Num) -> Num:
    if child.const is not None:
        return constant(-child.const)
    inner = child.fn
    return Num(lambda attrs: -inner(attrs))


def rank_chain(first: Num, rest: list[tuple[str, Num]]) -> Num:
    """A left-associative run like `A - B + C`; folded when every part is constant."""
    if first.const is not None and all(n.const is not None for _, n in rest):
        value = first.const
        for op, n in rest:
            assert n.const is not None  # all checked above
            value = _ARITH[op](value, n.const)
        return constant(value)
    if len(rest) == 1:
        op, second = rest[0]
        f, a, b = _ARITH[op], first.fn, second.fn
        if second.const is not None:
            c = second.const
            return Num(lambda attrs: f(a(attrs), c))
        return Num(lambda attrs: f(a(attrs), b(attrs)))
    head = first.fn
    steps = [(_ARITH[op], n.fn) for op, n in rest]

    def chain(attrs: Attrs) -> float:
        value = head(attrs)
        for f, fn in steps:
            value = f(value, fn(attrs))
        return value

    return Num(chain)
