"""`iscsi`: images as LUNs of an iSCSI target host, read and written by a userspace initiator.

Why: SAN backends (fast SSD and slow HDD target hosts) hand out block devices over iSCSI. Each image
is one target `IQN_PREFIX:KEY` whose LUN 1 is a sparse file `STORE/KEY` on the target host, so
allocate, clone, resize and delete are file work plus a little target management, and the bytes
move over iSCSI, as a hypervisor would move them.

How, one module each:

- `settings`: TM_RAW checked into `Settings`; every field is safe as one argument of a command.
- `runner`: argument lists run on the target host (`trio.run_process`, locally or through
  `ssh -o BatchMode=yes HOST -- ...` with every remote word shell-quoted). Blocking calls run in
  abandonable worker threads under the backend's limiter (`tm2fs.drivers.threads`).
- `files`: the LUN backing files in STORE (`LocalFiles`: Python calls in worker threads;
  `RemoteFiles`: coreutils over ssh). A LUN holds whole 512-byte blocks, so a backing file is the
  image size rounded up to a block (the rounding reads as zeros) and a size record keeps the exact
  size.
- `targets`: the target-manager interface, `Targets`, with two implementations: `tgt`
  (`TgtTargets`: Linux's userspace target tgtd through `tgtadm -C N --lld iscsi ...`) and `lio`
  (`LioTargets`: the kernel's LIO through rtslib-fb).
- `libiscsi`: libiscsi's userspace initiator bound with ctypes (no kernel initiator is needed); a
  `Session` is one logged-in session (login and logout are blocking, in worker threads).
- `pipeline`: libiscsi's event loop on the trio thread: many SCSI commands in flight on a session.
- `handle`: an open image, byte access over a session's blocks, requests side by side.
- `driver`: `IscsiDriver`, the backend put together from the above.

A tgtd restart loses every target (its configuration lives in memory). `start()` therefore
`ensure`s a target for every backing file in STORE: the backend comes back READY with its data.

Failures are OSErrors with errno ECONNREFUSED (nothing listens), ETIMEDOUT (no answer within
TIMEOUT) or EIO, which the service turns into backend ERROR; no call waits longer than TIMEOUT
(plus a login if a broken session reconnects).

TM_RAW (strings): PORTAL=host:port (required; port 3260 if left out), STORE=/dir on the target host
(required; made if the target host is this one), IQN_PREFIX (iqn.2026-11.org.tm2fs), TARGET_MANAGER
(tgt or lio), TGT_CONTROL (tgtadm's -C, 0), SSH (user@host of a remote target host), TIMEOUT
(seconds per command or SCSI call, 10), INITIATORS (ALL, or the initiator names allowed in: this
daemon's own is `IQN_PREFIX:initiator:HOSTNAME`).

NOT RUN: `LioTargets` needs configfs and the target_core_mod / iscsi_target_mod kernel modules,
which the development and CI machines lack. It is written against rtslib-fb 2.x, imported only
when TARGET_MANAGER=lio is used, and only its refusal without rtslib or configfs is tested. The
hypervisors' kernel initiator (open-iscsi) is not used either: hosts reach images through this
daemon's userspace sessions.
"""

from .driver import IscsiDriver
from .lio import LioTargets
from .runner import CommandError, Runner
from .settings import Settings, check_key, initiator_name
from .tgt import TgtTargets, parse_tgt_show

__all__ = ["CommandError", "IscsiDriver", "LioTargets", "Runner", "Settings", "TgtTargets", "check_key",
           "initiator_name", "parse_tgt_show"]
