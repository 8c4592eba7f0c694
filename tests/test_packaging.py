"""Packaging: every imported third-party package is a declared dependency, and the lock
(``requirements.lock``, used by scripts/install.sh, scripts/install_keyprep.sh, the
Dockerfile and CI) pins exactly what this environment installed.

CI installs a clean clone through the lock, so the lock check there is the claim "a fresh
install from the lock reproduces the same versions"; the clean-venv install of
tests/test_install_script.py checks the same on the image's recipe.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]


def _imported_top_level_modules() -> set[str]:
    mods: set[str] = set()
    for path in (REPO / 'keyprep').rglob('*.py'):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                mods.update(a.name.split('.')[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods.add(node.module.split('.')[0])
    return {m for m in mods if m not in sys.stdlib_module_names and m != 'keyprep'}


def test_every_imported_package_is_declared():
    declared = {canonicalize_name(Requirement(r).name) for r in md.requires('keyprep') or []
                if 'extra ==' not in r}
    owners = md.packages_distributions()
    undeclared = {}
    for mod in sorted(_imported_top_level_modules()):
        dists = {canonicalize_name(d) for d in owners.get(mod, [])}
        assert dists, f'{mod} is imported by keyprep but no installed distribution provides it'
        if not dists & declared:
            undeclared[mod] = sorted(dists)
    assert not undeclared, f'imported but not in install_requires (setup.py): {undeclared}'


def test_lock_pins_exactly_what_is_installed():
    proc = subprocess.run([sys.executable, str(REPO / 'scripts' / 'lock.py'), '--check'],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, ('requirements.lock and this environment differ (rerun '
                                  'scripts/lock.py after a deliberate upgrade):\n' + proc.stdout
                                  + proc.stderr)


def test_torch_is_pinned_once():
    """torch's version lives in the lock only; the install scripts and the Dockerfile read it."""
    lock = (REPO / 'requirements.lock').read_text()
    assert sum(line.startswith('torch==') for line in lock.splitlines()) == 1
    for rel in ('scripts/install.sh', 'scripts/install_keyprep.sh', 'Dockerfile', '.ci/run'):
        text = (REPO / rel).read_text()
        assert 'torch==' not in text.replace("'^torch=='", ''), rel
