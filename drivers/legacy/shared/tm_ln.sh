#!/bin/bash
# LN SRC DST (shared): DST becomes a symbolic link to SRC; hosts are ignored.
set -eu
# shellcheck source=SCRIPTDIR/../tm_common.sh
. "$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)/tm_common.sh"

[ "$#" -eq 2 ] || fail "usage: $SCRIPT_NAME [HOST:]SRC [HOST:]DST"
SRC_PATH=$(arg_path "$1")
DST_PATH=$(arg_path "$2")
check_path "$SRC_PATH"
check_path "$DST_PATH"
[ -e "$SRC_PATH" ] || fail "source $SRC_PATH does not exist"
if path_exists "" "$DST_PATH"; then exists_error "$DST_PATH"; fi
make_parent "" "$DST_PATH"
exec_and_log "cannot link $DST_PATH to $SRC_PATH" ln -s -- "$SRC_PATH" "$DST_PATH"
