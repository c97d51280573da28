"""What a comparison compares, and the rules for comparing it.

The two sides of a comparison are an attribute (`Attr`, looked up per backend) or a value written
in the text (`Lit`, whose number and wildcard forms are worked out once at parse time). A backend's
attribute values are numbers, strings, lists of strings or None. `compare` is the full rule set of
the language (see the package docstring); the compiled fast paths in `nodes` must agree with it.
"""

from __future__ import annotations

import fnmatch
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .tokens import Token, parse_number

_WILDCARD = re.compile(r"[*?\[]")
LISTS = (list, tuple, set, frozenset)
ORDER: dict[str, Callable[[Any, Any], bool]] = {
    ">": operator.gt, "<": operator.lt, ">=": operator.ge, "<=": operator.le,
}


class Lit:
    """A value written in the expression, with its number and wildcard forms worked out once."""

    __slots__ = ("contains", "is_number", "match", "num", "text")

    def __init__(self, tok: Token) -> None:
        self.text = tok.text
        self.is_number = tok.kind == "number"
        self.num = tok.value if self.is_number else parse_number(tok.text.strip())
        self.match: Callable[[str], Any] | None = None
        self.contains: Callable[[str], Any] | None = None
        if not self.is_number and _WILDCARD.search(tok.text):
            self.match = re.compile(fnmatch.translate(tok.text)).match
            self.contains = re.compile(fnmatch.translate(f"*{tok.text}*")).match

    def __repr__(self) -> str:
        return f"Lit({self.text!r})"


@dataclass(frozen=True, slots=True)
class Attr:
    name: str  # upper case
    column: int


def num_of(x: Any) -> int | float | None:
    """The number a value is or parses as (`"20G"` too); None when it is none."""
    if isinstance(x, Lit):
        return x.num
    if isinstance(x, (int, float)):
        return x
    if isinstance(x, str):
        return parse_number(x.strip())
    return None


def _is_num(x: Any) -> bool:
    return x.is_number if isinstance(x, Lit) else isinstance(x, (int, float))


def _text_of(x: Any) -> str:
    if isinstance(x, Lit):
        return x.text
    if isinstance(x, str):
        return x
    if isinstance(x, LISTS):
        return ",".join(str(e) for e in x)
    return str(x)


def _equal(a: Any, b: Any) -> bool:
    if _is_num(a) or _is_num(b):
        x, y = num_of(a), num_of(b)
        if x is not None and y is not None:
            return x == y
    if isinstance(b, Lit) and b.match is not None:
        return b.match(_text_of(a)) is not None
    if isinstance(a, Lit) and a.match is not None:
        return a.match(_text_of(b)) is not None
    return _text_of(a) == _text_of(b)


def _ordered(compare: Callable[[Any, Any], bool], a: Any, b: Any) -> bool:
    x, y = num_of(a), num_of(b)
    if x is not None and y is not None:
        return compare(x, y)
    if _is_num(a) or _is_num(b) or isinstance(a, LISTS) or isinstance(b, LISTS):
        return False
    return compare(_text_of(a), _text_of(b))


def _contains(a: Any, b: Any) -> bool:
    if isinstance(b, LISTS):
        return False
    if isinstance(a, LISTS):
        if isinstance(b, Lit) and b.match is not None:
            return any(b.match(str(e)) is not None for e in a)
        needle = _text_of(b)
        number = num_of(b) if _is_num(b) else None
        return any(str(e) == needle or (number is not None and num_of(e) == number) for e in a)
    if isinstance(a, str) or (isinstance(a, Lit) and not a.is_number):
        haystack = _text_of(a)
        if isinstance(b, Lit) and b.contains is not None:
            return b.contains(haystack) is not None
        return _text_of(b) in haystack
    return False


def compare(op: str, a: Any, b: Any) -> bool:
    """The full rules for one comparison; the compiled fast paths must agree with it."""
    if a is None or b is None:
        return op == "!="
    if op == "=":
        return _equal(a, b)
    if op == "!=":
        return not _equal(a, b)
    if op == "@>":
        return _contains(a, b)
    return _ordered(ORDER[op], a, b)


def show(value: Any) -> str:
    """An attribute's value as `explain` and error messages print it."""
    if isinstance(value, LISTS):
        return "[" + ", ".join(str(e) for e in value) + "]"
    return str(value)
