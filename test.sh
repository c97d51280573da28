#!/usr/bin/env bash
# Set up, lint (ruff, mypy, the import layers), then run the whole test suite.
# Arguments go to pytest:
#   ./test.sh -m "not slow"     the quick subset (no PostgreSQL, Ceph or iSCSI servers, no long runs)
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
.venv/bin/ruff check tm2fs tests benchmarks
.venv/bin/mypy tm2fs
.venv/bin/lint-imports
# The suite includes schemathesis against the daemon's /openapi.json (tests/test_schemathesis.py).
# pytest's exit 5 (no tests collected) is a failure too: set -e keeps any non-zero status.
exec .venv/bin/python -m pytest -ra "$@"
