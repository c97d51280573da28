"""libvirt on this machine (`qemu:///system`), started by the tests themselves when it is not running.

There is no systemd here to socket-activate it, so `Libvirt` starts `virtlogd` (qemu's console
log goes through it) and `libvirtd` as foreground children, and stops them at the end; a libvirt
that already answers is used as it is and left running. Our libvirtd runs in a mount namespace of
its own (mounts of the host still propagate in: the tm2fs mount) where the test's qemu.conf is
bound over /etc/libvirt/qemu.conf, so the system's file is untouched: qemu runs as root. Why: on
machines where /dev/kvm is root-only, libvirt's cache of qemu's capabilities (probed as
libvirt-qemu) is found stale on every call and re-probed, about 45 s per `virsh start`.

Domains are TCG (`type='qemu'`: no KVM needed), run qemu as root with no relabelling (a
per-domain DAC label, so nothing on the host is chowned and root-only test directories are
reachable), and need no OS: SeaBIOS reads the boot
sector of the disk, which proves qemu opened it, and the monitor's `qemu-io` writes through the
guest's own disk device. `domain()` always destroys and undefines what it defined.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

URI = "qemu:///system"
START_TIMEOUT = 60.0
DAEMONS = ("virtlogd", "libvirtd")
QEMU_CONF = 'user = "root"\ngroup = "root"\ndynamic_ownership = 0\nnamespaces = [ ]\n'


class Libvirt:
    """`with Libvirt() as lv:` gives a libvirt that answers at `qemu:///system`."""

    def __init__(self) -> None:
        missing = [b for b in (*DAEMONS, "virsh", "qemu-system-x86_64") if not shutil.which(b)]
        if missing:
            raise RuntimeError(f"libvirt/qemu binaries are missing ({', '.join(missing)}): "
                               "run scripts/setup.sh")
        self.dir = Path(tempfile.mkdtemp(prefix="tm2fs-libvirt-", dir="/tmp"))
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def virsh(self, *args: str, check: bool = True, timeout: float = 60.0) -> str:
        done = subprocess.run(["virsh", "-c", URI, *args], capture_output=True, timeout=timeout,
                              check=False)
        if check and done.returncode != 0:
            raise RuntimeError(f"virsh {' '.join(args)} failed: {done.stderr.decode().strip()}; "
                               f"logs in {self.dir}")
        return done.stdout.decode()

    def _answers(self) -> bool:
        try:
            return subprocess.run(["virsh", "-c", URI, "version"], capture_output=True,
                                  timeout=10, check=False).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def __enter__(self) -> Libvirt:
        if self._answers():
            return self
        try:
            for daemon in DAEMONS:
                if daemon == "virtlogd" and Path("/run/libvirt/virtlogd-sock").exists():
                    continue  # one is running already
                cmd = [daemon]
                if daemon == "libvirtd":
                    conf = self.dir / "qemu.conf"
                    conf.write_text(QEMU_CONF)
                    cmd = ["unshare", "--mount", "--propagation", "slave", "--", "sh", "-c",
                           'mount --bind "$1" /etc/libvirt/qemu.conf && exec libvirtd', "sh",
                           str(conf)]
                with open(self.dir / f"{daemon}.log", "ab") as out:
                    self.procs[daemon] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                                          stdout=out, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + START_TIMEOUT
            while not self._answers():
                for name, p in self.procs.items():
                    if p.poll() is not None:
                        raise RuntimeError(f"{name} exited with {p.returncode}; logs in {self.dir}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"libvirt did not answer in {START_TIMEOUT:g}s; logs in {self.dir}")
                time.sleep(0.2)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for name in reversed(list(self.procs)):  # libvirtd first, then virtlogd
            p = self.procs.pop(name)
            p.terminate()
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    @contextlib.contextmanager
    def domain(self, name: str, disk: str) -> Iterator[str]:
        """A running TCG guest whose one disk is the `<disk>` element `disk`."""
        path = self.dir / f"{name}.xml"
        path.write_text(domain_xml(name, disk))
        self.virsh("define", str(path))
        try:
            self.virsh("start", name)
            yield name
        finally:
            self.virsh("destroy", name, check=False)
            self.virsh("undefine", name, check=False)

    def blkstat(self, name: str, dev: str) -> dict[str, int]:
        out = self.virsh("domblkstat", name, dev)
        return {k: int(v) for _, k, v in (line.split() for line in out.splitlines() if line.strip())}

    def guest_write(self, name: str, offset: int, length: int, pattern: int,
                    device: str = "virtio-disk0") -> None:
        """Write through the guest's disk device (qemu's block layer, as the guest would), then
        flush it, from qemu's monitor."""
        backend = f"/machine/peripheral/{device}/virtio-backend"
        for cmd in (f"write -P {pattern:#x} {offset} {length}", "flush"):
            out = self.virsh("qemu-monitor-command", "--hmp", name, f'qemu-io -d {backend} "{cmd}"')
            if "error" in out.lower() or "failed" in out.lower():
                raise RuntimeError(f"qemu-io {cmd}: {out.strip()}")


def domain_xml(name: str, disk: str) -> str:
    dom = ET.Element("domain", type="qemu")
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "memory", unit="MiB").text = "64"
    ET.SubElement(dom, "vcpu").text = "1"
    os_ = ET.SubElement(dom, "os")
    ET.SubElement(os_, "type", arch="x86_64", machine="pc").text = "hvm"
    ET.SubElement(os_, "boot", dev="hd")
    label = ET.SubElement(dom, "seclabel", type="static", model="dac", relabel="no")
    ET.SubElement(label, "label").text = "+0:+0"
    devices = ET.SubElement(dom, "devices")
    ET.SubElement(devices, "emulator").text = shutil.which("qemu-system-x86_64")
    devices.append(ET.fromstring(disk))
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(dom, encoding="unicode")
