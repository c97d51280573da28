r"""Requirements and rank expressions that place VM disks on storage backends.

In the spirit of OpenNebula's SCHED_DS_REQUIREMENTS and SCHED_DS_RANK: a VM template says which
backends may hold its disks (`FREE > 20G & TAGS @> SSD & STATE = READY`) and which of those it
prefers (`FREE - 10G * COST`). Placement evaluates both over every backend of the pool, so each text
is parsed once (by a small recursive-descent parser, with errors that point at a column) and
compiled into closures that evaluate in a few microseconds.

Requirements (a boolean; `!` binds tightest, then comparisons, then `&`, then `|`)::

    requirements := [ or ]                      (empty text: every backend matches)
    or           := and ( '|' and )*
    and          := unary ( '&' unary )*
    unary        := '!' unary | '(' or ')' | comparison
    comparison   := operand ( '=' | '!=' | '>' | '<' | '>=' | '<=' | '@>' ) operand
    operand      := NAME | NUMBER | STRING | WORD

Rank (a number; usual precedence, unary minus binds tightest, `/` is left-associative)::

    rank    := [ sum ]                          (empty text: every backend ranks 0)
    sum     := product ( ( '+' | '-' ) product )*
    product := factor ( ( '*' | '/' ) factor )*
    factor  := ( '-' | '+' ) factor | '(' sum ')' | NAME | NUMBER

Tokens. NAME is `[A-Za-z_][A-Za-z0-9_]*`, case-insensitive (normalised to upper case). NUMBER is
`12`, `0.5`, `-3` (requirements only; rank has unary minus) or a size with a binary unit — `20G`,
`1.5T`, `512MiB`, `4KB`: K, M, G, T, P, alone or followed by `B` or `iB`, are powers of 1024, and
sizes become bytes. STRING is double- or single-quoted, with `\"`, `\'` and `\\` as escapes. WORD
(requirements only) is any other run of characters up to a space, a quote or an operator
character, so `SSD`, `iscsi-fast*` and `10.0.0.1` need no quotes.

Meaning of a comparison:

- A NAME on the left is an attribute. A NAME on the right is an attribute after `>`, `<`, `>=`,
  `<=` (`FREE > USED`) or when the left side is a value (`20G < FREE`); after `=`, `!=` and `@>` it
  is a plain word, as in OpenNebula: `STATE = ERROR` compares with the word ERROR, not with the
  ERROR attribute.
- `=` and `!=` compare numbers when one side is a number and the other is or parses as one;
  otherwise they compare text, case-sensitively, and a written value holding `*`, `?` or `[...]`
  is a shell wildcard (fnmatch.fnmatchcase). A list attribute compares as its comma-joined text.
- `@>` is "contains": a list attribute contains an element equal to (or matching) the value; a
  string attribute contains the value as a substring (wildcards allowed).
- `>`, `<`, `>=`, `<=` compare numbers (strings that parse as numbers count); two non-numeric
  strings compare lexically; anything else (a number against a word, a list) is false.
- A missing attribute, or one whose value is None, makes a comparison false, except `!=`, which
  is then true — as OpenNebula does.

In a rank, attributes must hold numbers (or strings that parse as numbers); a missing or None
attribute counts as 0, anything else raises ExpressionError when evaluated; `x / 0` is 0.
"""

from __future__ import annotations

import difflib
import fnmatch
import operator
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

from .errors import InvalidArgument

__all__ = ["ExpressionError", "Rank", "Requirements", "parse_rank", "parse_requirements"]

MAX_DEPTH = 100  # nesting of '(', '!' and unary signs; deeper would exhaust Python's stack

Attrs = Mapping[str, Any]

_UNITS = {"B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}
_NUMBER = re.compile(r"([+-]?\d+(?:\.\d+)?)([KMGTP](?:I?B)?|B)?", re.IGNORECASE)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_WILDCARD = re.compile(r"[*?\[]")
_LISTS = (list, tuple, set, frozenset)
_CMP_OPS = ("=", "!=", ">", "<", ">=", "<=", "@>")
_ORDER: dict[str, Callable[[Any, Any], bool]] = {
    ">": operator.gt, "<": operator.lt, ">=": operator.ge, "<=": operator.le,
}
_REQ_STOP = frozenset("\"'=!<>@&|()")
_OPERANDS = ("name", "number", "string", "word")


class ExpressionError(InvalidArgument):
    """A requirements or rank text that cannot be parsed or evaluated, pointing at the column."""

    def __init__(self, reason: str, text: str, column: int = 0, hint: str | None = None) -> None:
        self.reason = reason
        self.text = text
        self.column = column  # 1-based; 0 when the problem has no position
        super().__init__(reason + _pointer(text, column), hint)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reason, self.text, self.column, self.hint))


