#!/bin/bash
# CONTEXT FILE... DST (ssh): an ISO image (label CONTEXT) of local FILEs, copied to DST_HOST.
set -eu
# shellcheck source=SCRIPTDIR/../tm_common.sh
. "$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)/tm_common.sh"

[ "$#" -ge 2 ] || fail "usage: $SCRIPT_NAME FILE... DST_HOST:DST"
FILES=("${@:1:$#-1}")
DST_HOST=$(arg_host "${!#}")
DST_PATH=$(arg_path "${!#}")
check_path "$DST_PATH"
if path_exists "$DST_HOST" "$DST_PATH"; then exists_error "$DST_HOST:$DST_PATH"; fi
# the FILEs are on this host (the front end): build here, then copy
TMP_DIR=$(mktemp -d)
ISO=$TMP_DIR/context.iso
make_iso "$ISO" "${FILES[@]}"
make_parent "$DST_HOST" "$DST_PATH"
CLEANUP_HOST=$DST_HOST
CLEANUP_PATH=$DST_PATH
copy_file "" "$ISO" "$DST_HOST" "$DST_PATH"
CLEANUP_PATH=""
log "created context image $DST_HOST:$DST_PATH"
