"""TM_RAW of an iscsi backend, checked: names, paths and numbers that are safe to pass as one
argument to tgtadm, ssh or coreutils, and the names of targets and backing files made from them."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Any

from ...errors import InvalidArgument

BLOCK = 512
LUN = 1  # every image is LUN 1 of its own target (LUN 0 is tgtd's controller)
DEFAULT_PREFIX = "iqn.2026-11.org.tm2fs"
DEFAULT_TIMEOUT = 10.0
KNOWN = {"PORTAL", "IQN_PREFIX", "TARGET_MANAGER", "TGT_CONTROL", "STORE", "SSH", "TIMEOUT", "INITIATORS"}
HINT = ("TM_RAW for iscsi: PORTAL=host:port, STORE=/dir/on/target/host, and optionally IQN_PREFIX, "
        "TARGET_MANAGER=tgt|lio, TGT_CONTROL=N, SSH=user@host, TIMEOUT=seconds, INITIATORS=ALL|iqn,...")
KEY_RE = re.compile(r"[0-9a-f]{32}")
IQN_RE = re.compile(r"iqn\.\d{4}-\d{2}\.[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?(?::[a-z0-9][a-z0-9.:-]*)?")
NAME_RE = re.compile(r"(?:iqn\.\d{4}-\d{2}\.[a-z0-9][a-z0-9.:-]*|eui\.[0-9a-f]{16}|naa\.[0-9a-f]{16,32})")
SSH_RE = re.compile(r"(?:[A-Za-z0-9_][A-Za-z0-9._-]{0,63}@)?[A-Za-z0-9_][A-Za-z0-9._-]{0,252}")
STORE_RE = re.compile(r"/[A-Za-z0-9._+@/-]*")  # tgtadm passes it inside `key=value,...`: no , = or space


def check_key(key: str) -> str:
    """Keys are the service's 32-hex image keys; anything else (paths, options, shell) is refused."""
    if not isinstance(key, str) or not KEY_RE.fullmatch(key):
        raise InvalidArgument(f"iscsi driver: invalid image key {key!r}", "keys are 32 lowercase hex digits")
    return key


