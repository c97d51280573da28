"""`onestoragebackend`: administer the pool's storage backends, as `onedatastore` does datastores.

One command, verbs as sub-commands, IDs and names accepted alike, tables by default with
`--json`, `-x` (XML) and `--csv`, and the same flags everywhere.
"""

from __future__ import annotations

import time
from typing import Any

import click

from .cli_tm2 import Tm2Group, backend_names
from .client import Client
from .errors import InvalidArgument
from .output import (
    apply_filters,
    console,
    parse_columns,
    print_attributes,
    print_table,
    table,
    to_csv,
    to_json,
    to_xml,
)
from .template import parse_template

DEFAULT_COLUMNS = ["ID", "NAME", "STATE", "TM", "CAPACITY", "FREE", "USED", "COST", "ROLE", "CLUSTER",
                   "TAGS", "NBIMAGE", "NBVM", "USER", "GROUP"]
ALL_COLUMNS = [*DEFAULT_COLUMNS, "ALLOCATED", "AVAILABLE", "CAPACITY_LIMIT", "OVERCOMMIT",
                                 "RESERVED", "PRIORITY", "PERMISSIONS",
                                 "TIMEOUT", "ERROR", "UID", "GID"]


def _client() -> Client:
    return click.get_current_context().obj


def output_options(func: Any) -> Any:
    func = click.option("--csv", "fmt", flag_value="csv", help="comma-separated values")(func)
    func = click.option("-x", "--xml", "fmt", flag_value="xml", help="XML, as OpenNebula's -x")(func)
    func = click.option("--json", "-j", "fmt", flag_value="json", help="JSON")(func)
    return func


@click.group("onestoragebackend", cls=Tm2Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--socket", envvar="TM2FS_SOCKET", help="control socket of the tm2fs daemon "
              "(default: $TM2FS_SOCKET or /run/tm2fs/tm2fs.sock)")
@click.pass_context
def main(ctx: click.Context, socket: str | None) -> None:
    """Manage the storage backends of the tm2fs pool.

    A backend is a directory, a Ceph pool or an iSCSI target host; on the mount it is a
    directory named after it. Backends are named by NAME or ID alike.

    \b
    Examples:
      onestoragebackend create ssd1.tpl
      onestoragebackend create --name repo --tm dir --tm-raw PATH=/srv/repo --role REPOSITORY
      onestoragebackend list -l ID,NAME,STATE,FREE -f TAGS~SSD
      onestoragebackend show ssd1 -x
      onestoragebackend disable ssd1
    """
    ctx.obj = Client(socket)
    ctx.call_on_close(ctx.obj.close)


