"""`rbd`: images as Ceph RBD images in one pool (and optionally one RADOS namespace).

Why: a Ceph pool is shared storage every hypervisor reaches, with thin images and copy-on-write
clones; this driver lets such a pool serve as a tm2fs backend, reached through librbd (the
distribution's python3-rados / python3-rbd bindings), with no kernel mapping and no FUSE of its own.

How: image KEY is the RBD image named KEY (the service's opaque 32-hex keys). One librados
connection per backend, opened by `start()` and closed by `stop()`.

One module each: `ceph` (the bindings, their errors as OSErrors, key checks), `settings` (TM_RAW
checked, and the librados connection it describes), `handle` (an open image and its aio data
path), `driver` (`RbdDriver`: connection, capacity, images, clones, deletes).

- Data path: `RbdHandle.apread/apwrite/aflush` use librbd's asynchronous calls. The completion
  callback runs on a librbd thread and wakes the waiting trio task through the loop's TrioToken
  (`run_sync_soon` + `reschedule`): no thread hop per request. A write past the end grows the
  image first (librbd would silently clip it). `aflush` is librbd's flush: every acknowledged
  write is then on the OSDs.
- Control calls (create, remove, clone, resize, stats, opening an image) block in librbd, so each
  runs in a worker thread that a timeout can abandon, under a `trio.CapacityLimiter` of this
  driver's own: a dead cluster ties up only these threads and never stalls the trio thread.
- Timeouts: librados waits forever by default. The connection sets `rados_osd_op_timeout`,
  `rados_mon_op_timeout` and `client_mount_timeout` to CONNECT_TIMEOUT, so every call against a
  dead OSD or monitor fails with ETIMEDOUT after that long, and `objecter_timeout` (the age at
  which an op asks the monitors for a newer OSD map) and `objecter_tick_interval` (how often that
  is checked; 10 s and 5 s by default) well below it, so a restarted OSD is found again by the
  next op instead of each op timing out against the dead address.
- `monitor()` first does one OSD read (the monitors answer from their maps even when every OSD
  is dead), then reads `df detail`: total = used + MAX AVAIL of the pool (its share of the raw
  space, replication already counted), free = MAX AVAIL; with a pool quota, total = the quota and
  free = min(quota - used, MAX AVAIL). A shared pool's figures are the pool's, namespace or not.
- Errors of librados/librbd become OSError with a fitting errno (ImageNotFound ENOENT,
  ImageExists EEXIST, ImageBusy/ImageHasSnapshots EBUSY, timeouts ETIMEDOUT, a shut-down
  connection ENOTCONN, NoSpace ENOSPC, anything else EIO), which the service maps.

Clones are copy-on-write: clone(SRC, DST) takes snapshot `tm2fs-clone-DST` of SRC, protects it
and clones DST from it (format 1 or 2, as the cluster allows), so a clone costs no data and takes
milliseconds whatever the size. Each clone has its own snapshot on its parent, so the parent
knows exactly which snapshot to drop when that clone goes.

- Clone depth: reads of a deep clone walk its parent chain. When DST's chain would be longer than
  MAX_CLONE_DEPTH (default 8; 0 flattens every clone), DST is flattened (its data copied from the
  chain) right away, inside the clone call and in its worker thread: the driver has no task of its
  own to do it later, and a flattened clone is a plain image whose cost is paid once. Its
  snapshot on SRC is then dropped.
- Delete of an image that has clones: the clones keep working. The image is moved to the RBD
  trash (gone from `keys()`, `size()` answers ENOENT; the name is free again) and stays there as
  long as any clone needs it; deleting the last clone drops the parent's snapshot and removes the
  trashed parent, all the way up the chain. `keys()` (the service's sweep of leftovers) also
  removes trashed parents whose clones are gone (a crash between the two steps). Flattening the
  children instead would make a delete cost a full copy of every child, bounded only by the
  backend's TIMEOUT.
- Delete removes the `tm2fs-clone-*` snapshots the image owns. An image that also has snapshots
  tm2fs did not make is refused with EBUSY (they are someone else's to remove). So is an image
  another client has open, and, for up to `osd_client_watch_timeout` (30 s), one that was open
  while its OSD crashed (librbd could not drop its old watch); the service leaves such data to
  its sweep of leftovers.
"""

from .ceph import CLONE_SNAP, os_error
from .driver import RbdDriver
from .handle import RbdHandle, wait_aio

__all__ = ["CLONE_SNAP", "RbdDriver", "RbdHandle", "os_error", "wait_aio"]
