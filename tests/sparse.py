"""A thin image through the mount stays thin: `du` shows what it holds, and `cp --sparse=always`
and `qemu-img convert` out of the mount keep its holes (issue 15). Shared by the dir, rbd and
iscsi mount tests. (Plain `cp`, --sparse=auto, keeps them only where coreutils takes st_blocks
as its cue, 9.1 on Debian 12; 9.7 on Debian 13 asks SEEK_HOLE, which the mount cannot answer.)"""

from __future__ import annotations

import subprocess
from pathlib import Path

MiB = 2**20
DATA = {0: b"hello", 100 * MiB: b"sparse world"}
WRITTEN = sum(len(d) for d in DATA.values())


def write_sparse(image: Path, size: int) -> None:
    """A new image of `size` bytes holding a few bytes, written through the mount."""
    with open(image, "wb") as f:
        f.truncate(size)
        for offset, data in DATA.items():
            f.seek(offset)
            f.write(data)


def held(path: Path) -> int:
    return path.stat().st_blocks * 512


def check_copy(path: Path, size: int) -> None:
    """The copy has the image's bytes and holds within 1 MiB of the data written."""
    assert path.stat().st_size == size
    assert held(path) <= WRITTEN + MiB, f"{path.name} holds {held(path)} bytes"
    with open(path, "rb") as f:
        for offset, data in DATA.items():
            f.seek(offset)
            assert f.read(len(data)) == data


def check_sparse(mnt_dir: Path, out: Path, size: int = 256 * MiB, slack: int = 8 * MiB) -> None:
    """`slack`: what `du` through the mount may show (a driver may count whole objects)."""
    image = mnt_dir / "sparse.img"
    write_sparse(image, size)
    assert held(image) <= slack, f"du shows {held(image)} bytes for {WRITTEN} written"
    copies = {"cp.img": ["cp", "--sparse=always"],
              "qemu.img": ["qemu-img", "convert", "-f", "raw", "-O", "raw"]}
    for name, argv in copies.items():
        subprocess.run([*argv, str(image), str(out / name)], check=True, timeout=600)
        check_copy(out / name, size)
    image.unlink()