def _pointer(text: str, column: int) -> str:
    """The expression with a caret under the column, so a long text shows where it went wrong."""
    if column <= 0:
        return ""
    shown = "".join(" " if c.isspace() else c for c in text)
    start = max(0, column - 60)
    line = ("..." if start else "") + shown[start:start + 100] + ("..." if start + 100 < len(shown) else "")
    caret = column - 1 - start + (3 if start else 0)
    return f"\n  {line}\n  {' ' * caret}^"


def _parse_number(text: str) -> int | float | None:
    """`12` → 12, `0.5` → 0.5, `1.5K` → 1536; None when the text is not a number."""
    m = _NUMBER.fullmatch(text)
    if m is None:
        return None
    digits, unit = m.group(1), m.group(2)
    scale = _UNITS[unit[0].upper()] if unit else 1
    if "." in digits:
        return int(float(digits) * scale) if unit else float(digits)
    return int(digits) * scale


# ---------------------------------------------------------------------------------------------
# Tokens


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # name, number, string, word, op, end
    text: str  # as written; a string's content without quotes and escapes
    start: int  # 0-based offsets into the expression
    end: int
    value: int | float | None = None  # a number's value

    @property
    def column(self) -> int:
        return self.start + 1


def _tokenize(text: str, rank: bool) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif rank:
            i = _rank_token(text, i, tokens)
        elif c in "\"'":
            i = _string_token(text, i, tokens)
        elif text.startswith(("!=", ">=", "<=", "@>"), i):
            tokens.append(_Token("op", text[i:i + 2], i, i + 2))
            i += 2
        elif c in "=<>!&|()":
            tokens.append(_Token("op", c, i, i + 1))
            i += 1
        elif c == "@":
            raise ExpressionError(f"unexpected character '@' at column {i + 1}", text, i + 1,
                                  "'@>' means contains, e.g. TAGS @> SSD")
        else:
            j = i
            while j < n and text[j] not in _REQ_STOP and not text[j].isspace():
                j += 1
            word = text[i:j]
            number = _parse_number(word)
            if number is not None:
                tokens.append(_Token("number", word, i, j, number))
            else:
                tokens.append(_Token("name" if _NAME.fullmatch(word) else "word", word, i, j))
            i = j
    tokens.append(_Token("end", "", n, n))
    return tokens


def _string_token(text: str, i: int, tokens: list[_Token]) -> int:
    quote, j, out = text[i], i + 1, []
    while j < len(text):
        c = text[j]
        if c == "\\" and j + 1 < len(text) and text[j + 1] in (quote, "\\"):
            out.append(text[j + 1])
            j += 2
        elif c == quote:
            tokens.append(_Token("string", "".join(out), i, j + 1))
            return j + 1
        else:
            out.append(c)
            j += 1
    raise ExpressionError(f"unterminated string at column {i + 1}", text, i + 1, f"close it with {quote}")


def _rank_token(text: str, i: int, tokens: list[_Token]) -> int:
    c = text[i]
    if c in "+-*/()":
        tokens.append(_Token("op", c, i, i + 1))
        return i + 1
    name = _NAME.match(text, i)
    if name:
        tokens.append(_Token("name", name.group(), i, name.end()))
        return name.end()
    if c.isdigit() or c == ".":
        j = i
        while j < len(text) and (text[j].isalnum() or text[j] in "._"):
            j += 1
        word = text[i:j]
        number = _parse_number(word)
        if number is None:
            raise ExpressionError(f"invalid number '{word}' at column {i + 1}", text, i + 1,
                                  "write e.g. 12, 0.5, 20G or 1.5TiB")
        tokens.append(_Token("number", word, i, j, number))
        return j
    raise ExpressionError(f"unexpected character '{c}' at column {i + 1}", text, i + 1,
                          "a rank uses numbers, attribute names, + - * / and parentheses")


# ---------------------------------------------------------------------------------------------
# Values and comparisons


