"""Connection shares of the control socket: one uid cannot take the others' share, nor theirs
root's; caps sized from the open-file limit."""

from __future__ import annotations

import argparse

import pytest

from tm2fs.httplimits import Gate, Limits, add_arguments, from_arguments


def test_caps_are_a_share_of_the_open_file_limit() -> None:
    assert Limits().sized(1024) == Limits(max_connections=64, max_per_uid=16)
    assert Limits().sized(65536) == Limits(max_connections=1024, max_per_uid=256)
    assert Limits(max_per_uid=3).sized(1024).max_per_uid == 3


@pytest.mark.logs_ok
def test_one_uid_cannot_take_the_others_share_nor_roots() -> None:
    gate = Gate(Limits(max_connections=5, max_per_uid=2))
    assert [gate.enter(1000) for _ in range(2)] == [None, None]
    assert "uid 1000 holds 2 connections" in (gate.enter(1000) or "")
    assert [gate.enter(1001) for _ in range(2)] == [None, None]
    assert gate.enter(1002) is None
    assert "serves 5 connections of unprivileged users" in (gate.enter(1003) or "")
    assert [gate.enter(0) for _ in range(5)] == [None] * 5  # root's own share
    assert "root holds 5" in (gate.enter(0) or "")
    gate.leave(1000)
    assert gate.enter(1003) is None  # a freed slot is anyone's
    assert gate.enter(1000) is not None


def test_options_default_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TM2FS_API_HEADER_TIMEOUT", "2.5")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    limits = from_arguments(parser.parse_args(["--api-max-per-uid", "7"]))
    assert (limits.header_timeout, limits.max_per_uid, limits.idle_timeout) == (2.5, 7, 60.0)
    for bad in (["--api-body-timeout", "0"], ["--api-idle-timeout", "nan"],
                ["--api-max-connections", "-1"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
