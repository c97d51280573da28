#!/bin/bash
# CONTEXT FILE... DST (shared): an ISO image (label CONTEXT) holding the FILEs, at DST.
set -eu
# shellcheck source=SCRIPTDIR/../tm_common.sh
. "$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)/tm_common.sh"

[ "$#" -ge 2 ] || fail "usage: $SCRIPT_NAME [HOST:]FILE... [HOST:]DST"
FILES=("${@:1:$#-1}")
DST_PATH=$(arg_path "${!#}")
check_path "$DST_PATH"
if path_exists "" "$DST_PATH"; then exists_error "$DST_PATH"; fi
make_parent "" "$DST_PATH"
CLEANUP_PATH=$DST_PATH
make_iso "$DST_PATH" "${FILES[@]}"
CLEANUP_PATH=""
log "created context image $DST_PATH"
