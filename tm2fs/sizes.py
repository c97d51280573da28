"""Sizes as people write them (`10G`, `512M`, `1.5TiB`, `4096`) and as tables show them."""

from __future__ import annotations

import re

from .errors import FileTooBig, InvalidArgument

MAX_SIZE = 2**63 - 1  # off_t; anything larger no backend can hold
#: binary units of sizes as written; the requirements and rank expressions read sizes with them too
UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50, "E": 2**60}
# digits bounded: 40 are past any size already; 5,000 would overflow int() and float()
_SIZE = re.compile(r"^\s*(\d{1,40}(?:\.\d{1,40})?)\s*([KMGTPE]?)(I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Binary units like `truncate -s`: a bare number is bytes; K, KB and KiB all mean 1024."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = _SIZE.match(str(text))
        if not match:
            raise InvalidArgument(
                f"size {text!r:.60} is not understood", "write a number of bytes or e.g. 512M, 10G, 1T"
            )
        number, unit = match.group(1), match.group(2).upper()
        value = int(float(number) * UNITS[unit]) if "." in number else int(number) * UNITS[unit]
    if value < 0:
        raise InvalidArgument(f"size {text!r} is negative")
    if value > MAX_SIZE:
        raise FileTooBig(f"size {text!r:.60} is larger than any backend can hold (8 EiB)")
    return value


def format_size(value: int | None) -> str:
    """Compact binary units for tables, always with a unit (`19B`, `1.5G`); None means the
    backend did not say."""
    if value is None:
        return "-"
    n: float = value  # stays an int while below 1024
    for unit in ("", "K", "M", "G", "T", "P"):
        if abs(n) < 1024 or unit == "P":
            return f"{n}B" if unit == "" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)
