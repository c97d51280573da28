#!/bin/bash
# DELETE DST (shared): remove DST (a file, a link or a directory); a missing DST is success.
set -eu
# shellcheck source=SCRIPTDIR/../tm_common.sh
. "$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)/tm_common.sh"

[ "$#" -eq 1 ] || fail "usage: $SCRIPT_NAME [HOST:]DST"
DST_PATH=$(arg_path "$1")
check_path "$DST_PATH"
exec_and_log "cannot delete $DST_PATH" rm -rf -- "$DST_PATH"
