#!/usr/bin/env bash
# Install keyprep, with its pinned torch, into one Python environment.
#
# This is the one install recipe of keyprep: the Dockerfile runs it to build the image, and
# CI runs it in a clean virtual environment (tests/test_install_script.py), so the image's
# recipe is tested even where no Docker engine runs.
#
#   scripts/install_keyprep.sh [options]
#
#   --venv DIR          create (if needed) a virtual environment in DIR and install into it
#   --python PY         the Python interpreter to install into, or to make the venv with
#                       (default: python3)
#   --editable          pip install -e (development); the default is a regular install
#   --extras LIST       keyprep extras, e.g. test (default: none)
#   --torch-variant V   which torch build: cpu, cu126, cu128, ... (the wheel index of that
#                       name on download.pytorch.org is added); default: whatever pip's
#                       configured indexes give for the pinned version
#   --with-system-packages
#                       also apt-get install the Debian packages the demo uses (mricron-data)
#   --deps-only         install torch and every pinned dependency (requirements.lock), not
#                       keyprep: the Dockerfile's cached layer (needs only requirements.lock)
#
# Every package is installed at its version in requirements.lock (pip -c), so two installs
# a month apart are the same. Environment: KEYPREP_TORCH_SPEC (default: torch's pin in
# requirements.lock), KEYPREP_TORCH_INDEX_URL (an extra
# index with the wanted torch build, instead of the one --torch-variant implies; set but
# empty: only pip's configured indexes, the build is still checked), PIP_* as usual.
# At the end the installation is checked: `keyprep --version`, the imports, the bundled
# template and the packaged skull-stripping weights (nothing is downloaded at run time).
set -euo pipefail

SRC="$(cd "$(dirname "$0")/.." && pwd)"
PY=python3
VENV=""
EDITABLE=""
EXTRAS=""
VARIANT=""
SYSTEM_PACKAGES=0
DEPS_ONLY=0
LOCK="$SRC/requirements.lock"
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) VENV="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --editable) EDITABLE="-e"; shift ;;
    --extras) EXTRAS="$2"; shift 2 ;;
    --torch-variant) VARIANT="$2"; shift 2 ;;
    --with-system-packages) SYSTEM_PACKAGES=1; shift ;;
    --deps-only) DEPS_ONLY=1; shift ;;
    -h|--help) sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install_keyprep.sh: unknown option $1 (see --help)" >&2; exit 64 ;;
  esac
done

say() { echo "install_keyprep.sh: $*"; }

if [ "$SYSTEM_PACKAGES" = 1 ]; then
  if ! dpkg -s mricron-data >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
      mricron-data >/dev/null
    $SUDO rm -rf /var/lib/apt/lists/*
  fi
fi

if [ -n "$VENV" ]; then
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating a virtual environment in $VENV"
    "$PY" -m venv "$VENV"
  fi
  PY="$VENV/bin/python"
fi
"$PY" - <<'EOF'
import sys
if sys.version_info < (3, 10):
    sys.exit(f'install_keyprep.sh: keyprep needs Python >= 3.10, not {sys.version.split()[0]}')
EOF
BIN="$(dirname "$("$PY" -c 'import sys; print(sys.executable)')")"

if [ ! -f "$LOCK" ]; then
  echo "install_keyprep.sh: $LOCK is missing (it pins every dependency)" >&2
  exit 66
fi
# torch first and pinned: an unpinned resolution from PyPI pulls gigabytes of CUDA packages.
TORCH_SPEC=${KEYPREP_TORCH_SPEC:-$(grep -E '^torch==' "$LOCK")}
# KEYPREP_TORCH_INDEX_URL set (even empty) wins over the index that --torch-variant implies;
# empty: pip's configured indexes only (e.g. a local mirror that has the wanted build).
if [ -n "${KEYPREP_TORCH_INDEX_URL+set}" ]; then
  TORCH_INDEX=$KEYPREP_TORCH_INDEX_URL
elif [ -n "$VARIANT" ]; then
  TORCH_INDEX="https://download.pytorch.org/whl/$VARIANT"
else
  TORCH_INDEX=""
fi
say "installing $TORCH_SPEC${TORCH_INDEX:+ (extra index $TORCH_INDEX)}"
"$PY" -m pip install -q -c "$LOCK" ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} "$TORCH_SPEC"

if [ "$DEPS_ONLY" = 1 ]; then
  say "installing the pinned dependencies of $LOCK"
  "$PY" -m pip install -q -r "$LOCK"
  say "dependencies ready (keyprep itself not installed: --deps-only)"
  exit 0
fi

TARGET="$SRC"
if [ -n "$EXTRAS" ]; then TARGET="$SRC[$EXTRAS]"; fi
say "installing keyprep from $SRC${EDITABLE:+ (editable)}"
"$PY" -m pip install -q -c "$LOCK" $EDITABLE "$TARGET"

# The check: the console script, the imports, and every file a run needs offline.
"$BIN/keyprep" --version
"$PY" - "$TORCH_SPEC" "$VARIANT" "$SRC" <<'EOF'
import sys
from pathlib import Path

import ants  # noqa: F401
import bids  # noqa: F401
import deepbet.utils
import nipype  # noqa: F401
import torch

import keyprep
from keyprep.pipeline.engines import available_engines
from keyprep.pipeline.targets import TEMPLATES, template_file

spec, variant, src = sys.argv[1], sys.argv[2], Path(sys.argv[3])
pinned = spec.split('==', 1)[1] if '==' in spec else None
if pinned and torch.__version__.split('+')[0] != pinned:
    sys.exit(f'torch {torch.__version__} is installed, not the pinned {pinned}')
if variant == 'cpu' and torch.version.cuda is not None:
    sys.exit(f'a CPU build of torch was asked for, got CUDA {torch.version.cuda}')
if variant.startswith('cu') and torch.version.cuda is None:
    sys.exit(f'a {variant} build of torch was asked for, got a CPU build')
for name in TEMPLATES:
    path = Path(template_file(name))
    if not path.is_file():
        sys.exit(f'bundled template {name} is missing: {path}')
weights = [Path(deepbet.utils.DATA_PATH) / 'models' / f for f in ('model.pt', 'bbox_model.pt')]
missing = [str(w) for w in weights if not w.is_file()]
if missing:
    sys.exit(f'skull-stripping weights are missing: {", ".join(missing)}')
# Every non-Python file of the source package (report template, model weights, ...) was
# installed with it.
installed = Path(keyprep.__file__).parent
for f in sorted((src / 'keyprep').rglob('*')):
    rel = f.relative_to(src / 'keyprep')
    if not f.is_file() or f.suffix in ('.py', '.pyc') or '__pycache__' in rel.parts:
        continue
    if not (installed / rel).is_file():
        sys.exit(f'packaged file missing from the installation: keyprep/{rel} (package_data '
                 'in setup.py)')
print(f'install_keyprep.sh: keyprep {keyprep.__version__} ready in {sys.prefix} '
      f'(torch {torch.__version__}, CUDA {torch.version.cuda or "none"}; engines: '
      f'{", ".join(available_engines())}; templates: {", ".join(TEMPLATES)})')
EOF
