#!/bin/bash
# MV SRC DST (shared): rename SRC to DST, replacing DST atomically; hosts are ignored.
set -eu
# shellcheck source=SCRIPTDIR/../tm_common.sh
. "$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)/tm_common.sh"

[ "$#" -eq 2 ] || fail "usage: $SCRIPT_NAME [HOST:]SRC [HOST:]DST"
SRC_PATH=$(arg_path "$1")
DST_PATH=$(arg_path "$2")
check_path "$SRC_PATH"
check_path "$DST_PATH"
if [ "$SRC_PATH" = "$DST_PATH" ]; then
    log "$SRC_PATH: nothing to move"
    exit 0
fi
path_exists "" "$SRC_PATH" || fail "source $SRC_PATH does not exist"
make_parent "" "$DST_PATH"
# -T: never move into DST when DST is a directory; inside one filesystem this is one rename(2)
exec_and_log "cannot move $SRC_PATH to $DST_PATH" mv -f -T -- "$SRC_PATH" "$DST_PATH"
