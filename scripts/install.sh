#!/usr/bin/env bash
# Set up keyprep on a fresh Debian/Ubuntu machine: system packages, a virtual environment
# in .venv with every dependency at its version in requirements.lock (the CPU build of torch),
# and keyprep itself (editable, with test extras).
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi

# Debian packages: Colin27/AAL atlases for the demo and the tests (mricron-data) and
# Chromium for the browser check of the reports.
if command -v apt-get >/dev/null 2>&1; then
  need=()
  for pkg in mricron-data chromium; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
  done
  if [ "${#need[@]}" -gt 0 ]; then
    echo "install.sh: apt-get install ${need[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
      "${need[@]}" >/dev/null
  fi
else
  echo "install.sh: no apt-get; install mricron-data (Colin27 templates) and chromium yourself" >&2
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# Every dependency is pinned in requirements.lock (scripts/lock.py writes it), torch too:
# an unpinned torch pulls gigabytes of CUDA packages.
TORCH_SPEC=${KEYPREP_TORCH_SPEC:-$(grep -E '^torch==' requirements.lock)}
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/pip install -q -c requirements.lock "$TORCH_SPEC"
fi
if ! .venv/bin/python -c "import keyprep, ants, deepbet, nipype, bids" >/dev/null 2>&1 \
   || [ setup.py -nt .venv/.keyprep-installed ] || [ requirements.lock -nt .venv/.keyprep-installed ]; then
  .venv/bin/pip install -q -c requirements.lock -e '.[test]'
  touch .venv/.keyprep-installed
fi
echo "install.sh: ready ($(.venv/bin/keyprep --version))"
