"""`tm2 ACTION ARGS`: the eleven TM2 actions, in the seed's `COMMAND ARG1 ARG2` form.

Because the form is exactly the seed's, `tm2` can itself be a transfer-manager driver program.
Bytes stream through the control socket; `get` writes the file as the calling user (never the
daemon), atomically and sparse. Failures print one line `tm2: ERROR: ...` and exit 1.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import click

from .client import Client
from .errors import Tm2Error
from .names import parse_address
from .output import print_attributes, print_table, to_json
from .sizes import parse_size

PROGRESS_MIN = 64 * 2**20  # smaller copies finish before a bar is worth drawing
CHUNK = 4 * 2**20


class Tm2Group(click.Group):
    """Turns service errors into one line and exit status 1; a reader gone from the other end
    of stdout (`| head`) ends the command quietly, as `cat` would."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            quiet_stdout()
            ctx.exit(1)
        except Tm2Error as e:
            click.echo(f"{self.name}: ERROR: {e.message}", err=True)
            if e.hint:
                click.echo(f"  hint: {e.hint}", err=True)
            ctx.exit(1)
        except OSError as e:
            click.echo(f"{self.name}: ERROR: {e.strerror or e}"
                       + (f": {e.filename}" if e.filename else ""), err=True)
            ctx.exit(1)


def quiet_stdout() -> None:
    """stdout's reader is gone: what is still buffered goes nowhere instead of raising again
    when Python flushes at exit (as Python's documentation on SIGPIPE advises)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


@click.group("tm2", cls=Tm2Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--socket", envvar="TM2FS_SOCKET", help="control socket of the tm2fs daemon "
              "(default: $TM2FS_SOCKET or /run/tm2fs/tm2fs.sock)")
@click.pass_context
def main(ctx: click.Context, socket: str | None) -> None:
    """TM2 actions on images of the tm2fs pool.

    Images are addressed as BACKEND:IMAGE, BACKEND being a backend's name or ID and IMAGE a path
    inside it, e.g. local:ubuntu.img or 3:vm-42/disk.0. Sizes take binary units: 512M, 10G, 1T.

    \b
    Examples:
      tm2 allocate local:vm-42/disk.0 10G
      tm2 push ./ubuntu.img repo:ubuntu.img
      tm2 clone repo:ubuntu.img ssd1:vm-42/disk.1
      tm2 attach ssd1:vm-42/disk.1 /var/lib/one/datastores/0/42/disk.1
    """
    ctx.obj = Client(socket)
    ctx.call_on_close(ctx.obj.close)


def _client() -> Client:
    return click.get_current_context().obj


def backend_names(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Shell completion of backend names, asked of the daemon (none if it cannot be reached)."""
    client = Client(ctx.find_root().params.get("socket"), timeout=2)
    try:
        rows = client.call("GET", "/v1/backends")
    except (Tm2Error, OSError):
        return []
    finally:
        client.close()
    return [r["NAME"] for r in rows if r["NAME"].startswith(incomplete)]


