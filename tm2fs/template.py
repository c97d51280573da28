"""OpenNebula-style templates: `NAME = ssd1`, `TAGS = "SSD,ISCSI"`, `TM_RAW = [ PATH = "/srv" ]`.

The same format admins already write for `onedatastore create`; parsed with shlex (quotes and
escapes as a shell would read them, but nothing is ever run).
"""

from __future__ import annotations

import re
import shlex
from typing import Any

from .errors import InvalidArgument

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_template(text: str) -> dict[str, Any]:
    """KEY=VALUE pairs separated by newlines, spaces or commas; KEY=[ ... ] nests one level."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars="=[],")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        tokens = list(lexer)
    except ValueError as e:
        raise InvalidArgument(f"template: {e}", "check the quotes") from None
    out, _ = _pairs(tokens, 0, nested=False)
    return out


def _pairs(tokens: list[str], pos: int, nested: bool) -> tuple[dict[str, Any], int]:
    out: dict[str, Any] = {}
    while pos < len(tokens):
        tok = tokens[pos]
        if tok == ",":
            pos += 1
            continue
        if tok == "]":
            if nested:
                return out, pos + 1
            raise InvalidArgument("template: unexpected ']'")
        if not _KEY.match(tok):
            raise InvalidArgument(f"template: {tok!r} is not an attribute name",
                                  "write NAME = value, one per line")
        if pos + 2 > len(tokens) or tokens[pos + 1] != "=":
            raise InvalidArgument(f"template: '=' expected after {tok}")
        key = tok.upper()
        if pos + 2 == len(tokens):
            out[key] = ""
            return out, pos + 2
        value_tok = tokens[pos + 2]
        value: dict[str, Any] | str
        if value_tok == "[":
            value, pos = _pairs(tokens, pos + 3, nested=True)
        elif value_tok in ("=", "]", ","):
            value, pos = "", pos + 2
        else:
            value, pos = value_tok, pos + 3
        out[key] = value
    if nested:
        raise InvalidArgument("template: ']' missing")
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
