"""The CLIs as users run them: real subprocesses against the real daemon."""

from __future__ import annotations

import csv
import io
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.daemon import Daemon

pytestmark = pytest.mark.mount


def out(proc) -> str:
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


def test_create_from_template_and_options(daemon: Daemon, tmp_path: Path) -> None:
    tpl = tmp_path / "ssd1.tpl"
    tpl.write_text(f'NAME = ssd1\nTM = dir\nTM_RAW = [ PATH = "{tmp_path}/ssd1" ]\nTAGS = "SSD,ISCSI"\n'
                   "COST = 10\nROLE = SAN\nCAPACITY = 10G\nDISK_TYPE = FILE\n")
    assert out(daemon.backend_cli("create", str(tpl))).strip() == "ID: 2"
    assert out(daemon.backend_cli("create", "--name", "repo", "--tm", "dir", "--tm-raw",
                                  f"PATH={tmp_path}/repo", "--role", "REPOSITORY",
                                  "--cost", "1")).strip() == "ID: 3"
    b = daemon.backends()
    assert (b["ssd1"]["TAGS"], b["ssd1"]["COST"], b["ssd1"]["CAPACITY"]) == (["SSD", "ISCSI"],
                                                                            10, 10 * 2**30)
    assert b["ssd1"]["ATTRS"] == {"DISK_TYPE": "FILE"}
    assert b["repo"]["ROLE"] == "REPOSITORY"
    assert sorted(p.name for p in daemon.mnt.iterdir()) == ["local", "repo", "ssd1"]


def test_list_formats_columns_and_filters(daemon: Daemon, tmp_path: Path) -> None:
    out(daemon.backend_cli("create", "--name", "fast", "--tm", "dir", "--tm-raw",
                           f"PATH={tmp_path}/fast", "--tags", "SSD", "--cost", "10"))
    table = out(daemon.backend_cli("list")).splitlines()
    assert table[0].split() == ["ID", "NAME", "STATE", "TM", "CAPACITY", "FREE", "USED", "COST",
                                "ROLE", "CLUSTER", "TAGS", "NBIMAGE", "NBVM", "USER", "GROUP"]
    assert [line.split()[1] for line in table[2:] if line.strip()] == ["local", "fast"]
    rows = json.loads(out(daemon.backend_cli("list", "--json")))
    assert [r["NAME"] for r in rows] == ["local", "fast"]
    root = ET.fromstring(out(daemon.backend_cli("list", "-x")))
    assert root.tag == "STORAGEBACKEND_POOL"
    assert [e.findtext("NAME") for e in root.findall("STORAGEBACKEND")] == ["local", "fast"]
    assert root.find("STORAGEBACKEND/TM_RAW/PATH") is not None
    parsed = list(csv.reader(io.StringIO(out(daemon.backend_cli("list", "--csv", "-l",
                                                                  "id,name,cost")))))
    assert parsed == [["ID", "NAME", "COST"], ["1", "local", "0"], ["2", "fast", "10"]]
    only = out(daemon.backend_cli("list", "-l", "NAME", "-f", "TAGS~ssd", "--no-header"))
    assert only.split() == ["fast"]
    assert out(daemon.backend_cli("list", "-l", "NAME", "-f", "NAME=l*", "--no-header")).split() \
        == ["local"]
    bad = daemon.backend_cli("list", "-l", "NOPE")
    assert bad.returncode == 1 and b"unknown column" in bad.stderr


def test_show_update_disable_enable_delete(daemon: Daemon, tmp_path: Path) -> None:
    out(daemon.backend_cli("create", "--name", "b", "--tm", "dir", "--tm-raw",
                           f"PATH={tmp_path}/b"))
    out(daemon.tm2("allocate", "b:img", "1M"))
    shown = out(daemon.backend_cli("show", "b"))
    assert "STORAGE BACKEND 2 INFORMATION" in shown and "img" in shown
    data = json.loads(out(daemon.backend_cli("show", "b", "--json")))
    assert [i["PATH"] for i in data["IMAGES"]] == ["b/img"]
    assert ET.fromstring(out(daemon.backend_cli("show", "2", "-x"))).findtext("NAME") == "b"
    out(daemon.backend_cli("update", "b", "--cost", "7", "--tags", "HDD7K"))
    tpl = tmp_path / "u.tpl"
    tpl.write_text("NAME = renamed\nPRIORITY = 3\nRACK = r7\n")
    out(daemon.backend_cli("update", "b", str(tpl)))
    b = daemon.backends()["renamed"]
    assert (b["COST"], b["TAGS"], b["PRIORITY"], b["ATTRS"]) == (7, ["HDD7K"], 3, {"RACK": "r7"})
    assert (daemon.mnt / "renamed" / "img").exists()
    out(daemon.backend_cli("disable", "renamed"))
    assert daemon.backends()["renamed"]["STATE"] == "DISABLED"
    refused = daemon.tm2("allocate", "renamed:new", "1M")
    assert refused.returncode == 1 and b"DISABLED" in refused.stderr
    out(daemon.backend_cli("enable", "renamed"))
    assert daemon.backends()["renamed"]["STATE"] == "READY"
    refused = daemon.backend_cli("delete", "renamed")
    assert refused.returncode == 1
    assert refused.stderr.decode().startswith("onestoragebackend: ERROR: backend renamed holds")
    assert "--force" in refused.stderr.decode()
    out(daemon.backend_cli("delete", "renamed", "--force"))
    assert list(daemon.backends()) == ["local"]


def test_top_refreshes(daemon: Daemon) -> None:
    shown = out(daemon.backend_cli("top", "-d", "0.1", "--iterations", "2"))
    assert "local" in shown and "READY" in shown


def test_help_teaches(daemon: Daemon) -> None:
    assert "Examples:" in out(daemon.tm2("--help"))
    assert "NAME   = ssd1" in out(daemon.backend_cli("create", "--help"))
    for action in ("get", "push", "clone", "delete", "get-size", "allocate", "resize", "read",
                   "write", "attach", "detach"):
        assert out(daemon.tm2(action, "--help")).startswith("Usage:")


def test_unreachable_daemon_says_what_to_do(daemon: Daemon, tmp_path: Path) -> None:
    proc = daemon.tm2("--socket", str(tmp_path / "nope.sock"), "get-size", "local:x")
    err = proc.stderr.decode()
    assert proc.returncode == 1
    assert "cannot reach the tm2fs daemon" in err and "TM2FS_SOCKET" in err


def test_tm2_exit_codes_and_outputs(daemon: Daemon, tmp_path: Path) -> None:
    assert daemon.tm2("allocate", "local:a", "2M").stdout == b""
    assert out(daemon.tm2("get-size", "local:a")) == f"{2 * 2**20}\n"
    shrink = daemon.tm2("resize", "local:a", "1M")
    assert shrink.returncode == 1 and b"--shrink" in shrink.stderr
    out(daemon.tm2("resize", "local:a", "1M", "--shrink"))
    out(daemon.tm2("clone", "local:a", "b"))  # bare DST: same backend
    assert (daemon.mnt / "local" / "b").stat().st_size == 2**20
    got = tmp_path / "sparse"
    out(daemon.tm2("get", "local:b", str(got)))
    assert got.stat().st_size == 2**20 and got.stat().st_blocks == 0  # holes stay holes
    assert daemon.tm2("delete", "local:nope").returncode == 1
