"""The image's install recipe, without Docker: ``scripts/install_keyprep.sh`` (what the
Dockerfile runs) installs keyprep and the pinned CPU torch into a fresh virtual environment
(no system site-packages) from a copy of the repository filtered like Docker's build
context (``.dockerignore``); the result runs, offline, with the bundled template and the
packaged weights.

A few minutes: it runs where ``CI=true`` (``.ci/run``) or ``KEYPREP_TEST_INSTALL=1``, and
is skipped elsewhere. pip's configured indexes must hold the pinned CPU wheel of torch (the
project's machines have it on disk); elsewhere set ``KEYPREP_TORCH_INDEX_URL`` to
``https://download.pytorch.org/whl/cpu``.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from keyprep import __version__

from .conftest import CH2, coarse, write_bids

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.install,
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get('CI', '').lower() != 'true' and os.environ.get('KEYPREP_TEST_INSTALL') != '1',
        reason='installs keyprep into a fresh virtual environment (about 3 min): runs in CI '
               '(CI=true) or with KEYPREP_TEST_INSTALL=1'),
]


def _dockerignore() -> list[str]:
    lines = (REPO / '.dockerignore').read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith('#')]


def _ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rules for the patterns .dockerignore uses: ``name`` or ``*.glob`` at the
    root, ``**/glob`` at any depth."""
    for pat in patterns:
        if pat.startswith('**/'):
            if fnmatch.fnmatch(rel.rsplit('/', 1)[-1], pat[3:]):
                return True
        elif fnmatch.fnmatch(rel, pat):
            return True
    return False


def copy_build_context(dst: Path) -> Path:
    """Copy the repository as ``docker build .`` would send it."""
    patterns = _dockerignore()
    for root, dirs, files in os.walk(REPO):
        rel_root = Path(root).relative_to(REPO).as_posix()
        rel_root = '' if rel_root == '.' else rel_root + '/'
        dirs[:] = [d for d in dirs if not _ignored(rel_root + d, patterns)]
        for f in files:
            rel = rel_root + f
            if not _ignored(rel, patterns):
                (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(Path(root) / f, dst / rel)
    return dst


def test_dockerignore_keeps_what_the_install_needs(tmp_path):
    patterns = _dockerignore()
    for rel in ('setup.py', 'pyproject.toml', 'README.md', 'scripts/install_keyprep.sh', 'requirements.lock',
                'keyprep/__init__.py', 'keyprep/data/report.css'):
        assert not _ignored(rel, patterns), rel
    for rel in ('.venv', 'benchmarks', 'keyprep/__pycache__', 'keyprep.egg-info', 'work'):
        assert _ignored(rel, patterns), rel


def test_install_script_in_a_clean_venv(tmp_path):
    src = copy_build_context(tmp_path / 'context')
    assert not (src / '.venv').exists() and (src / 'scripts' / 'install_keyprep.sh').exists()
    venv = tmp_path / 'venv'
    # an interpreter outside any virtual environment, and nothing inherited from this one
    python = Path(sys.base_exec_prefix) / 'bin' / f'python{sys.version_info[0]}'
    env = {k: v for k, v in os.environ.items()
           if k not in ('VIRTUAL_ENV', 'PYTHONPATH', 'PYTHONHOME')}
    env['PATH'] = os.pathsep.join(p for p in env.get('PATH', '').split(os.pathsep)
                                  if not p.startswith(str(REPO / '.venv')))
    env.setdefault('KEYPREP_TORCH_INDEX_URL', '')
    env['PIP_NO_COMPILE'] = '1'  # the image compiles; the test need not
    proc = subprocess.run(
        ['bash', str(src / 'scripts' / 'install_keyprep.sh'), '--venv', str(venv),
         '--python', str(python), '--torch-variant', 'cpu'],
        env=env, capture_output=True, text=True, check=False, timeout=1200)
    log = '\n'.join(ln for ln in (proc.stdout + proc.stderr).splitlines()
                    if 'is ignored: it is neither a file nor a directory' not in ln)
    assert proc.returncode == 0, log[-4000:]
    assert 'ready in' in log

    cfg = (venv / 'pyvenv.cfg').read_text()
    assert 'include-system-site-packages = false' in cfg
    out = subprocess.run([str(venv / 'bin' / 'keyprep'), '--version'], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == f'keyprep v{__version__}'
    # a regular (not editable) install: the package lives in the venv
    # (then the weights every model would load: the label network's and each learned
    # engine's; those that ship in this checkout must be installed with both cards)
    code = ('import keyprep, torch; from keyprep.pipeline.targets import template_file; '
            'from keyprep.pipeline.engines import learned_models; '
            'from keyprep.pipeline.synth.labeller import default_weights; '
            "print(keyprep.__file__); print(torch.__version__); "
            "print(template_file('MNI152NLin2009aSym')); print(default_weights()); "
            '[print(m.default_weights()) for m in learned_models().values()]')
    where = subprocess.run([str(venv / 'bin' / 'python'), '-c', code], env=env,
                           capture_output=True, text=True, check=True,
                           cwd=tmp_path).stdout.split()
    assert where[0].startswith(str(venv)), where
    assert where[1].startswith('2.13.0') and where[1].endswith('+cpu'), where
    assert Path(where[2]).is_file() and where[2].startswith(str(venv))
    package = Path(where[0]).parent
    shipped = [Path(w) for w in where[3:]
               if (REPO / 'keyprep' / Path(w).relative_to(package)).is_file()]
    assert len(shipped) >= 3, where  # the label network, KeyMorph and DIO
    for weights in shipped:
        assert weights.is_file(), weights
        assert weights.with_suffix('.json').is_file()
        assert (weights.parent / 'MODEL_CARD.md').is_file()
    # every installed distribution at its version in requirements.lock
    freeze = subprocess.run([str(venv / 'bin' / 'python'), '-m', 'pip', 'freeze', '--exclude-editable'],
                            env=env, capture_output=True, text=True, check=True).stdout
    lock = {}
    for line in (REPO / 'requirements.lock').read_text().splitlines():
        if line and not line.startswith('#'):
            name, version = line.split('==')
            lock[name.lower().replace('_', '-')] = version
    installed = {}
    for line in freeze.splitlines():
        if '==' in line:
            name, version = line.split('==')
            installed[name.lower().replace('_', '-')] = version.split('+')[0]
    installed.pop('keyprep', None)
    assert installed and {k: v for k, v in installed.items() if lock.get(k) != v} == {}, \
        f'installed but not as locked: {sorted(set(installed.items()) - set(lock.items()))}'
    for script in ('keyprep-slurm', 'keyprep-demo'):
        subprocess.run([str(venv / 'bin' / script), '--help'], env=env, check=True,
                       capture_output=True)

    # the installed keyprep builds a whole workflow, offline
    ds = write_bids(tmp_path / 'ds', {'01': coarse(CH2, 8.0)})
    res = subprocess.run(
        [str(venv / 'bin' / 'keyprep'), str(ds), str(tmp_path / 'out'), 'participant',
         '-w', str(tmp_path / 'work'), '--boilerplate-only', '--nprocs', '1'],
        env=env, capture_output=True, text=True, check=False, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / 'out' / 'logs' / 'CITATION.md').is_file()
