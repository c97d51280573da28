#!/usr/bin/env bash
# Set up, then run tm2fs in the foreground on its embedded default: an SQLite pool in ./state,
# a `local` directory backend (./state/backends/local), mounted at ./mnt, control socket in
# ./state. TM2FS_STATE and TM2FS_MNT move them; extra arguments go to the daemon.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$PWD
scripts/setup.sh
STATE=${TM2FS_STATE:-$ROOT/state}
MNT=${TM2FS_MNT:-$ROOT/mnt}
mkdir -p "$STATE"
echo "tm2fs: mounting the pool at $MNT. In another shell:" >&2
echo "  export TM2FS_SOCKET=$STATE/tm2fs.sock PATH=$ROOT/.venv/bin:\$PATH; onestoragebackend list" >&2
exec .venv/bin/tm2fs --state-dir "$STATE" --socket "$STATE/tm2fs.sock" "$@" "$MNT"
