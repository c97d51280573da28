#!/bin/bash
# CLONE SRC DST (shared): a full copy of SRC at DST; hosts are ignored (shared filesystem).
set -eu
# shellcheck source=SCRIPTDIR/../tm_common.sh
. "$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)/tm_common.sh"

[ "$#" -eq 2 ] || fail "usage: $SCRIPT_NAME [HOST:]SRC [HOST:]DST"
SRC_PATH=$(arg_path "$1")
DST_PATH=$(arg_path "$2")
check_path "$SRC_PATH"
check_path "$DST_PATH"
[ -f "$SRC_PATH" ] || fail "source $SRC_PATH does not exist or is not a file"
if path_exists "" "$DST_PATH"; then exists_error "$DST_PATH"; fi
make_parent "" "$DST_PATH"
CLEANUP_PATH=$DST_PATH
copy_file "" "$SRC_PATH" "" "$DST_PATH"
CLEANUP_PATH=""
log "cloned $SRC_PATH to $DST_PATH"
