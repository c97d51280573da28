#!/usr/bin/env bash
# Set up everything tm2fs needs on a Debian 12/13 machine, as root: Debian packages and a virtual
# env (.venv) made from the system Python with --system-site-packages, so that Debian's
# python3-rados / python3-rbd bindings (not on PyPI) are importable. Idempotent and quick when
# already done: apt runs only for missing packages, pip only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

PACKAGES=(
  fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv   # pyfuse3 builds against libfuse3
  e2fsprogs util-linux fio qemu-utils file genisoimage          # tests and benchmarks use them
  postgresql pgbouncer sqlite3 procps psmisc                    # the pool store's engines, a pooler
  tgt libiscsi-bin qemu-block-extra                             # iSCSI: userspace target, initiator
  ceph-mon ceph-osd ceph-mgr ceph-common python3-rados python3-rbd rbd-fuse  # Ceph: test cluster
  python3-prometheus-client                                     # metrics (0.16 on 12, 0.21 on 13)
  libvirt-daemon-system libvirt-clients qemu-system-x86         # native attachments: TCG guests
  mmdebstrap systemd-container              # fresh Debian roots for the package test, booted
)

missing=()
for p in "${PACKAGES[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [[ $status == "install ok installed" ]] || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  # The services these packages would start (PostgreSQL, PgBouncer, tgtd, libvirtd...) are not
  # ours to run: the tests start their own, on their own ports and sockets, and a system
  # libvirtd found running would be used with its own qemu.conf. policy-rc.d says "not now".
  policy=/usr/sbin/policy-rc.d
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy"
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The system interpreter, not a pyenv or other one on PATH: it is the one Debian's bindings fit.
PY=/usr/bin/python3
if [[ ! -x .venv/bin/python ]] || ! .venv/bin/python -c 'import sys; sys.exit(0)' 2>/dev/null; then
  rm -rf .venv
  "$PY" -m venv --system-site-packages .venv
fi
stamp=.venv/.tm2fs-installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
  echo "setup: installing tm2fs and its Python dependencies into .venv" >&2
  .venv/bin/pip install -q --disable-pip-version-check -e ".[test]"
  touch "$stamp"
fi
