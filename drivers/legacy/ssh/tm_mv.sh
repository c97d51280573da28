#!/bin/bash
# MV SRC DST (ssh): a rename on one host (atomic, replaces DST); between two hosts copy + delete.
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
if same_host "$SRC_HOST" "$DST_HOST"; then
    if [ "$SRC_PATH" = "$DST_PATH" ]; then
        log "$SRC_PATH: nothing to move"
        exit 0
    fi
    path_exists "$SRC_HOST" "$SRC_PATH" || fail "source $SRC_HOST:$SRC_PATH does not exist"
    make_parent "$DST_HOST" "$DST_PATH"
    # -T: never move into DST when DST is a directory; inside one filesystem this is one rename(2)
    exec_and_log "cannot move $SRC_PATH to $DST_PATH" \
        run_on "$SRC_HOST" mv -f -T -- "$SRC_PATH" "$DST_PATH"
else
    run_on "$SRC_HOST" test -f "$SRC_PATH" || fail "source $SRC_HOST:$SRC_PATH does not exist or is not a file"
    make_parent "$DST_HOST" "$DST_PATH"
    # copy beside DST, then rename over it: DST is replaced whole or not at all
    TMP_PATH="$DST_PATH.tm-mv-$$"
    CLEANUP_HOST=$DST_HOST
    CLEANUP_PATH=$TMP_PATH
    copy_file "$SRC_HOST" "$SRC_PATH" "$DST_HOST" "$TMP_PATH"
    exec_and_log "cannot move $TMP_PATH to $DST_PATH" \
        run_on "$DST_HOST" mv -f -T -- "$TMP_PATH" "$DST_PATH"
    CLEANUP_PATH=""
    exec_and_log "cannot remove $SRC_HOST:$SRC_PATH" run_on "$SRC_HOST" rm -f -- "$SRC_PATH"
fi
log "moved $SRC_HOST:$SRC_PATH to $DST_HOST:$DST_PATH"
