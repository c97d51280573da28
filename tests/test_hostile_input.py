"""Issue #13, hostile input: malformed API bodies, broken HTTP, control characters in names,
templates. Every one is refused with a 4xx naming what is wrong, through the real daemon, and
changes nothing; the daemon logs no internal error."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.daemon import Daemon
from tm2fs.template import parse_template

pytestmark = pytest.mark.mount


@pytest.fixture
def api(daemon: Daemon) -> Iterator[httpx.Client]:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(daemon.sock)),
                      base_url="http://tm2fs", timeout=30) as client:
        yield client


def refused(response: httpx.Response, *words: str) -> dict[str, Any]:
    """A 4xx JSON error whose message names `words`."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    body = response.json()
    assert body["error"] == "invalid_argument", body
    for word in words:
        assert word in body["message"], (word, body)
    return body


def post(api: httpx.Client, path: str, body: Any) -> httpx.Response:
    return api.post(path, content=body if isinstance(body, bytes) else json.dumps(body),
                    headers={"content-type": "application/json"})


def raw_http(daemon: Daemon, request: bytes) -> tuple[int, dict[str, Any]]:
    """Exact bytes to the control socket (the client then shuts its side); status and body."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(daemon.sock))
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def unchanged(daemon: Daemon, before: list[str]) -> None:
    assert sorted(os.listdir(daemon.mnt / "local")) == before
    assert set(daemon.backends()) == {"local"}
    logs = daemon.logs()
    assert "internal error" not in logs and "Traceback" not in logs, logs


BAD_BODIES = [  # (route, body, the field the message names)
    ("/v1/images/allocate", {"address": 5, "size": "1M"}, "address must be a string"),
    ("/v1/images/allocate", {"address": {"a": 1}, "size": "1M"}, "address must be a string"),
    ("/v1/images/allocate", {"address": ["local:x"], "size": "1M"}, "address must be a string"),
    ("/v1/images/delete", {"address": 5}, "address"),
    ("/v1/images/clone", {"src": {}, "dst": "local:y"}, "src"),
    ("/v1/images/allocate", {"address": "local:big", "size": "9" * 5000}, "size"),
    ("/v1/images/allocate", {"address": "local:big", "size": "9" * 400 + ".5"}, "size"),
    ("/v1/images/allocate", {"address": "local:big", "size": -1}, "size"),
    ("/v1/images/resize", {"address": "local:x", "size": [1]}, "size"),
    ("/v1/images/allocate", {"address": "auto:p", "size": "1M", "policy": 5}, "policy"),
    ("/v1/placement", {"size": "1M", "policy": 5}, "policy"),
    ("/v1/placement", {"size": "1M", "requirements": [1]}, "requirements"),
    ("/v1/placement", {"size": "1M", "rank": {"x": 1}}, "rank"),
    ("/v1/images/attach", {"address": "local:x", "path": "/p", "host": {}}, "host"),
    ("/v1/images/detach", {"address": "local:x", "path": 7}, "path"),
    ("/v1/images/break-lease", {"address": "local:x", "force": {}}, "force"),
    ("/v1/images/allocate", {"address": "local:x", "size": "1M", "sise": 1}, "sise"),
    ("/v1/images/allocate", {"size": "1M"}, "'address' is missing"),
    ("/v1/images/allocate", [1, 2], "JSON object"),
    ("/v1/backends", {"NAME": "b", "TM": "dir", "TM_RAW": {"PATH": {"x": "/"}}}, "TM_RAW.PATH"),
    ("/v1/backends", {"NAME": "b", "TM": "dir", "TAGS": [1]}, "TAGS[0]"),
    ("/v1/backends", {"NAME": "b", "TM": "dir", "COST": "9" * 5000}, "COST"),
    ("/v1/backends", {"NAME": "b", "TM": "dir", "USER": "9" * 30}, "USER"),
    ("/v1/backends", {"NAME": 5, "TM": "dir"}, "NAME"),
    ("/v1/backends", {"NAME": "b", "TM": "memory", "X": [1]}, "X"),
    ("/v1/backends", {"NAME": "b", "TM": "memory", "name": "c"}, "twice"),
    ("/v1/images/allocate", b'{"address": "local:nan", "size": NaN}', "NaN"),
    ("/v1/backends", b'{"NAME": "b", "TM": "memory", "COST": Infinity}', "Infinity"),
    ("/v1/images/allocate", b'{"address": "local:x", "size": ' + b"9" * 5000 + b"}", "not JSON"),
    ("/v1/images/allocate", b"[" * 100_000 + b"]" * 100_000, "deeper than 32"),
    ("/v1/images/allocate", b'{"a":' * 33 + b"1" + b"}" * 33, "deeper than 32"),
    ("/v1/images/allocate", b"\xff\xfe{}", "not JSON"),
]


def test_malformed_bodies_are_refused_naming_the_field(daemon: Daemon, api: httpx.Client) -> None:
    """Each body answered HTTP 500 "internal error" before (a number or object for an address,
    a 5,000-digit size, deep nesting, `policy: 5`, `requirements: [1]`, `host: {}`, ...)."""
    assert post(api, "/v1/images/allocate", {"address": "local:x", "size": "1M"}).status_code == 201
    before = sorted(os.listdir(daemon.mnt / "local"))
    wrong = []
    for path, body, words in BAD_BODIES:
        response = post(api, path, body)
        try:
            refused(response, words)
        except AssertionError:
            wrong.append(f"{path} {str(body)[:60]}: {response.status_code} {response.text[:100]}")
    assert not wrong, "\n".join(wrong)
    unchanged(daemon, before)


def test_brackets_in_strings_and_32_levels_are_within_the_bound(api: httpx.Client) -> None:
    """The depth bound counts brackets outside strings; 32 levels still parse (then the schema
    has its say)."""
    name = "[" * 100 + "{" * 100
    made = post(api, "/v1/images/allocate", {"address": f"local:{name}", "size": "1M"})
    assert made.status_code == 201, made.text
    nested: Any = "x"
    for _ in range(31):
        nested = {"a": nested}
    refused(post(api, "/v1/images/allocate", {"address": "local:x", "size": "1M", "z": nested}),
            "z is not a field")


def test_a_5000_digit_size_is_one_clear_error_in_the_cli(daemon: Daemon) -> None:
    """Before: parse_size's int() overflowed (ValueError, a traceback in the CLI, a 500 in the
    API); a 400-digit decimal overflowed float()."""
    for size in ["9" * 5000, "9" * 400 + ".5"]:
        made = daemon.tm2("allocate", "local:huge", size)
        assert made.returncode != 0 and b"Traceback" not in made.stderr, made.stderr
        assert b"not understood" in made.stderr, made.stderr
    assert os.listdir(daemon.mnt / "local") == []


def test_query_parameters_are_checked_too(api: httpx.Client) -> None:
    refused(api.get("/v1/images/size", params={"address": "local:x", "adress": "y"}),
            "adress is not a field")
    refused(api.get("/v1/images/size"), "'address' is missing")
    refused(api.put("/v1/images/data", params={"address": "local:q", "mode": "append"},
                    content=b"x"), "mode must be one of")
    refused(api.put("/v1/images/data", params={"address": "local:q", "size": "9" * 5000},
                    content=b"x"), "size is longer than 32")


def test_a_body_shorter_than_its_content_length_answers_400(daemon: Daemon) -> None:
    """Before: the handler's read raised h11's protocol error, answered as a 500."""
    before = sorted(os.listdir(daemon.mnt / "local"))
    body = b'{"address": "local:short", "size": "1M"}'
    status, answer = raw_http(daemon, b"POST /v1/images/allocate HTTP/1.1\r\nhost: x\r\n"
                              b"content-type: application/json\r\ncontent-length: 500\r\n\r\n" + body)
    assert (status, answer["error"]) == (400, "invalid_argument"), answer
    assert "bad HTTP request" in answer["message"]
    status, answer = raw_http(daemon, b"PUT /v1/images/data?address=local:short&mode=push HTTP/1.1\r\n"
                              b"host: x\r\ncontent-length: 100000\r\n\r\n" + b"x" * 1000)
    assert status == 400, answer
    unchanged(daemon, before)


def test_a_bad_chunk_header_answers_400(daemon: Daemon) -> None:
    before = sorted(os.listdir(daemon.mnt / "local"))
    for target, body in [(b"POST /v1/images/allocate", b"zz\r\n{}\r\n0\r\n\r\n"),
                         (b"PUT /v1/images/data?address=local:chunky&mode=push",
                          b"4\r\nabcd\r\nnot-hex\r\nefgh\r\n0\r\n\r\n")]:
        status, answer = raw_http(daemon, target + b" HTTP/1.1\r\nhost: x\r\n"
                                  b"transfer-encoding: chunked\r\n\r\n" + body)
        assert (status, answer["error"]) == (400, "invalid_argument"), answer
    unchanged(daemon, before)


# ---------------------------------------------------------------------- names


@pytest.mark.parametrize("char", ["\n", "\r", "\t", "\x1b", "\x7f", "\x85"])
def test_control_characters_in_names_are_refused(daemon: Daemon, tmp_path: Path, char: str) -> None:
    """Before: `tm2 allocate 'local:a<newline>b'` made an image whose name broke every table."""
    name = f"bad{char}name"
    made = daemon.tm2("allocate", f"local:{name}", "1M")
    assert made.returncode != 0 and b"control character" in made.stderr, made.stderr
    made = daemon.backend_cli("create", "--name", name, "--tm", "dir", "--tm-raw",
                              f"PATH={tmp_path}/b")
    assert made.returncode != 0 and b"control character" in made.stderr, made.stderr
    with pytest.raises(OSError) as e:  # the mount too: EINVAL
        (daemon.mnt / "local" / name).write_bytes(b"x")
    assert e.value.errno == 22
    with pytest.raises(OSError):
        (daemon.mnt / "local" / name).mkdir()
    assert os.listdir(daemon.mnt / "local") == []
    assert set(daemon.backends()) == {"local"}


# ---------------------------------------------------------------------- templates


def test_compact_template_vectors_parse() -> None:
    """Before: "'=' expected after TM_RAW" (shlex read `=[` as one token)."""
    assert parse_template('TM_RAW=[PATH="/x"]') == {"TM_RAW": {"PATH": "/x"}}
    assert parse_template('NAME=a,TM_RAW=[PATH="/x",N=2],TAGS="S,T"') == {
        "NAME": "a", "TM_RAW": {"PATH": "/x", "N": "2"}, "TAGS": "S,T"}
    assert parse_template('A = "=[],#" # a comment\nB = x') == {"A": "=[],#", "B": "x"}
    assert parse_template('TM_RAW = [ PATH = "/srv/a b", POOL = one ]') == {
        "TM_RAW": {"PATH": "/srv/a b", "POOL": "one"}}


@pytest.mark.parametrize("text", ["TM_RAW = [ PATH =", "TM_RAW = [ PATH = /x, B =", "TM_RAW=[",
                                  'TM_RAW = [ PATH = "/x"', "A = [ B = [ C = d ] ]", 'A = "open'])
def test_a_missing_bracket_or_quote_is_refused(text: str) -> None:
    """Before: `TM_RAW = [ PATH =` was accepted, the vector never closed."""
    from tm2fs.errors import InvalidArgument

    with pytest.raises(InvalidArgument):
        parse_template(text)


def test_a_compact_template_file_creates_its_backend(daemon: Daemon, tmp_path: Path) -> None:
    (tmp_path / "b1").mkdir()
    tpl = tmp_path / "b1.tpl"
    tpl.write_text(f'NAME=b1,TM=dir,TM_RAW=[PATH="{tmp_path}/b1"]\n')
    made = daemon.backend_cli("create", str(tpl))
    assert made.returncode == 0, made.stderr.decode()
    assert daemon.backends()["b1"]["TM_RAW"]["PATH"] == f"{tmp_path}/b1"
    tpl.write_text(f'NAME=b2\nTM=dir\nTM_RAW=[ PATH = "{tmp_path}/b2"\n')
    made = daemon.backend_cli("create", str(tpl))
    assert made.returncode != 0 and b"']' missing" in made.stderr, made.stderr
    assert "b2" not in daemon.backends()
