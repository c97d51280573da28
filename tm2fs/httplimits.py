"""How much of the daemon the control socket's callers may hold: deadlines, and connection shares.

Why: every connection is a file descriptor, and the FUSE data path needs descriptors too (an open
image holds one or more). Unbounded, one local user holding ~1,000 half-open connections used up
the daemon's open-file limit: the API stopped answering and every image opened on the mount
answered EIO, for everyone. So the soft RLIMIT_NOFILE is raised to the hard one at start, the
API's connections are capped well under it — in all and per peer uid, so one user cannot take the
others' share; root has a share of its own — and every phase of a connection has a deadline
(httpserver.py enforces them).
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

log = logging.getLogger(__name__)

# the daemon's --api-* options default to these variables (tests shorten the timeouts with them)
ENV = {"header_timeout": "TM2FS_API_HEADER_TIMEOUT", "idle_timeout": "TM2FS_API_IDLE_TIMEOUT",
       "body_timeout": "TM2FS_API_BODY_TIMEOUT", "max_connections": "TM2FS_API_MAX_CONNECTIONS",
       "max_per_uid": "TM2FS_API_MAX_PER_UID"}


@dataclass(frozen=True)
class Limits:
    header_timeout: float = 10.0  # a request's head must arrive whole within this
    idle_timeout: float = 60.0  # a kept-alive connection waits this long for the next request
    body_timeout: float = 60.0  # a body (either way) that moves no byte this long is dropped
    max_connections: int = 0  # unprivileged callers' connections in all (root: as many again);
    max_per_uid: int = 0  # one uid's; 0 for either: sized from the open-file limit (sized())

    def sized(self, nofile: int | None = None) -> Limits:
        """The zero caps filled in from the soft open-file limit: the API (root's share plus
        everyone else's) gets at most an eighth of the descriptors, the data path the rest."""
        if nofile is None:
            nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        total = self.max_connections or max(8, min(1024, nofile // 16))
        return replace(self, max_connections=total,
                       max_per_uid=self.max_per_uid or max(2, min(256, total // 4)))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The daemon's --api-* options; each defaults to its TM2FS_API_* variable, then Limits."""
    group = parser.add_argument_group(
        "control socket limits", "what one caller of the control socket may hold (root has a "
        "share of its own); the caps default to a share of the open-file limit")
    helps = {"header_timeout": "a request's head must arrive whole within this",
             "idle_timeout": "a kept-alive connection is closed after this long without a request",
             "body_timeout": "an upload or download that moves no byte this long is dropped",
             "max_connections": "connections of all users but root, in all (root may hold as "
                                "many again; 0: 1/16 of the open-file limit, at most 1024)",
             "max_per_uid": "connections of one user (0: a quarter of --api-max-connections)"}
    for name, help in helps.items():
        timeout = name.endswith("timeout")
        kind = _number(float if timeout else int, zero_ok=not timeout)
        default = getattr(Limits(), name)
        if value := os.environ.get(ENV[name]):
            try:
                default = kind(value)
            except argparse.ArgumentTypeError as e:
                parser.error(f"${ENV[name]}: {e}")
        group.add_argument(f"--api-{name.replace('_', '-')}", dest=f"api_{name}", type=kind,
                           default=default,
                           metavar="SECONDS" if timeout else "N",
                           help=f"{help} (default: ${ENV[name]} or %(default)s)")


def _number(kind: type[float] | type[int], zero_ok: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < 0 or (value == 0 and not zero_ok) or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{text} is out of range (must be > 0)")
        return value

    return parse


def from_arguments(args: argparse.Namespace) -> Limits:
    return Limits(**{name: getattr(args, f"api_{name}") for name in ENV})


_configured = Limits()


def configure(limits: Limits) -> None:
    """The daemon's limits, from its options; serve_unix uses them unless given others."""
    global _configured
    _configured = limits


def configured() -> Limits:
    return _configured


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one (a select()-free trio program has no reason
    to stay at 1,024); the soft limit in force after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, e)
    return soft


class Gate:
    """Counts the connections each uid holds; says why a new one is refused, if it is."""

    WARN_EVERY = 60.0

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.held: Counter[int] = Counter()
        self.others = 0  # connections of every uid but root
        self._warned: dict[int, float] = {}

    def enter(self, uid: int) -> str | None:
        """Admit a connection of `uid` (None), or the reason it is refused."""
        cap, held = self.limits, self.held[uid]
        if uid == 0 and held >= cap.max_connections:
            why = f"root holds {held} connections to the control socket, its share"
        elif uid != 0 and held >= cap.max_per_uid:
            why = f"uid {uid} holds {held} connections to the control socket, its share"
        elif uid != 0 and self.others >= cap.max_connections:
            why = (f"the control socket serves {self.others} connections of unprivileged "
                   "users, its limit")
        else:
            self.held[uid] += 1
            self.others += uid != 0
            return None
        now = time.monotonic()
        if now - self._warned.get(uid, -self.WARN_EVERY) >= self.WARN_EVERY:
            self._warned[uid] = now
            log.warning("refusing connections: %s", why)
        return why

    def leave(self, uid: int) -> None:
        self.held[uid] -= 1
        if not self.held[uid]:
            del self.held[uid]
        self.others -= uid != 0
