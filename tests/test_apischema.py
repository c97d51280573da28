"""The API's schema checker: JSON Schema's meaning for the subset the route table uses, the
depth bound on JSON bodies, and messages that name the field."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tm2fs.api import ROUTES, SIZE, checked
from tm2fs.apischema import MAX_DEPTH, check, parse_json, too_deep
from tm2fs.errors import InvalidArgument
from tm2fs.httpserver import Peer, Request


def refused(value: Any, schema: dict[str, Any], where: str = "f") -> str:
    with pytest.raises(InvalidArgument) as e:
        check(value, schema, where)
    return e.value.message


def test_types_as_json_schema_means_them() -> None:
    assert "must be an integer, not a boolean" in refused(True, {"type": "integer"})
    assert "not a number" in refused(1.5, {"type": "integer"})
    check(3, {"type": "number"}, "f")  # an integer is a number
    check(None, {"type": ["string", "null"]}, "f")
    assert "must be a string or null, not an array" in refused([], {"type": ["string", "null"]})
    assert "must be an object, not a string" in refused("x", {"type": "object"})


def test_bounds_apply_to_their_own_type_only() -> None:
    check("x" * 32, SIZE, "size")
    check(2**63 - 1, SIZE, "size")
    assert "longer than 32" in refused("9" * 33, SIZE, "size")
    assert "at most" in refused(2**63, SIZE, "size")
    assert "at least 0" in refused(-1, SIZE, "size")


def test_objects_name_the_nested_field() -> None:
    schema = {"type": "object", "required": ["A"], "additionalProperties": False,
              "properties": {"A": {"type": "object", "additionalProperties": {"type": "string"}},
                             "T": {"type": "array", "items": {"type": "string"}, "maxItems": 2}}}
    check({"A": {"x": "y"}, "T": ["a", "b"]}, schema, "")
    assert refused({}, schema, "") == "'A' is missing from the request"
    assert refused({"A": {"PATH": 1}}, schema, "").startswith("A.PATH must be a string")
    assert refused({"A": {}, "T": ["a", 2]}, schema, "").startswith("T[1] must be a string")
    assert "more than 2 items" in refused({"A": {}, "T": ["a"] * 3}, schema, "")
    assert refused({"A": {}, "B": 1}, schema, "") == "B is not a field of this request"


@pytest.mark.parametrize(("text", "deep"), [
    ("[" * MAX_DEPTH + "]" * MAX_DEPTH, False),
    ("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), True),
    ('{"a": "' + "[" * 100 + '"}', False),  # brackets in strings do not count
    ('{"a": "\\"[[[[", "b": ' + "[" * 33 + "]" * 33 + "}", True),  # nor do escaped quotes end one
    ('{"a": "\\\\", "b": [[1]]}', False),
    ("[" * 100_000, False),  # unbalanced: not too deep, not JSON either (json.loads says so)
])
def test_depth_is_counted_outside_strings(text: str, deep: bool) -> None:
    assert too_deep(text) == deep


def test_parse_json_refuses_what_is_not_plain_json() -> None:
    for body in [b"[" * 100_000 + b"]" * 100_000, b'{"a": NaN}', b"[Infinity]", b"\xff",
                 b'{"a": 1', b"1" * 5000]:
        with pytest.raises(InvalidArgument):
            parse_json(body)
    assert parse_json(b"") == {}
    assert parse_json(json.dumps({"a": [1, {"b": None}]}).encode()) == {"a": [1, {"b": None}]}


SCALAR = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=4)
JSON = SCALAR | st.lists(SCALAR, max_size=2) | st.dictionaries(st.text(max_size=3), SCALAR, max_size=2)


@settings(deadline=None)  # a property, not a timing: the machine may be busy
@given(route=st.sampled_from([r for r in ROUTES if r.body_schema is not None]),
       body=st.dictionaries(st.sampled_from(["address", "size", "src", "dst", "path", "host",
                                             "policy", "NAME", "TM", "TM_RAW", "TAGS", "COST",
                                             "X_1", "bad key"]), JSON, max_size=6))
async def test_any_json_body_is_checked_or_refused_never_a_crash(route: Any, body: Any) -> None:
    """Whatever JSON arrives, `checked` answers a value or an InvalidArgument: no other error."""
    async def data() -> Any:
        yield json.dumps(body).encode()

    req = Request(route.method, route.pattern, {}, {}, Peer(1, 0, 0, frozenset()), data())
    try:
        got = await checked(route, req)
    except InvalidArgument:
        return
    assert set(got.data) <= set(route.body) | ({k.upper() for k in body} if route.attributes
                                                 else set())