def complete_address(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """BACKEND: of a BACKEND:IMAGE address (the image part is the user's to type)."""
    if ":" in incomplete:
        return []
    return [f"{name}:" for name in backend_names(ctx, param, incomplete)]


def _check_address(address: str) -> str:
    parse_address(address)  # early, clear errors before any request
    return address


def placement_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The options that steer placement when a target is auto:PATH."""
    for option in reversed([
        click.option("--requirements", "-r", metavar="EXPR",
                     help="what the backend must offer, e.g. 'TAGS @> SSD & FREE > 20G'"),
        click.option("--rank", metavar="EXPR",
                     help="order the candidates, higher first, e.g. 'FREE - COST * 1G'"),
        click.option("--policy", type=click.Choice(["cost", "packing", "striping", "fixed"]),
                     help="a named rank (default cost: lowest COST, then most AVAILABLE)"),
        click.option("--role", type=click.Choice(["SAN", "REPOSITORY", "ANY"],
                                                 case_sensitive=False),
                     help="backend ROLE to use (default SAN; REPOSITORY for push)"),
        click.option("--cluster", metavar="NAME[,NAME]",
                     help="place in these clusters instead of this host's own ('*': any)"),
    ]):
        func = option(func)
    return func


def _placed(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: kwargs.pop(k) for k in ("requirements", "rank", "policy", "role", "cluster")
            if kwargs.get(k) is not None}


def _report(target: str, info: dict[str, Any] | None) -> None:
    """An auto: target prints where it landed, for scripts to use."""
    if target.startswith("auto:") and info:
        click.echo(info["ADDRESS"])


def _progress(total: int, label: str) -> tuple[Callable[[int], None], Callable[[], None]]:
    """A rich progress bar on stderr when it is a terminal and the copy is long."""
    if total < PROGRESS_MIN or not sys.stderr.isatty():
        return (lambda n: None), (lambda: None)
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    bar = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                   TransferSpeedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                   transient=True)
    task = bar.add_task(label, total=total)
    bar.start()
    return (lambda n: bar.update(task, advance=n)), bar.stop


@main.command()
@click.argument("image", callback=lambda c, p, v: _check_address(v),
              shell_complete=complete_address)
@click.argument("path", type=click.Path(dir_okay=False))
def get(image: str, path: str) -> None:
    """Copy IMAGE to the local file PATH (sparse, atomic: a temp file renamed into place).

    \b
    Example:
      tm2 get repo:ubuntu.img /var/tmp/ubuntu.img
    """
    size, chunks = _client().download(image)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tm2-", dir=directory)
    advance, done = _progress(size, f"get {image}")
    try:
        offset = 0
        for chunk in chunks:
            if chunk.count(0) == len(chunk):
                os.lseek(fd, len(chunk), os.SEEK_CUR)  # leave a hole
            else:
                os.write(fd, chunk)
            offset += len(chunk)
            advance(len(chunk))
        if offset != size:
            raise Tm2Error(f"{image}: got {offset} of {size} bytes")
        os.ftruncate(fd, size)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.chmod(tmp, 0o666 & ~_umask())
        os.rename(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        os.unlink(tmp)
        raise
    finally:
        done()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _file_chunks(f: Any, advance: Callable[[int], None]) -> Iterator[bytes]:
    while chunk := f.read(CHUNK):
        advance(len(chunk))
        yield chunk


@main.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.argument("image", callback=lambda c, p, v: _check_address(v),
              shell_complete=complete_address)
@placement_options
def push(path: str, image: str, **kwargs: Any) -> None:
    """Copy the local file PATH into a new IMAGE (refuses to overwrite one).

    IMAGE auto:PATH lets placement choose a REPOSITORY backend (see `tm2 place --help`).
    Missing folders of IMAGE are made, as `mkdir -p` would.

    \b
    Examples:
      tm2 push ./ubuntu.img repo:ubuntu.img
      tm2 push ./ubuntu.img auto:base/ubuntu.img
    """
    size = os.path.getsize(path)
    advance, done = _progress(size, f"push {image}")
    try:
        with open(path, "rb") as f:
            info = _client().upload(image, _file_chunks(f, advance), "push",
                                    {"size": size, **_placed(kwargs)})
    finally:
        done()
    _report(image, info)


@main.command()
@click.argument("src", callback=lambda c, p, v: _check_address(v),
              shell_complete=complete_address)
@click.argument("dst", shell_complete=complete_address)
@placement_options
def clone(src: str, dst: str, **kwargs: Any) -> None:
    """Clone SRC to DST (BACKEND:IMAGE, a bare IMAGE in SRC's backend, or auto:IMAGE).

    Inside one backend the driver clones: a reflink or copy-on-write where the storage can, a
    sparse copy otherwise. Across backends the bytes are copied. With auto:IMAGE placement
    chooses the backend and the chosen BACKEND:IMAGE is printed. Missing folders of DST are
    made, as `mkdir -p` would.

    \b
    Examples:
      tm2 clone repo:ubuntu.img ssd1:vm-42/disk.1
      tm2 clone repo:ubuntu.img auto:vm-42/disk.1 -r 'TAGS @> SSD'
    """
    if ":" not in dst:
        dst = f"{src.partition(':')[0]}:{dst}"
    info = _client().call("POST", "/v1/images/clone",
                          {"src": src, "dst": _check_address(dst), **_placed(kwargs)})
    _report(dst, info)


@main.command()
@click.argument("image", callback=lambda c, p, v: _check_address(v),
              shell_complete=complete_address)
def delete(image: str) -> None:
    """Delete IMAGE (refused while it is attached).

    \b
    Example:
      tm2 delete ssd1:vm-42/disk.1
    """
    _client().call("POST", "/v1/images/delete", {"address": image})


@main.command("get-size")
@click.argument("image", callback=lambda c, p, v: _check_address(v),
              shell_complete=complete_address)
def get_size(image: str) -> None:
    """Print IMAGE's size in bytes.

    \b
    Example:
      tm2 get-size repo:ubuntu.img
    """
    click.echo(_client().call("GET", "/v1/images/size", params={"address": image})["size"])


# "-1" must reach parse_size (and get its clear error), not be taken for an option
SIZE_ARGS = {"ignore_unknown_options": True}


@main.command(context_settings=SIZE_ARGS)
@click.argument("image", callback=lambda c, p, v: _check_address(v),
              shell_complete=complete_address)
@click.argument("size", callback=lambda c, p, v: parse_size(v))
@placement_options
def allocate(image: str, size: int, **kwargs: Any) -> None:
    """Create IMAGE of SIZE bytes (sparse: it takes space as it is written).

    Missing folders of IMAGE are made, as `mkdir -p` would (a transfer manager makes the VM's
    folder). IMAGE auto:PATH lets placement choose the backend and prints the chosen
    BACKEND:PATH.

    \b
    Examples:
      tm2 allocate local:vm-42/disk.0 10G
      tm2 allocate auto:one-42/disk.0 20G -r 'TAGS @> SSD'
    """
    info = _client().call("POST", "/v1/images/allocate",
                          {"address": image, "size": size, **_placed(kwargs)})
    _report(image, info)


@main.command(context_settings=SIZE_ARGS)
@click.argument("size", callback=lambda c, p, v: parse_size(v))
@placement_options
@click.option("--explain", is_flag=True, help="show every backend's verdict, not just the choice")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def place(size: int, explain: bool, as_json: bool, **kwargs: Any) -> None:
    """Which backend would take a new image of SIZE? A dry run: nothing is reserved.

    Backends are filtered (STATE READY, ROLE, your access, --requirements, room for SIZE) and
    the rest ranked, higher first, by --rank or --policy. Expressions use backend attributes:
    NAME TM ROLE COST PRIORITY CAPACITY FREE USED ALLOCATED AVAILABLE TAGS NBIMAGE NBVM CLUSTER
    and custom ones; sizes take units (20G).

    \b
    Requirements: = != > < >= <= (wildcards on =: NAME = "ssd*"), @> (TAGS @> SSD),
                  & | ! and parentheses.
    Rank:         + - * / on numbers, e.g. --rank 'FREE / (COST + 1)'.
    Policies:     cost (lowest COST, then most AVAILABLE), packing (least AVAILABLE first),
                  striping (most AVAILABLE first), fixed (highest PRIORITY first).

    \b
    Examples:
      tm2 place 20G -r 'TAGS @> SSD' --explain
      tm2 place 100G --role REPOSITORY --policy striping
    """
    verdicts = _client().call("POST", "/v1/placement", {"size": size, **_placed(kwargs)})
    if as_json:
        click.echo(to_json(verdicts))
        return
    chosen = [v for v in verdicts if v["ORDER"] is not None]
    if explain:
        print_table(verdicts, ["ORDER", "ID", "NAME", "STATE", "ROLE", "COST", "AVAILABLE", "RANK",
                               "VERDICT"])
    elif chosen:
        click.echo(chosen[0]["NAME"])
    if not chosen:
        raise Tm2Error("no backend can take it" + ("" if explain else "; see --explain"))


@main.command(context_settings=SIZE_ARGS)
@click.argument("image", callback=lambda c, p, v: _check_address(v),
              shell_complete=complete_address)
@click.argument("size", callback=lambda c, p, v: parse_size(v))
@click.option("--shrink", is_flag=True, help="allow making the image smaller (loses data)")
def resize(image: str, size: int, shrink: bool) -> None:
    """Grow IMAGE to SIZE (shrinking needs --shrink).

    \b
    Example:
      tm2 resize ssd1:vm-42/disk.0 20G
    """
    _client().call("POST", "/v1/images/resize", {"address": image, "size": size,
                                                  "shrink": shrink})


@main.command()
@click.argument("image", callback=lambda c, p, v: _check_address(v),
              shell_complete=complete_address)
def read(image: str) -> None:
    """Write IMAGE's bytes to standard output.

    \b
    Example:
      tm2 read repo:ubuntu.img | sha256sum
    """
    _, chunks = _client().download(image)
    out = sys.stdout.buffer
    for chunk in chunks:
        out.write(chunk)
    out.flush()


@main.command()
@click.argument("image", callback=lambda c, p, v: _check_address(v),
              shell_complete=complete_address)
def write(image: str) -> None:
    """Replace IMAGE's bytes with standard input (creating IMAGE and missing folders if needed).

    \b
    Example:
      curl -s https://example.org/ubuntu.img | tm2 write repo:ubuntu.img
    """
    _client().upload(image, _file_chunks(sys.stdin.buffer, lambda n: None), "write")


def _on_mount(client: Client, path: str) -> tuple[str | None, bool]:
    mountpoint = client.call("GET", "/v1/health")["mountpoint"]
    inside = bool(mountpoint) and os.path.abspath(path).startswith(mountpoint.rstrip("/") + "/")
    return mountpoint, inside


DEV = click.option("--dev", default="vda", show_default=True,
                   help="the guest disk name in a libvirt <disk> element")


@main.command()
@click.argument("image", callback=lambda c, p, v: _check_address(v),
              shell_complete=complete_address)
@click.argument("path")
@click.option("--native", is_flag=True, help="make PATH the image's own path (a link to its file, "
              "or a libvirt <disk> element for a network disk), not a link into the mount")
@click.option("--takeover", is_flag=True, help="take the write lease from the host whose "
              "attachment holds it (a live migration's destination; logged)")
@DEV
def attach(image: str, path: str, native: bool, takeover: bool, dev: str) -> None:
    """Link PATH to IMAGE on the mount and record the attachment (counted in NBVM).

    With --native the hypervisor bypasses tm2fs for data: PATH becomes a symlink to the image's
    file (dir, local legacy backends), or a file holding the libvirt <disk> element of its
    network disk (rbd, iscsi) for a domain definition to include. The attachment and the write
    lease are recorded as for a link into the mount; `tm2 detach` removes PATH and both.

    PATH's folder must exist; a link into the mount points at IMAGE by its absolute path there.

    \b
    Examples:
      tm2 attach ssd1:vm-42/disk.0 /var/lib/one/datastores/0/42/disk.0
      tm2 attach --native ceph:vm-42/disk.0 /var/lib/one/datastores/0/42/disk.0.xml
    """
    client = _client()
    path = os.path.abspath(path)
    mountpoint, inside = _on_mount(client, path)
    if native:
        if inside:
            raise Tm2Error(f"{path} is on the mount; a native attachment lives outside it")
        _attach_native(client, image, path, takeover, dev)
        return
    if not mountpoint:
        raise Tm2Error("the daemon has no mount to link to")
    target = f"{mountpoint}/{client.call('GET', '/v1/images/info', params={'address': image})['PATH']}"
    try:
        os.symlink(target, path)  # on the mount, this alone records the attachment
    except FileNotFoundError:
        raise Tm2Error(f"folder {os.path.dirname(path)} does not exist",
                       "create it first (mkdir -p)") from None
    except OSError as e:  # the error is the link's, not the target's
        raise OSError(e.errno, e.strerror, path) from None
    if inside:
        if takeover:
            raise Tm2Error("--takeover needs a PATH outside the mount (the link was made)")
        return
    try:
        client.call("POST", "/v1/images/attach", {"address": image, "path": path,
                                                  "takeover": takeover})
    except BaseException:
        os.unlink(path)
        raise


def _attach_native(client: Client, image: str, path: str, takeover: bool, dev: str) -> None:
    """Record first (the daemon says where the image is), then make PATH; undone if PATH fails."""
    data = client.call("POST", "/v1/images/attach", {"address": image, "path": path, "native": True,
                                                     "takeover": takeover, "dev": dev})
    try:
        if data["SOURCE"]["type"] == "file":
            os.symlink(data["SOURCE"]["path"], path)
        else:
            with open(path, "x") as f:
                f.write(data["LIBVIRT"])
    except BaseException:
        client.call("POST", "/v1/images/detach", {"address": image, "path": path})
        raise
    if data.get("TAKEN_FROM"):
        click.echo(f"took the write lease of {image} over from host {data['TAKEN_FROM']}", err=True)


@main.command()
@click.argument("image", callback=lambda c, p, v: _check_address(v),
              shell_complete=complete_address)
@click.argument("path")
def detach(image: str, path: str) -> None:
    """Remove the link (or native attachment's file) at PATH and forget the attachment.

    \b
    Example:
      tm2 detach ssd1:vm-42/disk.0 /var/lib/one/datastores/0/42/disk.0
    """
    client = _client()
    path = os.path.abspath(path)
    _, inside = _on_mount(client, path)
    native = False
    if not inside:
        attached = client.call("GET", "/v1/images/info", params={"address": image})["ATTACHMENTS"]
        native = any(a["PATH"] == path and a.get("NATIVE") for a in attached)
        client.call("POST", "/v1/images/detach", {"address": image, "path": path})
    if os.path.islink(path) or (native and os.path.isfile(path)):
        os.unlink(path)
    elif inside:
        raise Tm2Error(f"{path} is not a link")


@main.command()
@click.argument("image", callback=lambda c, p, v: _check_address(v))
@click.option("--format", "form", type=click.Choice(["json", "qemu", "libvirt"]), default="json",
              show_default=True, help="JSON; a qemu -blockdev argument; a libvirt <disk> element")
@DEV
def source(image: str, form: str, dev: str) -> None:
    """Print how a hypervisor on this host reaches IMAGE natively, without tm2fs in its data path.

    \b
    Examples:
      qemu-system-x86_64 -blockdev "$(tm2 source --format qemu ssd1:vm-42/disk.0)" ...
      tm2 source --format libvirt ceph:vm-42/disk.0 > disk.xml   # for virsh attach-device
    The same JSON is the mount's extended attribute: getfattr -n user.tm2fs.source MNT/B/IMG
    """
    data = _client().call("GET", "/v1/images/source", params={"address": image, "dev": dev})
    if form == "json":
        click.echo(to_json(data["SOURCE"]))
    else:
        click.echo(data["QEMU" if form == "qemu" else "LIBVIRT"].rstrip("\n"))


@main.command("break-lease")
@click.argument("image", callback=lambda c, p, v: _check_address(v),
              shell_complete=complete_address)
@click.option("--force", is_flag=True, help="break it even if the holding host looks alive")
def break_lease(image: str, force: bool) -> None:
    """Take IMAGE's write lease from a host that died holding it (root; logged).

    An image is writable on one host at a time: an open for writing or an attachment takes its
    lease. When that host's daemon is dead (`onestoragebackend hosts` shows it UNREACHABLE after
    10 s without a heartbeat), break the lease and open the image elsewhere.

    \b
    Example:
      tm2 break-lease ssd1:vm-42/disk.0
    """
    data = _client().call("POST", "/v1/images/break-lease", {"address": image, "force": force})
    click.echo(f"broke the lease of {image} held by {data['HOLDER']}")


@main.command()
@click.argument("image", callback=lambda c, p, v: _check_address(v),
              shell_complete=complete_address)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def info(image: str, as_json: bool) -> None:
    """Show IMAGE's attributes and attachments (times as local ISO dates; --json keeps seconds).

    \b
    Example:
      tm2 info ssd1:vm-42/disk.0
    """
    data = _client().call("GET", "/v1/images/info", params={"address": image})
    if as_json:
        click.echo(to_json(data))
        return
    print_attributes({k: v for k, v in data.items() if k != "ATTACHMENTS"})
    if data["ATTACHMENTS"]:
        print_table(data["ATTACHMENTS"], ["ID", "HOST", "PATH", "ON_MOUNT", "NATIVE", "CREATED"])


if __name__ == "__main__":
    main(prog_name="tm2")  # as installed: `python -m` too completes with _TM2_COMPLETE
