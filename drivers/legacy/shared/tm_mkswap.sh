#!/bin/bash
# MKSWAP SIZE DST (shared): a new swap image of SIZE MiB.
set -eu
# shellcheck source=SCRIPTDIR/../tm_common.sh
. "$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)/tm_common.sh"

[ "$#" -eq 2 ] || fail "usage: $SCRIPT_NAME SIZE_MIB [HOST:]DST"
exec "$(dirname -- "${BASH_SOURCE[0]}")/tm_mkimage.sh" "$1" swap "$2"
