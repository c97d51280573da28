"""Naming rules for backends and namespace entries, and the `BACKEND:IMAGE` address form."""

from __future__ import annotations

from .errors import InvalidArgument, NameTooLong

NAME_MAX = 255
AUTO = "auto"  # `auto:IMAGE`: let placement choose the backend


def _is_control(c: str) -> bool:
    """C0 (newline, tab, escape, ...), DEL and C1: what breaks a table or drives a terminal."""
    return ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0


def check_name(name: str, what: str = "name") -> str:
    """A single path component: what POSIX allows, and nothing a script could trip over."""
    if not isinstance(name, str) or name == "":
        raise InvalidArgument(f"{what} is empty", "give a non-empty name")
    if "\0" in name:
        raise InvalidArgument(f"{what} {name!r} contains a NUL byte")
    control = next((c for c in name if _is_control(c)), None)
    if control is not None:
        raise InvalidArgument(f"{what} {name!r} contains the control character {control!r}",
                              "names are printed one per line in tables: use visible characters")
    if "/" in name:
        raise InvalidArgument(f"{what} {name!r} contains '/'", "use a single path component")
    if name in (".", ".."):
        raise InvalidArgument(f"{what} {name!r} is reserved")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"{what} {name!r} is not valid UTF-8") from None
    if len(encoded) > NAME_MAX:
        raise NameTooLong(f"{what} is {len(encoded)} bytes long; the limit is {NAME_MAX}")
    return name


def check_backend_name(name: str) -> str:
    """Backend names are path components that can also be told apart from IDs and addresses."""
    check_name(name, "backend name")
    if ":" in name:
        raise InvalidArgument(f"backend name {name!r} contains ':'", "':' separates BACKEND:IMAGE")
    if name.isdigit():
        raise InvalidArgument(f"backend name {name!r} is all digits", "digits alone mean an ID")
    if name == AUTO:
        raise InvalidArgument(f"backend name {name!r} is reserved", "auto:IMAGE asks for placement")
    if name.startswith("-") or name.strip() != name:
        raise InvalidArgument(f"backend name {name!r} starts with '-' or has outer spaces")
    return name


def split_path(path: str) -> list[str]:
    """`vm-42/disk.0` -> components, each checked; empty components (`a//b`) are refused."""
    if path == "":
        raise InvalidArgument("image path is empty", "write BACKEND:IMAGE, e.g. local:disk.img")
    if path.startswith("/"):
        raise InvalidArgument(f"image path {path!r} is absolute", "paths are relative to the backend")
    parts = path.split("/")
    for part in parts:
        check_name(part, "image name")
    return parts


def parse_address(address: str) -> tuple[str, list[str]]:
    """`BACKEND:IMAGE` -> (backend name or ID, path components)."""
    backend, sep, path = address.partition(":")
    if not sep or not backend:
        raise InvalidArgument(
            f"{address!r} is not of the form BACKEND:IMAGE", "e.g. local:ubuntu.img or 0:vm-42/disk.0"
        )
    return backend, split_path(path)
