"""The control API's input types: JSON Schema objects, checked here and published as OpenAPI.

One description serves both: the route table declares each field with a schema from this small
subset of JSON Schema (type, enum, lengths, bounds, items, properties, required,
additionalProperties, propertyNames), `check` refuses whatever does not fit it with a message
naming the field, and `/openapi.json` prints the same objects. So the handlers and the service
only ever see values of the declared types, and the document cannot promise what is not checked.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .errors import InvalidArgument

Schema = dict[str, Any]  # a JSON Schema, as OpenAPI 3.1 takes it

MAX_DEPTH = 32  # JSON nesting a body may have; the deepest declared field is 3 levels down
MAX_BODY = 2**20  # JSON bodies are a few fields; image bytes stream on their own route

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
    "null": (type(None),), "object": (dict,), "array": (list,),
}
_STRINGS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')  # JSON strings, which may hold brackets
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")
_PAIRS = re.compile(r"\[\]|\{\}")


def type_of(value: Any) -> str:
    """The JSON type name of a parsed value (bool is no integer, an int is a number too)."""
    if isinstance(value, bool):
        return "boolean"
    for name, types in _JSON_TYPES.items():
        if isinstance(value, types):
            return name
    return type(value).__name__


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def too_deep(text: str, limit: int = MAX_DEPTH) -> bool:
    """Whether brackets nest deeper than `limit`, found without recursion: strings removed, each
    pass drops the innermost pairs (a regular expression: C speed, `limit` passes at most)."""
    rest = _NOT_BRACKETS.sub("", _STRINGS.sub("", text))
    for _ in range(limit):
        rest, n = _PAIRS.subn("", rest)
        if n == 0:
            return False
    return _PAIRS.search(rest) is not None


def parse_json(data: bytes) -> Any:
    """A request body as JSON: UTF-8, nested at most MAX_DEPTH deep, no NaN or Infinity
    (which no JSON client means and which no number check can compare)."""
    if len(data) > MAX_BODY:
        raise InvalidArgument(f"request body is larger than {MAX_BODY} bytes")
    if not data:
        return {}
    try:
        text = data.decode("utf-8")
        if too_deep(text):
            raise InvalidArgument(f"request body nests deeper than {MAX_DEPTH} levels")
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError too
        raise InvalidArgument(f"request body is not JSON: {e}") from None


def check(value: Any, schema: Schema, where: str) -> None:
    """Refuse `value` (InvalidArgument naming `where`: a field like `TM_RAW.PATH`, or "" for
    the whole body) unless it fits `schema`."""
    allowed = schema.get("type")
    if allowed is not None:
        names = [allowed] if isinstance(allowed, str) else list(allowed)
        actual = type_of(value)
        if actual not in names and not (actual == "integer" and "number" in names):
            raise InvalidArgument(f"{where or 'the request body'} must be {_one_of(names)}, not {_a(actual)}")
    if "enum" in schema and value not in schema["enum"]:
        raise InvalidArgument(f"{where} must be one of {', '.join(map(repr, schema['enum']))}, "
                              f"not {value!r:.80}")
    if isinstance(value, str):
        _check_string(value, schema, where)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            raise InvalidArgument(f"{where} must be at least {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise InvalidArgument(f"{where} must be at most {schema['maximum']}")
    elif isinstance(value, list):
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            raise InvalidArgument(f"{where} has more than {schema['maxItems']} items")
        for i, item in enumerate(value):
            check(item, schema.get("items", {}), f"{where}[{i}]")
    elif isinstance(value, dict):
        check_object(value, schema, where)


def check_object(value: dict[str, Any], schema: Schema, where: str) -> None:
    """An object's fields: required ones present, each declared one of its type, the others
    allowed by additionalProperties (a schema, or true/false; absent means any)."""
    if "maxProperties" in schema and len(value) > schema["maxProperties"]:
        raise InvalidArgument(f"{where} has more than {schema['maxProperties']} fields")
    for name in schema.get("required", ()):
        if name not in value:
            raise InvalidArgument(f"{_field(where, name)!r} is missing from the request")
    properties = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    names = schema.get("propertyNames")
    for name, item in value.items():
        if names is not None:
            check(name, names, f"the name of {_field(where, name)}")
        if name in properties:
            check(item, properties[name], _field(where, name))
        elif extra is False:
            raise InvalidArgument(f"{_field(where, name)} is not a field of this request",
                                  f"fields: {', '.join(properties) or 'none'}")
        elif isinstance(extra, dict):
            check(item, extra, _field(where, name))


def _check_string(value: str, schema: Schema, where: str) -> None:
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        raise InvalidArgument(f"{where} is longer than {schema['maxLength']} characters")
    if "minLength" in schema and len(value) < schema["minLength"]:
        raise InvalidArgument(f"{where} is shorter than {schema['minLength']} characters")
    if "pattern" in schema and re.search(schema["pattern"], value) is None:
        raise InvalidArgument(f"{where} {value!r:.80} does not match {schema['pattern']}")


def _field(where: str, name: str) -> str:
    return f"{name:.80}" if where == "" else f"{where}.{name:.80}"


def _a(name: str) -> str:
    return {"integer": "an integer", "object": "an object", "array": "an array",
            "null": "null"}.get(name, f"a {name}")


def _one_of(names: list[str]) -> str:
    words = [_a(n) for n in names]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]
