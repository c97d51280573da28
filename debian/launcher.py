"""Start one of tm2fs's programs with the Python libraries it needs.

The package depends on Debian's libraries. Where the release's own are older than tm2fs needs
(Debian 12: trio 0.22, SQLAlchemy 1.4, psycopg 3.1, httpx 0.23), the program runs with the
pure-Python copies in /usr/lib/tm2fs/vendor (debian/vendor-requirements.txt) first on its path.
Only tm2fs's own programs see them; the rest of the system keeps Debian's.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
VENDOR = os.path.join(HERE, "vendor")
# the floors of pyproject.toml that a Debian release may miss
NEEDED = {"trio": (0, 23), "SQLAlchemy": (2, 0), "psycopg": (3, 2), "httpx": (0, 25, 1)}


def version(dist: str) -> tuple[int, ...]:
    """The installed version of `dist` as numbers; () if it is not installed."""
    try:
        text = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ()
    return tuple(int(n) for n in re.findall(r"\d+", re.split(r"[^0-9.]", text, maxsplit=1)[0]))


def too_old() -> list[str]:
    return [dist for dist, floor in NEEDED.items() if version(dist) < floor]


def run(module: str) -> None:
    """Run `module`'s main(), with vendor/ first on the path if a system library is too old."""
    if HERE in sys.path:
        sys.path.remove(HERE)
    if too_old() and os.path.isdir(VENDOR):
        sys.path.insert(0, VENDOR)
    sys.exit(importlib.import_module(module).main())


if __name__ == "__main__":  # `python3 launcher.py`: what this system runs with
    old = too_old()
    print("vendor" if old else "system", *old)
