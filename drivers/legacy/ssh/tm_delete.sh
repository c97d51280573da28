#!/bin/bash
# DELETE DST (ssh): remove DST_HOST:DST (file, link or directory); a missing DST is success.
set -eu
# shellcheck source=SCRIPTDIR/../tm_common.sh
. "$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)/tm_common.sh"

[ "$#" -eq 1 ] || fail "usage: $SCRIPT_NAME DST_HOST:DST"
DST_HOST=$(arg_host "$1")
DST_PATH=$(arg_path "$1")
check_path "$DST_PATH"
exec_and_log "cannot delete $DST_HOST:$DST_PATH" run_on "$DST_HOST" rm -rf -- "$DST_PATH"