class _Lit:
    """A value written in the expression, with its number and wildcard forms worked out once."""

    __slots__ = ("contains", "is_number", "match", "num", "text")

    def __init__(self, tok: _Token) -> None:
        self.text = tok.text
        self.is_number = tok.kind == "number"
        self.num = tok.value if self.is_number else _parse_number(tok.text.strip())
        self.match: Callable[[str], Any] | None = None
        self.contains: Callable[[str], Any] | None = None
        if not self.is_number and _WILDCARD.search(tok.text):
            self.match = re.compile(fnmatch.translate(tok.text)).match
            self.contains = re.compile(fnmatch.translate(f"*{tok.text}*")).match

    def __repr__(self) -> str:
        return f"_Lit({self.text!r})"


@dataclass(frozen=True, slots=True)
class _Attr:
    name: str  # upper case
    column: int


def _num_of(x: Any) -> int | float | None:
    if isinstance(x, _Lit):
        return x.num
    if isinstance(x, (int, float)):
        return x
    if isinstance(x, str):
        return _parse_number(x.strip())
    return None


def _is_num(x: Any) -> bool:
    return x.is_number if isinstance(x, _Lit) else isinstance(x, (int, float))


def _text_of(x: Any) -> str:
    if isinstance(x, _Lit):
        return x.text
    if isinstance(x, str):
        return x
    if isinstance(x, _LISTS):
        return ",".join(str(e) for e in x)
    return str(x)


def _equal(a: Any, b: Any) -> bool:
    if _is_num(a) or _is_num(b):
        x, y = _num_of(a), _num_of(b)
        if x is not None and y is not None:
            return x == y
    if isinstance(b, _Lit) and b.match is not None:
        return b.match(_text_of(a)) is not None
    if isinstance(a, _Lit) and a.match is not None:
        return a.match(_text_of(b)) is not None
    return _text_of(a) == _text_of(b)


def _ordered(compare: Callable[[Any, Any], bool], a: Any, b: Any) -> bool:
    x, y = _num_of(a), _num_of(b)
    if x is not None and y is not None:
        return compare(x, y)
    if _is_num(a) or _is_num(b) or isinstance(a, _LISTS) or isinstance(b, _LISTS):
        return False
    return compare(_text_of(a), _text_of(b))


def _contains(a: Any, b: Any) -> bool:
    if isinstance(b, _LISTS):
        return False
    if isinstance(a, _LISTS):
        if isinstance(b, _Lit) and b.match is not None:
            return any(b.match(str(e)) is not None for e in a)
        needle = _text_of(b)
        number = _num_of(b) if _is_num(b) else None
        return any(str(e) == needle or (number is not None and _num_of(e) == number) for e in a)
    if isinstance(a, str) or (isinstance(a, _Lit) and not a.is_number):
        haystack = _text_of(a)
        if isinstance(b, _Lit) and b.contains is not None:
            return b.contains(haystack) is not None
        return _text_of(b) in haystack
    return False


def _compare(op: str, a: Any, b: Any) -> bool:
    """The full rules for one comparison; the compiled fast paths must agree with it."""
    if a is None or b is None:
        return op == "!="
    if op == "=":
        return _equal(a, b)
    if op == "!=":
        return not _equal(a, b)
    if op == "@>":
        return _contains(a, b)
    return _ordered(_ORDER[op], a, b)


def _show(value: Any) -> str:
    if isinstance(value, _LISTS):
        return "[" + ", ".join(str(e) for e in value) + "]"
    return str(value)


# ---------------------------------------------------------------------------------------------
# Requirements: nodes that compile to closures and can say why they decided


Test = Callable[[Attrs], bool]


def _always(attrs: Attrs) -> bool:
    return True


class _Cmp:
    __slots__ = ("left", "op", "right", "source", "test")

    def __init__(self, op: str, left: _Attr | _Lit, right: _Attr | _Lit, source: str) -> None:
        self.op, self.left, self.right, self.source = op, left, right, source
        self.test = self._compile()

    def _compile(self) -> Test:
        op, left, right = self.op, self.left, self.right
        if isinstance(left, _Attr) and isinstance(right, _Lit):
            return _attr_vs_lit(op, left.name, right)
        get_left, get_right = _getter(left), _getter(right)
        return lambda attrs: _compare(op, get_left(attrs), get_right(attrs))

    def why(self, attrs: Attrs) -> list[str]:
        shown, names = [], []
        for side in (self.left, self.right):
            if isinstance(side, _Attr) and side.name not in names:
                names.append(side.name)
                value = attrs.get(side.name)
                shown.append(f"{side.name} is not set" if value is None else f"{side.name} = {_show(value)}")
        result = "true" if self.test(attrs) else "false"
        return [f"{self.source} is {result} ({', '.join(shown)})" if shown else f"{self.source} is {result}"]


