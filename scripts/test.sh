#!/usr/bin/env bash
# Set up (scripts/install.sh), then run the whole test suite.
#
# The test files run in parallel, one file per worker (pytest-xdist, --dist loadfile: a
# file's module fixtures are built once): one worker per core, at most one per 6 GB of
# available memory (a label-network test takes 3-4 GB). KEYPREP_TEST_WORKERS sets the number
# (1: one process, no xdist); a -n given on the command line wins.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
workers=${KEYPREP_TEST_WORKERS:-}
if [ -z "$workers" ]; then
  cores=$(nproc 2>/dev/null || echo 1)
  mem=$(awk '/MemAvailable/ {print int($2 / 6291456)}' /proc/meminfo 2>/dev/null || echo 1)
  workers=$(( cores < mem ? cores : mem ))
  [ "$workers" -ge 1 ] || workers=1
fi
if [ "$workers" -gt 1 ]; then
  exec .venv/bin/python -m pytest -n "$workers" --dist loadfile "$@"
fi
exec .venv/bin/python -m pytest "$@"
