"""The mount table: mount points whose names the kernel escapes (space, tab, newline, backslash)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import daemon as test_daemon
from tm2fs import daemon, mounts
from tm2fs.drivers import dir as dir_driver

AWKWARD = "a b\tc\\d\ne"  # every character /proc/mounts escapes


def test_unescape_every_octal_escape_the_kernel_writes() -> None:
    assert mounts.unescape(rb"/m/a\040b\011c\134d\012e") == b"/m/a b\tc\\d\ne"
    assert mounts.unescape(rb"/m/a\134040b") == b"/m/a\\040b"  # an escaped backslash, then "040"
    assert mounts.unescape(b"/plain") == b"/plain"


@pytest.fixture
def awkward_mount(tmp_path: Path) -> Iterator[Path]:
    """A real tmpfs mounted on a directory named with a space, a tab, a backslash and a newline."""
    point = tmp_path / AWKWARD
    point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tm2fs-test", str(point)], check=True)
    try:
        yield point
    finally:
        subprocess.run(["umount", str(point)], check=True)


def test_a_mount_point_with_escaped_characters_is_found(awkward_mount: Path) -> None:
    with open(mounts.MOUNTS, "rb") as f:  # the kernel really escapes it
        assert rb"a\040b\011c\134d\012e" in f.read()
    for is_mounted in (mounts.is_mounted, daemon.is_mounted, test_daemon.is_mounted):
        assert is_mounted(awkward_mount)
        assert not is_mounted(awkward_mount.parent)
    (awkward_mount / "f").write_bytes(b"x")
    assert mounts.filesystem_type(awkward_mount / "f") == "tmpfs"
    assert dir_driver.filesystem_type(awkward_mount) == "tmpfs"
    assert mounts.filesystem_type(awkward_mount.parent) != "tmpfs"
    [entry] = [m for m in mounts.mounts() if m.point == bytes(awkward_mount)]
    assert (entry.source, entry.fstype) == (b"tm2fs-test", "tmpfs")
