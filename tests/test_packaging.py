"""pyproject's dependency floors admit no release that lacks what the code uses."""

from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

# (group, distribution, first release with what we use, what) -- from each project's changelog
NEEDED = [
    ("run", "trio", "0.23", "to_thread.run_sync(abandon_on_cancel=), trio.TaskStatus"),
    ("run", "pyfuse3", "3.2.2", "terminate(), trio_token; builds on Python 3.11"),
    ("run", "SQLAlchemy", "2.0", "the postgresql+psycopg dialect"),
    ("run", "psycopg", "3.2", "Connection.notifies(timeout=)"),
    ("run", "h11", "0.16", "strict chunked-body parsing (CVE-2025-43859)"),
    ("run", "httpx", "0.25.1", "httpcore 1.x, so h11 0.16"),
    ("run", "prometheus-client", "0.16", "Debian 12's python3-prometheus-client, the oldest tested"),
    ("test", "trio", "0.29", "trio.lowlevel.in_trio_run"),
    ("test", "schemathesis", "4.0", "run --phases coverage, the unsupported_method check"),
]


def floors(*groups: str) -> dict[str, list[Version]]:
    """The `>=` floors per distribution: 'run' is [project] dependencies, others are extras."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    found: dict[str, list[Version]] = {}
    for group in groups:
        lines = project["dependencies"] if group == "run" else project["optional-dependencies"][group]
        for line in lines:
            req = Requirement(line)
            found.setdefault(req.name.lower(), []).extend(
                Version(s.version) for s in req.specifier if s.operator == ">=")
    return found


@pytest.mark.parametrize(("group", "dist", "needed", "what"), NEEDED)
def test_the_floor_admits_no_release_without_what_we_use(group: str, dist: str, needed: str,
                                                        what: str) -> None:
    declared = floors(group).get(dist.lower(), [])
    assert declared and max(declared) >= Version(needed), f"{dist}>={needed} is needed for {what}"


def test_the_installed_versions_meet_the_floors() -> None:
    for dist, declared in floors("run", "test").items():
        assert Version(version(dist)) >= max(declared), dist