def _getter(side: _Attr | _Lit) -> Callable[[Attrs], Any]:
    if isinstance(side, _Attr):
        name = side.name
        return lambda attrs: attrs.get(name)
    return lambda attrs: side


def _attr_vs_lit(op: str, name: str, lit: _Lit) -> Test:
    """The common `ATTR op value` shape, with a fast path for the usual value types."""
    if op in _ORDER and lit.num is not None:
        compare, number = _ORDER[op], lit.num

        def ordered(attrs: Attrs) -> bool:
            v = attrs.get(name)
            if v.__class__ is int or v.__class__ is float:
                return compare(v, number)
            return _compare(op, v, lit)

        return ordered
    if op in ("=", "!=") and not lit.is_number:
        want, text, match = op == "=", lit.text, lit.match

        def equal(attrs: Attrs) -> bool:
            v = attrs.get(name)
            if v.__class__ is str:
                return (v == text if match is None else match(v) is not None) is want
            return _compare(op, v, lit)

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
            return _compare(op, v, lit)

        return contains
    return lambda attrs: _compare(op, attrs.get(name), lit)


class _Not:
    __slots__ = ("child", "test")

    def __init__(self, child: _Node) -> None:
        self.child = child
        inner = child.test
        self.test: Test = lambda attrs: not inner(attrs)

    def why(self, attrs: Attrs) -> list[str]:
        return self.child.why(attrs)


class _And:
    __slots__ = ("children", "test")

    def __init__(self, children: list[_Node]) -> None:
        self.children = children
        tests = [c.test for c in children]
        if len(tests) == 2:
            a, b = tests
            self.test: Test = lambda attrs: a(attrs) and b(attrs)
        elif len(tests) == 3:
            a, b, c = tests
            self.test = lambda attrs: a(attrs) and b(attrs) and c(attrs)
        else:
            self.test = lambda attrs: all(t(attrs) for t in tests)

    def why(self, attrs: Attrs) -> list[str]:
        for child in self.children:
            if not child.test(attrs):
                return child.why(attrs)  # the first false one decided
        return [r for child in self.children for r in child.why(attrs)]


class _Or:
    __slots__ = ("children", "test")

    def __init__(self, children: list[_Node]) -> None:
        self.children = children
        tests = [c.test for c in children]
        if len(tests) == 2:
            a, b = tests
            self.test: Test = lambda attrs: a(attrs) or b(attrs)
        elif len(tests) == 3:
            a, b, c = tests
            self.test = lambda attrs: a(attrs) or b(attrs) or c(attrs)
        else:
            self.test = lambda attrs: any(t(attrs) for t in tests)

    def why(self, attrs: Attrs) -> list[str]:
        for child in self.children:
            if child.test(attrs):
                return child.why(attrs)  # the first true one decided
        return [r for child in self.children for r in child.why(attrs)]


_Node = _Cmp | _Not | _And | _Or


# ---------------------------------------------------------------------------------------------
# Rank: a tree of closures returning floats


Value = Callable[[Attrs], float]


def _div(x: float, y: float) -> float:
    """Division where a zero divisor gives 0: one empty backend must not abort placement."""
    return x / y if y else 0.0


_ARITH: dict[str, Callable[[float, float], float]] = {
    "+": operator.add, "-": operator.sub, "*": operator.mul, "/": _div,
}


@dataclass(slots=True)
class _Num:
    """A rank subtree: `const` when it is known at parse time, else `fn` computes it."""

    fn: Value
    const: float | None = None


def _constant(value: float) -> _Num:
    return _Num(lambda attrs: value, value)


def _rank_attr(text: str, name: str, column: int) -> _Num:
    def get(attrs: Attrs) -> float:
        v: Any = attrs.get(name)
        cls = v.__class__
        if cls is float:
            return v
        if cls is int:
            return float(v)
        if v is None:
            return 0.0
        number = _num_of(v) if isinstance(v, (str, int, float)) else None
        if number is None:
            reason = f"attribute {name} is not a number ({name} = {_show(v)}) at column {column}"
            raise ExpressionError(reason, text, column, "a rank can only use numeric attributes")
        return float(number)

    return _Num(get)


def _rank_neg(child: _Num) -> _Num:
    if child.const is not None:
        return _constant(-child.const)
    inner = child.fn
    return _Num(lambda attrs: -inner(attrs))


