"""How the CLIs show things: tables by default, `--json`, `-x` (OpenNebula-style XML), `--csv`."""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from .errors import InvalidArgument
from .sizes import format_size

SIZE_COLUMNS = {"CAPACITY", "FREE", "USED", "ALLOCATED", "AVAILABLE", "CAPACITY_LIMIT", "SIZE"}
#: seconds since the epoch in the API (and `--json`); tables show them as local ISO dates
TIME_COLUMNS = {"CREATED", "UPDATED", "MONITORED"}


def iso_time(seconds: float) -> str:
    """Local time with its UTC offset, to the second: `2026-11-27T10:42:40+01:00`."""
    return datetime.fromtimestamp(seconds).astimezone().isoformat(timespec="seconds")


def cell(key: str, value: Any) -> str:
    """A value as a table shows it: sizes humanised, times as dates, lists joined, unknowns
    as '-'."""
    if key in SIZE_COLUMNS:
        return format_size(value)
    if value is None:
        return "-"
    if key in TIME_COLUMNS and isinstance(value, int | float):
        return iso_time(value)
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str], header: bool = True) -> Table:
    t = Table(box=box.SIMPLE_HEAD if header else None, show_header=header, pad_edge=False,
              show_edge=False,
              header_style="bold")
    for c in columns:
        t.add_column(c, justify="right" if c in SIZE_COLUMNS or c.startswith("NB")
                     or c in ("ID", "COST") else "left", no_wrap=True)
    for row in rows:
        t.add_row(*(cell(c, row.get(c)) for c in columns))
    return t


def console() -> Console:
    """Piped output is never cut to 80 columns: scripts parse it."""
    return Console(width=None if sys.stdout.isatty() else 10_000, highlight=False)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], header: bool = True) -> None:
    console().print(table(rows, columns, header))


def print_attributes(attrs: dict[str, Any]) -> None:
    """One `ATTRIBUTE VALUE` line per attribute, each value shown as its own column would be."""
    print_table([{"ATTRIBUTE": k, "VALUE": cell(k, v)} for k, v in attrs.items()],
                ["ATTRIBUTE", "VALUE"], header=False)


def to_json(data: Any) -> str:
    return json.dumps(data, indent=2, default=str)


def to_xml(rows: Sequence[dict[str, Any]] | dict[str, Any], pool: str = "STORAGEBACKEND_POOL",
           item: str = "STORAGEBACKEND") -> str:
    """As OpenNebula's `-x`: one element per attribute, nested for TM_RAW/ATTRS/IMAGES."""
    def add(parent: ET.Element, key: str, value: Any) -> None:
        el = ET.SubElement(parent, key)
        if isinstance(value, dict):
            for k, v in value.items():
                add(el, str(k), v)
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            singular = key[:-1] if key.endswith("S") else key
            for v in value:
                add(el, singular, v)
        elif isinstance(value, list):
            el.text = ",".join(map(str, value))
        elif value is not None:
            el.text = str(value)

    def element(row: dict[str, Any]) -> ET.Element:
        el = ET.Element(item)
        for k, v in row.items():
            add(el, k, v)
        return el

    if isinstance(rows, dict):
        root = element(rows)
    else:
        root = ET.Element(pool)
        for row in rows:
            root.append(element(row))
    ET.indent(root)
    return ET.tostring(root, encoding="unicode")


def to_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str], header: bool = True) -> str:
    out = io.StringIO()
    w = csv.writer(out)
    if header:
        w.writerow(columns)
    for row in rows:
        w.writerow([",".join(map(str, v)) if isinstance(v, list) else ("" if v is None else v)
                    for v in (row.get(c) for c in columns)])
    return out.getvalue()


def parse_columns(spec: str | None, default: Sequence[str], known: Sequence[str]) -> list[str]:
    if not spec:
        return list(default)
    cols = [c.strip().upper() for c in spec.split(",") if c.strip()]
    unknown = [c for c in cols if c not in known]
    if unknown:
        raise InvalidArgument(f"unknown column(s) {', '.join(unknown)}",
                              f"columns: {', '.join(known)}")
    return cols


def apply_filters(rows: list[dict[str, Any]], filters: Sequence[str]) -> list[dict[str, Any]]:
    """`-f KEY=VALUE` (wildcards allowed), `-f KEY!=VALUE`, `-f KEY~TEXT` (contains); ANDed."""
    out = rows
    for f in filters:
        for op in ("!=", "~", "="):
            key, sep, value = f.partition(op)
            if sep:
                break
        else:
            raise InvalidArgument(f"filter {f!r} is not KEY=VALUE, KEY!=VALUE or KEY~TEXT")
        key = key.strip().upper()
        if rows and key not in rows[0]:
            raise InvalidArgument(f"filter: unknown attribute {key}")

        def match(row: dict[str, Any], key: str = key, op: str = op, value: str = value) -> bool:
            text = cell("", row.get(key)) if key not in SIZE_COLUMNS else str(row.get(key))
            if op == "~":
                return value.lower() in text.lower()
            hit = fnmatch.fnmatchcase(text, value)
            return hit if op == "=" else not hit

        out = [r for r in out if match(r)]
    return out
