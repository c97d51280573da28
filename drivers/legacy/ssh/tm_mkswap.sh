#!/bin/bash
# MKSWAP SIZE DST (ssh): a new swap image of SIZE MiB on DST_HOST.
set -eu
# shellcheck source=SCRIPTDIR/../tm_common.sh
. "$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)/tm_common.sh"

[ "$#" -eq 2 ] || fail "usage: $SCRIPT_NAME SIZE_MIB DST_HOST:DST"
exec "$(dirname -- "${BASH_SOURCE[0]}")/tm_mkimage.sh" "$1" swap "$2"
