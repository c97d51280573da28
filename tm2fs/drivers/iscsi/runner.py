"""Commands on the target host, each bounded by the backend's TIMEOUT.

Commands are argument lists, never shell strings: run here by `trio.run_process`, or through
`ssh -o BatchMode=yes HOST -- ...` with every remote word shell-quoted (ssh hands the remote shell
one joined string). (Blocking calls go to abandonable worker threads: `tm2fs.drivers.threads`.)
"""

from __future__ import annotations

import errno
import shlex

import trio


class CommandError(OSError):
    """A command that exited non-zero; `stderr` keeps its words for callers that expect some."""

    def __init__(self, err: int, message: str, stderr: str) -> None:
        super().__init__(err, message)
        self.stderr = stderr


class Runner:
    """Runs argument lists on the target host: here, or through ssh (each word shell-quoted)."""

    def __init__(self, ssh: str | None, timeout: float) -> None:
        self.ssh = ssh
        self.timeout = timeout

    def argv(self, args: list[str]) -> list[str]:
        if not self.ssh:
            return args
        return ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, int(self.timeout))}",
                self.ssh, "--", *(shlex.quote(a) for a in args)]

    async def run(self, args: list[str]) -> str:
        """The command's stdout; CommandError (an OSError) if it fails, ETIMEDOUT after TIMEOUT."""
        argv = self.argv(args)
        where = f" on {self.ssh}" if self.ssh else ""
        try:
            with trio.fail_after(self.timeout):
                result = await trio.run_process(argv, stdin=b"", capture_stdout=True, capture_stderr=True,
                                                check=False)
        except trio.TooSlowError:
            raise OSError(errno.ETIMEDOUT, f"iscsi driver: `{args[0]}`{where} timed out after "
                          f"{self.timeout:g}s") from None
        except FileNotFoundError:
            raise OSError(errno.ENOENT, f"iscsi driver: {argv[0]} is not installed") from None
        if result.returncode != 0:
            text = result.stderr.decode(errors="replace").strip()
            words = " ".join(args[:6])
            if self.ssh and result.returncode == 255:
                raise CommandError(errno.EHOSTUNREACH, f"iscsi driver: ssh {self.ssh} failed: {text}", text)
            if args[0] == "tgtadm" and result.returncode == errno.ENOTCONN:
                raise CommandError(errno.ECONNREFUSED, f"iscsi driver: tgtd does not answer on its "
                                   f"control socket{where} ({words}): {text}", text)
            raise CommandError(errno.EIO, f"iscsi driver: `{words}`{where} failed "
                               f"(exit status {result.returncode}): {text}", text)
        return result.stdout.decode(errors="replace")