def _rank_chain(first: _Num, rest: list[tuple[str, _Num]]) -> _Num:
    """A left-associative run like `A - B + C`; folded when every part is constant."""
    if first.const is not None and all(n.const is not None for _, n in rest):
        value = first.const
        for op, n in rest:
            assert n.const is not None  # all checked above
            value = _ARITH[op](value, n.const)
        return _constant(value)
    if len(rest) == 1:
        op, second = rest[0]
        f, a, b = _ARITH[op], first.fn, second.fn
        if second.const is not None:
            c = second.const
            return _Num(lambda attrs: f(a(attrs), c))
        return _Num(lambda attrs: f(a(attrs), b(attrs)))
    head = first.fn
    steps = [(_ARITH[op], n.fn) for op, n in rest]

    def chain(attrs: Attrs) -> float:
        value = head(attrs)
        for f, fn in steps:
            value = f(value, fn(attrs))
        return value

    return _Num(chain)


# ---------------------------------------------------------------------------------------------
# Parsing


class _Parser:
    """Shared cursor, error reporting and attribute checks of both grammars."""

    def __init__(self, text: str, rank: bool, known: Collection[str] | None) -> None:
        self.text = text
        self.tokens = _tokenize(text, rank)
        self.pos = 0
        self.depth = 0
        self.known = None if known is None else frozenset(k.upper() for k in known)
        self.attributes: set[str] = set()

    def peek(self) -> _Token:
        return self.tokens[self.pos]

    def take(self) -> _Token:
        tok = self.tokens[self.pos]
        self.pos += 1
        return tok

    def is_op(self, *ops: str) -> bool:
        tok = self.tokens[self.pos]
        return tok.kind == "op" and tok.text in ops

    def after(self) -> str:
        """` after '>='`: names the token before the current one, for 'expected ...' messages."""
        if self.pos == 0:
            return ""
        prev = self.tokens[self.pos - 1]
        return f" after '{self.text[prev.start:prev.end]}'"

    def fail(self, reason: str, column: int, hint: str | None = None) -> NoReturn:
        raise ExpressionError(reason, self.text, column, hint)

    def expected(self, what: str) -> NoReturn:
        tok = self.peek()
        self.fail(f"expected {what}{self.after()} at column {tok.column}", tok.column)

    def enter(self, tok: _Token) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            self.fail(f"expression nested more than {MAX_DEPTH} levels deep at column {tok.column}",
                      tok.column)

    def attribute(self, tok: _Token) -> _Attr:
        name = tok.text.upper()
        if self.known is not None and name not in self.known:
            names = ", ".join(sorted(self.known)) or "none"
            close = difflib.get_close_matches(name, self.known, n=1)
            self.fail(f"unknown attribute '{tok.text}' at column {tok.column}; known: {names}", tok.column,
                      f"did you mean {close[0]}?" if close else None)
        self.attributes.add(name)
        return _Attr(name, tok.column)

    def finish(self, what: str) -> None:
        tok = self.peek()
        if tok.kind == "end":
            return
        if tok.kind == "op" and tok.text == ")":
            self.fail(f"unexpected ')' at column {tok.column}", tok.column, "no '(' is open there")
        self.fail(f"expected {what} or end of expression at column {tok.column}", tok.column)

    def close(self, opener: _Token, what: str) -> None:
        tok = self.peek()
        if tok.kind == "op" and tok.text == ")":
            self.take()
            self.depth -= 1
        elif tok.kind == "end":
            self.fail(f"unclosed '(' opened at column {opener.column}", opener.column, "add a ')'")
        else:
            self.fail(f"expected {what} or ')' at column {tok.column}", tok.column)

    # requirements

    def requirements(self) -> _Node:
        node = self.either()
        self.finish("'&', '|'")
        return node

    def either(self) -> _Node:
        children = [self.both()]
        while self.is_op("|"):
            self.take()
            children.append(self.both())
        return children[0] if len(children) == 1 else _Or(children)

    def both(self) -> _Node:
        children = [self.unary()]
        while self.is_op("&"):
            self.take()
            children.append(self.unary())
        return children[0] if len(children) == 1 else _And(children)

    def unary(self) -> _Node:
        tok = self.peek()
        if self.is_op("!"):
            self.enter(self.take())
            node: _Node = _Not(self.unary())
            self.depth -= 1
            return node
        if self.is_op("("):
            self.enter(self.take())
            node = self.either()
            self.close(tok, "'&', '|'")
            return node
        if tok.kind in _OPERANDS:
            return self.comparison()
        self.expected("a comparison")

    def comparison(self) -> _Cmp:
        left = self.take()
        if not self.is_op(*_CMP_OPS):
            self.expected("a comparison operator (=, !=, >, <, >=, <=, @>)")
        op = self.take().text
        if self.peek().kind not in _OPERANDS:
            self.expected("a value")
        right = self.take()
        source = self.text[left.start:right.end]
        if left.kind == "name":
            lhs: _Attr | _Lit = self.attribute(left)
            rhs = self.attribute(right) if right.kind == "name" and op in _ORDER else _Lit(right)
        elif right.kind == "name":
            lhs, rhs = _Lit(left), self.attribute(right)
        elif left.kind == "word":
            self.fail(f"'{left.text}' at column {left.column} is not an attribute name", left.column,
                      "attribute names are letters, digits and '_', starting with a letter or '_'")
        else:
            self.fail(f"comparison at column {left.column} has no attribute on either side", left.column)
        return _Cmp(op, lhs, rhs, source)

    # rank

    def rank(self) -> _Num:
        node = self.sum()
        self.finish("an operator (+, -, *, /)")
        return node

    def sum(self) -> _Num:
        first, rest = self.product(), []
        while self.is_op("+", "-"):
            op = self.take().text
            rest.append((op, self.product()))
        return _rank_chain(first, rest) if rest else first

    def product(self) -> _Num:
        first, rest = self.factor(), []
        while self.is_op("*", "/"):
            op = self.take().text
            rest.append((op, self.factor()))
        return _rank_chain(first, rest) if rest else first

    def factor(self) -> _Num:
        tok = self.peek()
        if self.is_op("-", "+"):
            self.enter(self.take())
            node = self.factor()
            self.depth -= 1
            return _rank_neg(node) if tok.text == "-" else node
        if self.is_op("("):
            self.enter(self.take())
            node = self.sum()
            self.close(tok, "an operator (+, -, *, /)")
            return node
        if tok.kind == "number":
            self.take()
            assert tok.value is not None  # the lexer gives every number its value
            return _constant(float(tok.value))
        if tok.kind == "name":
            self.take()
            attr = self.attribute(tok)
            return _rank_attr(self.text, attr.name, attr.column)
        self.expected("a number, an attribute or '('")


