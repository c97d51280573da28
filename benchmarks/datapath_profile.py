"""Where the data path's time goes (issue #15): py-spy samples a daemon's threads while they hold
the GIL, during fio 4 KiB random reads (or writes) with O_DIRECT at QD32 on an image on the
mount, and prints the share of samples under each layer.

    .venv/bin/python benchmarks/datapath_profile.py [--rw randread|randwrite] [--seconds 15]
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.daemon import Daemon

PY_SPY = str(Path(sys.executable).with_name("py-spy"))
# (label, a frame that marks it); a sample counts for the first that its stack holds, innermost first
LAYERS = [
    ("driver: the backing file's pread/pwrite", ("FileHandle.", "os.pread", "os.pwrite")),
    ("core: OpenFiles.read/write (size, leases, dirty)", ("OpenFiles.read", "OpenFiles.write")),
    ("fs.py handler (errors, metrics)", ("Operations.read (tm2fs/fs.py", "Operations.write (tm2fs/fs.py")),
    ("pyfuse3: request decoding, reply", ("pyfuse3", "_pyfuse3")),
    ("trio: scheduling, epoll", ("trio/",)),
]


def layer(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):
        for label, marks in LAYERS:
            if any(m in frame for m in marks):
                return label
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rw", default="randread", choices=["randread", "randwrite"])
    parser.add_argument("--seconds", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tm2fs-profile-") as top:
        tmp = Path(top)
        raw = tmp / "profile.txt"
        with Daemon(tmp) as d:
            image = d.mnt / "local" / "profile.img"
            subprocess.run(["fio", "--name=fill", f"--filename={image}", "--rw=write", "--bs=1M",
                            "--size=256M", "--direct=1", "--output=/dev/null"], check=True)
            assert d.proc is not None
            spy = subprocess.Popen([PY_SPY, "record", "--gil", "--nonblocking", "-r", "1000", "-f",
                                    "raw", "-o", str(raw), "-d", str(args.seconds + 2), "-p",
                                    str(d.proc.pid)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
            out = subprocess.run(["fio", "--name=job", f"--filename={image}", f"--rw={args.rw}",
                                  "--bs=4k", "--size=256M", "--direct=1", "--ioengine=libaio",
                                  "--iodepth=32", f"--runtime={args.seconds}", "--time_based",
                                  "--output-format=terse", "--terse-version=3"],
                                 check=True, capture_output=True, text=True).stdout
            spy.wait()
        fields = out.split(";")
        iops = float(fields[7] if args.rw == "randread" else fields[48])
        counts: collections.Counter[str] = collections.Counter()
        for line in raw.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            counts[layer(stack)] += int(n)
        total = sum(counts.values())
        busy_us = total / 1000 / args.seconds * 1e6 / iops if iops else 0.0  # GIL-held time per request
        print(f"fio {args.rw} 4K QD32 O_DIRECT: {iops:,.0f} IOPS; the daemon held the GIL "
              f"{total / 1000:.1f} s of {args.seconds} s, {busy_us:.0f} us per request")
        for label, n in counts.most_common():
            print(f"  {100 * n / total:5.1f}%  {busy_us * n / total:5.1f} us  {label}")


if __name__ == "__main__":
    main()
