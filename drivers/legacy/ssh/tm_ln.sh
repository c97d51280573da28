#!/bin/bash
# LN SRC DST (ssh): a symbolic link on one host; between two hosts, a copy (as tm_clone.sh).
set -eu
# shellcheck source=SCRIPTDIR/../tm_common.sh
. "$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)/tm_common.sh"

[ "$#" -eq 2 ] || fail "usage: $SCRIPT_NAME SRC_HOST:SRC DST_HOST:DST"
SRC_HOST=$(arg_host "$1")
SRC_PATH=$(arg_path "$1")
DST_HOST=$(arg_host "$2")
DST_PATH=$(arg_path "$2")
if ! same_host "$SRC_HOST" "$DST_HOST"; then
    exec "$(dirname -- "${BASH_SOURCE[0]}")/tm_clone.sh" "$1" "$2"
fi
check_path "$SRC_PATH"
check_path "$DST_PATH"
run_on "$SRC_HOST" test -e "$SRC_PATH" || fail "source $SRC_HOST:$SRC_PATH does not exist"
if path_exists "$DST_HOST" "$DST_PATH"; then exists_error "$DST_HOST:$DST_PATH"; fi
make_parent "$DST_HOST" "$DST_PATH"
exec_and_log "cannot link $DST_PATH to $SRC_PATH" run_on "$DST_HOST" ln -s -- "$SRC_PATH" "$DST_PATH"
