"""The words of an expression: numbers (with size units), names, strings, bare words, operators.

Both grammars share one lexer, which switches on `rank`: a requirements text has comparison and
boolean operators, quoted strings and bare WORDs (`iscsi-fast*`, `10.0.0.1`); a rank text has
arithmetic operators and only names and numbers. ExpressionError lives here, at the bottom of the
package, because every later stage reports through it with the column it points at.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidArgument
from ..sizes import UNITS

_NUMBER = re.compile(r"([+-]?\d+(?:\.\d+)?)([KMGTP](?:I?B)?|B)?", re.IGNORECASE)
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_REQ_STOP = frozenset("\"'=!<>@&|()")


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


def parse_number(text: str) -> int | float | None:
    """`12` → 12, `0.5` → 0.5, `1.5K` → 1536; None when the text is not a number."""
    m = _NUMBER.fullmatch(text)
    if m is None:
        return None
    digits, unit = m.group(1), m.group(2)
    scale = UNITS[unit[0].upper()] if unit else 1
    if "." in digits:
        return int(float(digits) * scale) if unit else float(digits)
    return int(digits) * scale


@dataclass(frozen=True, slots=True)
class Token:
    kind: str  # name, number, string, word, op, end
    text: str  # as written; a string's content without quotes and escapes
    start: int  # 0-based offsets into the expression
    end: int
    value: int | float | None = None  # a number's value

    @property
    def column(self) -> int:
        return self.start + 1


def tokenize(text: str, rank: bool) -> list[Token]:
    """The tokens of a rank (`rank`) or requirements text, ending with an `end` token."""
    tokens: list[Token] = []
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
            tokens.append(Token("op", text[i:i + 2], i, i + 2))
            i += 2
        elif c in "=<>!&|()":
            tokens.append(Token("op", c, i, i + 1))
            i += 1
        elif c == "@":
            raise ExpressionError(f"unexpected character '@' at column {i + 1}", text, i + 1,
                                  "'@>' means contains, e.g. TAGS @> SSD")
        else:
            j = i
            while j < n and text[j] not in _REQ_STOP and not text[j].isspace():
                j += 1
            word = text[i:j]
            number = parse_number(word)
            if number is not None:
                tokens.append(Token("number", word, i, j, number))
            else:
                tokens.append(Token("name" if NAME.fullmatch(word) else "word", word, i, j))
            i = j
    tokens.append(Token("end", "", n, n))
    return tokens


def _string_token(text: str, i: int, tokens: list[Token]) -> int:
    quote, j, out = text[i], i + 1, []
    while j < len(text):
        c = text[j]
        if c == "\\" and j + 1 < len(text) and text[j + 1] in (quote, "\\"):
            out.append(text[j + 1])
            j += 2
        elif c == quote:
            tokens.append(Token("string", "".join(out), i, j + 1))
            return j + 1
        else:
            out.append(c)
            j += 1
    raise ExpressionError(f"unterminated string at column {i + 1}", text, i + 1, f"close it with {quote}")


def _rank_token(text: str, i: int, tokens: list[Token]) -> int:
    c = text[i]
    if c in "+-*/()":
        tokens.append(Token("op", c, i, i + 1))
        return i + 1
    name = NAME.match(text, i)
    if name:
        tokens.append(Token("name", name.group(), i, name.end()))
        return name.end()
    if c.isdigit() or c == ".":
        j = i
        while j < len(text) and (text[j].isalnum() or text[j] in "._"):
            j += 1
        word = text[i:j]
        number = parse_number(word)
        if number is None:
            raise ExpressionError(f"invalid number '{word}' at column {i + 1}", text, i + 1,
                                  "write e.g. 12, 0.5, 20G or 1.5TiB")
        tokens.append(Token("number", word, i, j, number))
        return j
    raise ExpressionError(f"unexpected character '{c}' at column {i + 1}", text, i + 1,
                          "a rank uses numbers, attribute names, + - * / and parentheses")
