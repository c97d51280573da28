#!/bin/bash
# CLONE SRC DST (ssh): a full copy of SRC_HOST:SRC at DST_HOST:DST (streamed between hosts).
set -eu
# shellcheck source=SCRIPTDIR/../tm_common.sh
. "$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)/tm_common.sh"

[ "$#" -eq 2 ] || fail "usage: $SCRIPT_NAME SRC_HOST:SRC DST_HOST:DST"
SRC_HOST=$(arg_host "$1")
SRC_PATH=$(arg_path "$1")
DST_HOST=$(arg_host "$2")
DST_PATH=$(arg_path "$2")
check_path "$SRC_PATH"
check_path "$DST_PATH"
run_on "$SRC_HOST" test -f "$SRC_PATH" || fail "source $SRC_HOST:$SRC_PATH does not exist or is not a file"
if path_exists "$DST_HOST" "$DST_PATH"; then exists_error "$DST_HOST:$DST_PATH"; fi
make_parent "$DST_HOST" "$DST_PATH"
CLEANUP_HOST=$DST_HOST
CLEANUP_PATH=$DST_PATH
copy_file "$SRC_HOST" "$SRC_PATH" "$DST_HOST" "$DST_PATH"
CLEANUP_PATH=""
log "cloned $SRC_HOST:$SRC_PATH to $DST_HOST:$DST_PATH"
