"""A backend whose filesystem is remounted read-only under the daemon: reads of its images keep
working, changes are refused with EROFS (not reported as done), and it comes back when writable.

Before: images were opened O_RDWR, so reads failed too; the backend stayed READY; `tm2 delete`
removed the rows, reported success and left the data behind."""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tm2fs import errors as err
from tm2fs.core import ROOT, Service


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "ro-tmpfs"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def remount(where: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(where)], check=True)


@pytest.mark.logs_ok
async def test_a_backend_remounted_read_only_serves_reads_and_refuses_changes(
        service: Service, tmpfs: Path) -> None:
    await service.create_backend(ROOT, {"NAME": "ro", "TM": "dir", "TM_RAW": f"PATH={tmpfs}/data"})
    of = await service.open_address("ro:disk.img", ROOT, writable=True, create=True)
    await service.write(of, 0, b"stays readable")
    await service.release(of)
    remount(tmpfs, "ro")
    try:
        await service.monitor_backend(service.find_backend("ro").id)
        info = await service.backend_info("ro")
        assert info["STATE"] == "DISABLED" and "read-only" in info["ERROR"]
        of = await service.open_address("ro:disk.img", ROOT, writable=False)
        assert await service.read(of, 0, 14) == b"stays readable"
        await service.release(of)
        with pytest.raises(err.ReadOnly) as e:
            await service.delete("ro:disk.img", ROOT)
        assert e.value.errno == errno.EROFS
        with pytest.raises(err.ReadOnly):
            await service.allocate("ro:new.img", "1M", ROOT)
        assert service.get_size("ro:disk.img", ROOT) == 14  # nothing was removed
        await service.allocate("local:elsewhere.img", "1M", ROOT)  # the rest of the pool works
    finally:
        remount(tmpfs, "rw")
    await service.monitor_backend(service.find_backend("ro").id)
    assert (await service.backend_info("ro"))["STATE"] == "READY"
    await service.delete("ro:disk.img", ROOT)
    assert [p.name for p in (tmpfs / "data").iterdir() if not p.name.startswith(".")] == []

