#!/bin/bash
# MKIMAGE SIZE FSTYPE DST (ssh): a new image of SIZE MiB on DST_HOST; raw = a sparse file.
set -eu
# shellcheck source=SCRIPTDIR/../tm_common.sh
. "$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)/tm_common.sh"

[ "$#" -eq 3 ] || fail "usage: $SCRIPT_NAME SIZE_MIB FSTYPE DST_HOST:DST"
SIZE=$1
FSTYPE=$2
DST_HOST=$(arg_host "$3")
DST_PATH=$(arg_path "$3")
check_size "$SIZE"
check_fstype "$FSTYPE"
check_path "$DST_PATH"
if path_exists "$DST_HOST" "$DST_PATH"; then exists_error "$DST_HOST:$DST_PATH"; fi
make_parent "$DST_HOST" "$DST_PATH"
CLEANUP_HOST=$DST_HOST
CLEANUP_PATH=$DST_PATH
make_raw "$DST_HOST" "$DST_PATH" "$SIZE"
make_filesystem "$DST_HOST" "$DST_PATH" "$FSTYPE" "$SIZE"
CLEANUP_PATH=""
log "created $DST_HOST:$DST_PATH ($SIZE MiB, $FSTYPE)"