def _template(path: str | None, options: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if path:
        with click.open_file(path) as f:
            spec.update(parse_template(f.read()))
    for key, value in options.items():
        if value is not None:
            spec[key.upper()] = parse_template(value) if key == "tm_raw" else value
    return spec


def backend_options(func: Any) -> Any:
    for name, help_text in reversed([
        ("--name", "backend name (a directory name on the mount)"),
        ("--tm", "driver: dir, ... (see the README)"),
        ("--tm-raw", "driver arguments, e.g. 'PATH=/srv/ssd1'"),
        ("--capacity", "cap on the capacity shown and used for placement, e.g. 2T"),
        ("--cost", "admin's cost (placement prefers the lowest)"),
        ("--overcommit", "how far thin images may promise past the capacity, e.g. 1.5 (default 1)"),
        ("--reserved", "share of the capacity never promised, e.g. 5% (default 0)"),
        ("--priority", "rank for the `fixed` placement policy (higher first)"),
        ("--role", "SAN (VM disks) or REPOSITORY (base images)"),
        ("--tags", "comma-separated tags, e.g. SSD,ISCSI"),
        ("--cluster", "cluster name"),
        ("--timeout", "seconds for every driver call before the backend goes to ERROR"),
        ("--user", "owner (name or uid)"),
        ("--group", "group (name or gid)"),
        ("--permissions", "octal (0770) or OpenNebula's 'um- u-- ---'"),
    ]):
        func = click.option(name, help=help_text)(func)
    return func


@main.command()
@click.argument("template", required=False, type=click.Path(exists=True, dir_okay=False,
                                                           allow_dash=True))
@backend_options
def create(template: str | None, **options: Any) -> None:
    """Create a backend from an OpenNebula-style TEMPLATE file and/or options.

    \b
    A template file:
      NAME   = ssd1
      TM     = dir
      TM_RAW = [ PATH = "/srv/ssd1" ]
      TAGS   = "SSD,ISCSI"
      COST   = 10
    Options override the file. The backend is reached once before it is added: a wrong
    TM_RAW adds nothing.
    """
    spec = _template(template, options)
    result = _client().call("POST", "/v1/backends", spec)
    click.echo(f"ID: {result['ID']}")


@main.command()
@click.argument("backends", nargs=-1, required=True,
                shell_complete=backend_names)
@click.option("--force", is_flag=True, help="also delete every image the backend holds")
def delete(backends: tuple[str, ...], force: bool) -> None:
    """Delete BACKENDS (refused while one holds images, unless --force).

    \b
    Examples:
      onestoragebackend delete ssd1
      onestoragebackend delete 3 4 --force
    """
    for ref in backends:
        _client().call("DELETE", f"/v1/backends/{ref}", params={"force": "1" if force else "0"})


def _rows(filters: tuple[str, ...]) -> list[dict[str, Any]]:
    return apply_filters(_client().call("GET", "/v1/backends"), filters)


@main.command("list")
@click.option("-l", "--list", "columns", metavar="COLS",
              help=f"columns to show, e.g. ID,NAME,FREE (known: {','.join(ALL_COLUMNS)})")
@click.option("-f", "--filter", "filters", multiple=True, metavar="FILTER",
              help="KEY=VALUE (wildcards), KEY!=VALUE or KEY~TEXT; repeat to AND them")
@click.option("--no-header", is_flag=True, help="omit the header line")
@output_options
def list_(columns: str | None, filters: tuple[str, ...], no_header: bool, fmt: str | None) -> None:
    """List the backends.

    \b
    Examples:
      onestoragebackend list -l ID,NAME,STATE,FREE -f TAGS~SSD
      onestoragebackend list --csv --no-header -f STATE!=READY
    """
    rows = _rows(filters)
    cols = parse_columns(columns, DEFAULT_COLUMNS, ALL_COLUMNS)
    if fmt == "json":
        click.echo(to_json(rows))
    elif fmt == "xml":
        click.echo(to_xml(rows))
    elif fmt == "csv":
        click.echo(to_csv(rows, cols, not no_header), nl=False)
    else:
        print_table(rows, cols, not no_header)


@main.command()
@click.option("-d", "--delay", type=float, default=2.0, show_default=True,
              help="seconds between refreshes")
@click.option("-l", "--list", "columns", metavar="COLS", help="columns to show")
@click.option("-f", "--filter", "filters", multiple=True, metavar="FILTER", help="as for list")
@click.option("--iterations", type=int, default=0, hidden=True, help="stop after N refreshes")
def top(delay: float, columns: str | None, filters: tuple[str, ...], iterations: int) -> None:
    """Show the backends, refreshed every DELAY seconds (Ctrl-C quits).

    \b
    Example:
      onestoragebackend top -d 5 -f ROLE=SAN
    """
    from rich.live import Live

    cols = parse_columns(columns, DEFAULT_COLUMNS, ALL_COLUMNS)
    count = 0
    try:
        with Live(table(_rows(filters), cols), auto_refresh=False, console=console()) as live:
            while True:
                count += 1
                if iterations and count >= iterations:
                    break
                time.sleep(delay)
                live.update(table(_rows(filters), cols), refresh=True)
    except KeyboardInterrupt:
        pass


@main.command()
@click.argument("backend", shell_complete=backend_names)
@output_options
def show(backend: str, fmt: str | None) -> None:
    """Show BACKEND's attributes, driver arguments, images and attachments.

    \b
    Examples:
      onestoragebackend show ssd1
      onestoragebackend show 3 --json
    """
    data = _client().call("GET", f"/v1/backends/{backend}")
    if fmt == "json":
        click.echo(to_json(data))
        return
    if fmt == "xml":
        click.echo(to_xml(data))
        return
    if fmt == "csv":
        raise InvalidArgument("show has no CSV form", "use --json or -x")
    click.echo(f"STORAGE BACKEND {data['ID']} INFORMATION")
    print_attributes({k: v for k, v in data.items()
                      if k not in ("IMAGES", "ATTACHMENTS", "TM_RAW", "ATTRS", "HOSTS")})
    click.echo("TM_RAW")
    print_attributes(data["TM_RAW"])
    if data.get("HOSTS"):
        click.echo("SEEN BY HOSTS")
        print_table([{"HOST": h, "STATE": v} for h, v in data["HOSTS"].items()], ["HOST", "STATE"])
    if data["ATTRS"]:
        click.echo("ATTRIBUTES")
        print_attributes(data["ATTRS"])
    click.echo(f"IMAGES ({len(data['IMAGES'])})")
    if data["IMAGES"]:
        print_table(data["IMAGES"], ["ID", "PATH", "SIZE", "KEY", "CREATED"])
    if data["ATTACHMENTS"]:
        click.echo(f"ATTACHMENTS ({len(data['ATTACHMENTS'])})")
        print_table(data["ATTACHMENTS"], ["ID", "IMAGE_ID", "HOST", "PATH", "CREATED"])


@main.command()
@click.argument("backends", nargs=-1, required=True,
                shell_complete=backend_names)
def enable(backends: tuple[str, ...]) -> None:
    """Enable BACKENDS: they are checked at once and accept changes again.

    \b
    Example:
      onestoragebackend enable ssd1
    """
    for ref in backends:
        _client().call("POST", f"/v1/backends/{ref}/enable")


@main.command()
@click.argument("backends", nargs=-1, required=True,
                shell_complete=backend_names)
def disable(backends: tuple[str, ...]) -> None:
    """Disable BACKENDS: their images stay readable; changes answer EROFS.

    \b
    Example:
      onestoragebackend disable ssd1
    """
    for ref in backends:
        _client().call("POST", f"/v1/backends/{ref}/disable")


@main.command()
@click.argument("backend", shell_complete=backend_names)
@click.argument("template", required=False, type=click.Path(exists=True, dir_okay=False,
                                                           allow_dash=True))
@click.option("-a", "--append", is_flag=True,
              help="accepted for OpenNebula scripts; update always merges")
@backend_options
def update(backend: str, template: str | None, append: bool, **options: Any) -> None:
    """Set attributes of BACKEND from a TEMPLATE file and/or options.

    Attributes named are set and the others kept (as `onedatastore update --append`); an empty
    value removes a custom attribute (DISK_TYPE=""). TM cannot change. A new NAME renames the
    directory on the mount.

    \b
    Examples:
      onestoragebackend update ssd1 --cost 12 --tags SSD,NVME
      onestoragebackend update ssd1 changes.tpl
    """
    spec = _template(template, options)
    if not spec:
        raise InvalidArgument("nothing to update", "give a template file or options")
    _client().call("PATCH", f"/v1/backends/{backend}", spec)



@main.command()
@output_options
def hosts(fmt: str | None) -> None:
    """List the hosts (tm2fs daemons) sharing the pool: alive or not, and what each sees.

    A host whose heartbeat is older than 10 s is UNREACHABLE; its write leases may then be
    broken with `tm2 break-lease`. BACKENDS is each host's own monitor's view.

    \b
    Example:
      onestoragebackend hosts
    """
    rows = _client().call("GET", "/v1/hosts")
    if fmt == "json":
        click.echo(to_json(rows))
    elif fmt == "xml":
        click.echo(to_xml(rows))
    elif fmt == "csv":
        for r in rows:
            r["CLUSTERS"] = ",".join(r["CLUSTERS"])
        click.echo(to_csv(rows, ["NAME", "STATE", "CLUSTERS", "HEARTBEAT_AGE", "LEASES",
                                 "MOUNTPOINT"]), nl=False)
    else:
        for r in rows:
            r["CLUSTERS"] = ",".join(r["CLUSTERS"])
            r["BACKENDS"] = " ".join(f"{k}:{v}" for k, v in r["BACKENDS"].items())
        print_table(rows, ["NAME", "STATE", "CLUSTERS", "HEARTBEAT_AGE", "LEASES", "MOUNTPOINT",
                           "BACKENDS"])


if __name__ == "__main__":
    main(prog_name="onestoragebackend")
