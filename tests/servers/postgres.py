"""A throwaway PostgreSQL server on loopback, started and stopped by the tests themselves.

initdb refuses to run as root, so the cluster belongs to the `postgres` user, in a directory under
/tmp that user can reach. `fsync=off` because a test cluster's durability is not under test (the
pool store's own durability settings are). Every command is an argument list.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def _bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name))
    if not found:
        raise RuntimeError("PostgreSQL server binaries are missing: run scripts/setup.sh")
    return Path(found[-1]).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self, settings: dict[str, str] | None = None) -> None:
        """`settings`: extra server settings (`-c name=value`), e.g. for a benchmark's
        shared_preload_libraries. Constants only: pg_ctl hands them to a shell."""
        self.settings = settings or {}
        self.bindir = _bindir()
        self.port = _free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="tm2fs-pg-", dir="/tmp"))
        self.data = self.dir / "data"
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/tm2fs"

    def _as_postgres(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["runuser", "-u", "postgres", "--", *args], capture_output=True,
                              check=True, timeout=60)

    def __enter__(self) -> PostgresServer:
        os.chmod(self.dir, 0o755)
        shutil.chown(self.dir, "postgres", "postgres")
        try:
            self._as_postgres(str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust",
                              "-U", "postgres", "--no-sync", "-E", "UTF8")
            options = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                       "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
            options += "".join(f" -c {k}={v}" for k, v in self.settings.items())
            self._as_postgres(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-w", "-o",
                              options, "-l", str(self.dir / "log"), "start")
            self.new_database("tm2fs")
        except BaseException:
            self.__exit__()
            raise
        return self

    def new_database(self, name: str) -> str:
        """A fresh, empty database; returns its SQLAlchemy URL."""
        self._as_postgres(str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                          "-U", "postgres", name)
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def __exit__(self, *exc: object) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run(["runuser", "-u", "postgres", "--", str(self.bindir / "pg_ctl"), "-D",
                            str(self.data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, check=False, timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)
