#!/usr/bin/env bash
# Build the Debian package from this tree with Debian's tooling (dpkg-buildpackage, dh, pybuild),
# as root on Debian 12 or 13: installs the build dependencies with apt, fetches the pinned wheels
# of debian/vendor-requirements.txt (hash-checked, kept in .cache/vendor-wheels), builds in a copy
# of the tree (dpkg-buildpackage writes beside the source) and leaves the .deb in DIST_DIR
# (default: dist/). Prints the .deb's path.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# Debian's own interpreter and tools, not a pyenv or venv one that may come first on PATH
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
DIST=${1:-$ROOT/dist}

BUILD_PACKAGES=(dpkg-dev debhelper dh-python python3-all python3-setuptools pybuild-plugin-pyproject
                python3-pip)
missing=()
for p in "${BUILD_PACKAGES[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [[ $status == "install ok installed" ]] || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "build-deb: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  for try in 1 2 3; do
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null && break
    ((try < 3)) || exit 1
    sleep $((try * 10))
  done
fi

WHEELS=$ROOT/.cache/vendor-wheels
mkdir -p "$WHEELS"
for try in 1 2 3; do
  python3 -m pip download -q --disable-pip-version-check --no-deps --require-hashes \
    --only-binary=:all: --platform any --implementation py --abi none --python-version 3.11 \
    -r debian/vendor-requirements.txt -d "$WHEELS" >&2 && break
  ((try < 3)) || exit 1
  sleep $((try * 10))
done

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SRC=$WORK/tm2fs
mkdir -p "$SRC"
# the tracked and new files of the tree, as they are now (not .venv, .cache, state...)
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  [[ -e $f || -L $f ]] && printf '%s\0' "$f"
done | tar -c --null -T - | tar -x -C "$SRC"
(cd "$SRC" && WHEELS=$WHEELS dpkg-buildpackage -us -uc -b) > "$WORK/build.log" 2>&1 || {
  tail -40 "$WORK/build.log" >&2
  exit 1
}
mkdir -p "$DIST"
for f in "$WORK"/*.deb "$WORK"/*.buildinfo "$WORK"/*.changes; do
  cp "$f" "$DIST/"
done
ls "$DIST"/tm2fs_*_all.deb | tail -1