# ---------------------------------------------------------------------------------------------
# Public API


@dataclass(frozen=True, slots=True)
class Requirements:
    """A parsed requirements expression: which backends may hold a disk."""

    text: str
    attributes: frozenset[str]  # upper-case names of the attributes it reads
    _test: Test = field(repr=False, compare=False)
    _root: _Node | None = field(repr=False, compare=False)

    def matches(self, attrs: Attrs) -> bool:
        """Whether a backend with these (upper-case keyed) attributes satisfies the requirements."""
        return self._test(attrs)

    def explain(self, attrs: Attrs) -> str:
        """The comparisons that decided the outcome, e.g. `TAGS @> SSD is false (TAGS = [HDD7K])`."""
        if self._root is None:
            return "no requirements"
        return "; ".join(self._root.why(attrs))

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class Rank:
    """A parsed rank expression: how much a backend is preferred (higher is better)."""

    text: str
    attributes: frozenset[str]
    _value: Value = field(repr=False, compare=False)

    def value(self, attrs: Attrs) -> float:
        """The rank of a backend; raises ExpressionError if a referenced attribute is not a number."""
        return self._value(attrs)

    def __str__(self) -> str:
        return self.text


def parse_requirements(text: str, known: Collection[str] | None = None) -> Requirements:
    """Parse and compile a requirements text; `known` (any case) rejects misspelt attributes early."""
    parser = _Parser(text, rank=False, known=known)
    if parser.peek().kind == "end":
        return Requirements(text, frozenset(), _always, None)
    root = parser.requirements()
    return Requirements(text, frozenset(parser.attributes), root.test, root)


def parse_rank(text: str, known: Collection[str] | None = None) -> Rank:
    """Parse and compile a rank text; an empty one ranks every backend 0."""
    parser = _Parser(text, rank=True, known=known)
    if parser.peek().kind == "end":
        return Rank(text, frozenset(), _constant(0.0).fn)
    node = parser.rank()
    return Rank(text, frozenset(parser.attributes), node.fn)
