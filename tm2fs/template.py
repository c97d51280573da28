"""OpenNebula-style templates: `NAME = ssd1`, `TAGS = "SSD,ISCSI"`, `TM_RAW = [ PATH = "/srv" ]`.

The same format admins already write for `onedatastore create`, spaced or compact
(`TM_RAW=[PATH="/srv"]`). Quotes and escapes read as a shell would (a quoted `=` or `]` is a
value, never syntax), `#` starts a comment; nothing is ever run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .errors import InvalidArgument

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SYNTAX = "=[],"


@dataclass(frozen=True)
class _Token:
    text: str
    syntax: bool  # one of = [ ] , outside quotes

    def is_(self, char: str) -> bool:
        return self.syntax and self.text == char


def parse_template(text: str) -> dict[str, Any]:
    """KEY=VALUE pairs separated by newlines, spaces or commas; KEY=[ ... ] nests one level."""
    out, _ = _pairs(_tokens(text), 0, None)
    return out


def _tokens(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif c == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end + 1
        elif c in _SYNTAX:
            tokens.append(_Token(c, True))
            i += 1
        else:
            word, i = _word(text, i)
            tokens.append(_Token(word, False))
    return tokens


def _word(text: str, i: int) -> tuple[str, int]:
    """A value or key up to a space, `#` or syntax character; quoted parts may hold anything."""
    out: list[str] = []
    n = len(text)
    while i < n and not text[i].isspace() and text[i] not in _SYNTAX + "#":
        c = text[i]
        if c == "'":
            end = text.find("'", i + 1)
            if end < 0:
                raise InvalidArgument("template: no closing quotation (')", "check the quotes")
            out.append(text[i + 1:end])
            i = end + 1
        elif c == '"':
            i += 1
            while i < n and text[i] != '"':
                if text[i] == "\\" and i + 1 < n and text[i + 1] in '"\\':
                    i += 1
                out.append(text[i])
                i += 1
            if i >= n:
                raise InvalidArgument('template: no closing quotation (")', "check the quotes")
            i += 1
        elif c == "\\":
            if i + 1 >= n:
                raise InvalidArgument("template: nothing after '\\' at the end", "check the quotes")
            out.append(text[i + 1])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out), i


def _pairs(tokens: list[_Token], pos: int, vector: str | None) -> tuple[dict[str, Any], int]:
    """The pairs from `pos`: of the whole template, or inside `vector = [ ... ]`."""
    out: dict[str, Any] = {}
    while pos < len(tokens):
        tok = tokens[pos]
        if tok.is_(","):
            pos += 1
            continue
        if tok.is_("]"):
            if vector is not None:
                return out, pos + 1
            raise InvalidArgument("template: unexpected ']'")
        if tok.syntax or not _KEY.match(tok.text):
            raise InvalidArgument(f"template: {tok.text!r} is not an attribute name",
                                  "write NAME = value, one per line")
        if pos + 1 >= len(tokens) or not tokens[pos + 1].is_("="):
            raise InvalidArgument(f"template: '=' expected after {tok.text}")
        key = tok.text.upper()
        pos += 2
        following = tokens[pos] if pos < len(tokens) else None
        value: dict[str, Any] | str = ""
        if following is None or following.is_(",") or following.is_("]"):
            pass  # an empty value
        elif following.is_("["):
            if vector is not None:
                raise InvalidArgument(f"template: {vector} = [ {tok.text} = [ ...: a vector "
                                      "attribute holds single values only")
            value, pos = _pairs(tokens, pos + 1, tok.text)
        elif following.syntax:
            raise InvalidArgument(f"template: a value expected after {tok.text} =, not "
                                  f"{following.text!r}", "quote a value that holds = [ ] or ,")
        else:
            value, pos = following.text, pos + 1
        out[key] = value
    if vector is not None:
        raise InvalidArgument(f"template: ']' missing after {vector} = [ ...")
    return out, pos


def format_template(values: dict[str, Any]) -> str:
    """The inverse, for `show` and round trips."""
    lines = []
    for key, value in values.items():
        if isinstance(value, dict):
            inner = ", ".join(f"{k} = {_quote(v)}" for k, v in value.items())
            lines.append(f"{key} = [ {inner} ]")
        elif isinstance(value, list):
            lines.append(f"{key} = {_quote(','.join(map(str, value)))}")
        else:
            lines.append(f"{key} = {_quote(value)}")
    return "\n".join(lines) + "\n"


def _quote(value: Any) -> str:
    text = "" if value is None else str(value)
    if text and re.fullmatch(r"[A-Za-z0-9_./:@+-]+", text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