def round_up(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


@dataclass(frozen=True)
class Settings:
    """TM_RAW, checked: every field is safe to pass as one argument to tgtadm, ssh or coreutils."""

    portal: str  # host:port, as libiscsi takes it
    host: str
    port: int
    prefix: str
    manager: str
    control: int
    store: str
    ssh: str | None
    timeout: float
    initiators: tuple[str, ...]  # empty: ALL

    @classmethod
    def parse(cls, tm_raw: dict[str, Any]) -> Settings:
        raw = {str(k).upper(): v for k, v in tm_raw.items()}
        unknown = set(raw) - KNOWN
        if unknown:
            raise InvalidArgument(f"iscsi driver: unknown TM_RAW attribute(s) {', '.join(sorted(unknown))}",
                                  HINT)
        host, port = _portal(raw.get("PORTAL"))
        prefix = str(raw.get("IQN_PREFIX", DEFAULT_PREFIX))
        if not IQN_RE.fullmatch(prefix) or len(prefix) > 180:
            raise InvalidArgument(f"iscsi driver: IQN_PREFIX {prefix!r} is not an iSCSI qualified name",
                                  f"lowercase, e.g. {DEFAULT_PREFIX} or {DEFAULT_PREFIX}:ssd1")
        manager = str(raw.get("TARGET_MANAGER", "tgt")).lower()
        if manager not in ("tgt", "lio"):
            raise InvalidArgument(f"iscsi driver: TARGET_MANAGER {manager!r} is neither tgt nor lio",
                                  "tgt drives tgtd with tgtadm; lio drives the kernel target via rtslib-fb")
        control_text = str(raw.get("TGT_CONTROL", "0"))
        if not control_text.isdigit() or int(control_text) > 65535:
            raise InvalidArgument(f"iscsi driver: TGT_CONTROL {control_text!r} is not a number 0-65535",
                                  "the N of `tgtd -C N` / `tgtadm -C N` (0 for the system's tgtd)")
        if "STORE" not in raw:
            raise InvalidArgument("iscsi driver: STORE is required",
                                  "STORE = the directory of the LUN backing files on the target host")
        store = os.path.normpath(str(raw["STORE"]))
        if not STORE_RE.fullmatch(store) or store == "/" or len(store) > 1024:
            raise InvalidArgument(f"iscsi driver: STORE {str(raw['STORE'])!r} is not a plain absolute path",
                                  "letters, digits and . _ + @ - / only (tgtadm cannot pass , = or spaces)")
        ssh = raw.get("SSH")
        if ssh is not None:
            ssh = str(ssh)
            if not SSH_RE.fullmatch(ssh):
                raise InvalidArgument(f"iscsi driver: SSH {ssh!r} is not user@host",
                                      "letters, digits, '.', '-' and '_' only (no options, no ports)")
            if manager == "lio":
                raise InvalidArgument("iscsi driver: TARGET_MANAGER=lio cannot be used over SSH",
                                      "rtslib-fb works on the local kernel: run it on the target host")
        try:
            timeout = float(str(raw.get("TIMEOUT", DEFAULT_TIMEOUT)))
        except ValueError:
            raise InvalidArgument(f"iscsi driver: TIMEOUT {raw['TIMEOUT']!r} is not a number of seconds",
                                  HINT) from None
        if not 0.5 <= timeout <= 3600:
            raise InvalidArgument("iscsi driver: TIMEOUT must be between 0.5 and 3600 seconds",
                                  "TIMEOUT bounds every target command and SCSI call (default 10)")
        initiators = _initiators(raw.get("INITIATORS", "ALL"))
        return cls(f"{host}:{port}" if ":" not in host else f"[{host}]:{port}", host, port, prefix,
                   manager, int(control_text), store, ssh, timeout, initiators)

    def to_raw(self) -> dict[str, str]:
        raw = {"PORTAL": self.portal, "IQN_PREFIX": self.prefix, "TARGET_MANAGER": self.manager,
               "TGT_CONTROL": str(self.control), "STORE": self.store, "TIMEOUT": f"{self.timeout:g}",
               "INITIATORS": ",".join(self.initiators) or "ALL"}
        if self.ssh:
            raw["SSH"] = self.ssh
        return raw

    def iqn(self, key: str) -> str:
        return f"{self.prefix}:{check_key(key)}"

    def path(self, key: str) -> str:
        return f"{self.store}/{check_key(key)}"

    def key_of(self, iqn: str) -> str | None:
        """The image key of a target named `IQN_PREFIX:KEY`; None for any other target."""
        prefix, _, key = iqn.rpartition(":")
        return key if prefix == self.prefix and KEY_RE.fullmatch(key) else None


def _portal(value: Any) -> tuple[str, int]:
    hint = "PORTAL = host:port of the target, e.g. 192.0.2.10:3260 or [2001:db8::1]:3260"
    if value is None:
        raise InvalidArgument("iscsi driver: PORTAL is required", hint)
    text = str(value)
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d{1,5}))?", text) or re.fullmatch(
        r"([A-Za-z0-9_][A-Za-z0-9._-]{0,252})(?::(\d{1,5}))?", text)
    if not m:
        raise InvalidArgument(f"iscsi driver: PORTAL {text!r} is not host:port", hint)
    port = int(m.group(2) or 3260)
    if not 0 < port < 65536:
        raise InvalidArgument(f"iscsi driver: PORTAL port {port} is out of range", hint)
    return m.group(1), port


def _initiators(value: Any) -> tuple[str, ...]:
    text = str(value).strip()
    if text.upper() == "ALL":
        return ()
    names = tuple(n for n in re.split(r"[\s,]+", text) if n)
    bad = [n for n in names if not NAME_RE.fullmatch(n)]
    if bad or not names:
        raise InvalidArgument(f"iscsi driver: INITIATORS {text!r} holds names that are not initiator names",
                              "ALL, or a comma-separated list of iqn./eui./naa. names (lowercase)")
    return names


def initiator_name(prefix: str) -> str:
    """This host's userspace initiator: `IQN_PREFIX:initiator:HOSTNAME` (list it in INITIATORS)."""
    host = re.sub(r"[^a-z0-9.-]", "-", socket.gethostname().lower()).strip("-.") or "host"
    return f"{prefix}:initiator:{host}"
