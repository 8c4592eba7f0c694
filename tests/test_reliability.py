"""Reliability (issue 17): nothing is written into the input dataset under any spelling of
the output or work folder, implausible images and memory budgets are refused before any node
runs, one run per work folder, and an interrupted run stops cleanly and resumes.

Each test here failed before the fix it checks; docs/reliability.md lists them with the exit
code and the message of every case."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from keyprep.bids_app.run import run
from keyprep.pipeline import errors as E

from .conftest import write_bids


def _tiny_head(shape=(24, 28, 24), zoom=8.0) -> nb.Nifti1Image:
    """A small synthetic 'head' (a blurred ellipsoid with noise), ``zoom`` mm voxels."""
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing='ij'))
    data = (np.sqrt((grid ** 2).sum(0)) < 0.8) * 100.0 + rng.random(shape) * 5
    aff = np.diag([zoom, zoom, zoom, 1.0])
    aff[:3, 3] = -np.asarray(shape) * zoom / 2
    return nb.Nifti1Image(data.astype('f4'), aff)


def tree_digest(root: Path) -> dict[str, str]:
    """Every entry below ``root``: files by content, folders and symlinks by kind/target."""
    out = {}
    for p in sorted(root.rglob('*')):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = 'link:' + os.readlink(p)
        elif p.is_dir():
            out[rel] = 'dir'
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _stderr_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert 'Traceback' not in err, err
    return [ln for ln in err.splitlines() if ln.strip()]


# ---------------------------------------------------------------------------------------------
# 1. Nothing is written into the input dataset, however the folders are spelled


@pytest.fixture
def dataset(tmp_path):
    return write_bids(tmp_path / 'ds', {'01': _tiny_head()})


def _layouts(tmp_path: Path, ds: Path) -> dict[str, tuple[str, str]]:
    """Spelling -> (output folder, work folder) for every layout that writes into ``ds``."""
    (tmp_path / 'link_to_ds').symlink_to(ds, target_is_directory=True)
    (tmp_path / 'link_to_anat').symlink_to(ds / 'sub-01' / 'anat', target_is_directory=True)
    outside = str(tmp_path / 'out')
    work = str(tmp_path / 'work')
    return {
        'output ds/../ds': (f'{ds}/../{ds.name}', work),
        'output ds/sub-01/..': (f'{ds}/sub-01/..', work),
        'output symlink to the dataset': (str(tmp_path / 'link_to_ds'), work),
        'output symlink to a folder inside it': (str(tmp_path / 'link_to_anat'), work),
        'output below a symlink to the dataset': (str(tmp_path / 'link_to_ds' / 'out'), work),
        'work ds/../ds/work': (outside, f'{ds}/../{ds.name}/work'),
        'work inside derivatives/': (outside, str(ds / 'derivatives' / 'work')),
        'work symlink to the dataset': (outside, str(tmp_path / 'link_to_ds')),
        'output derivatives/ through ..': (
            f'{ds}/derivatives/keyprep/../../sub-01', work),
    }


@pytest.mark.parametrize('spelling', [
    'output ds/../ds', 'output ds/sub-01/..', 'output symlink to the dataset',
    'output symlink to a folder inside it', 'output below a symlink to the dataset',
    'work ds/../ds/work', 'work inside derivatives/', 'work symlink to the dataset',
    'output derivatives/ through ..',
])
def test_no_spelling_writes_into_the_input_dataset(tmp_path, capsys, dataset, spelling):
    out, work = _layouts(tmp_path, dataset)[spelling]
    before = tree_digest(dataset)
    code = run([str(dataset), out, 'participant', '-w', work, '--boilerplate-only'])
    lines = _stderr_lines(capsys)
    assert code == E.EXIT_USAGE, lines
    assert len(lines) == 1 and 'input dataset' in lines[0], lines
    assert tree_digest(dataset) == before  # byte for byte, no new file or folder


def test_derivatives_subfolder_is_the_one_allowed_output_inside(tmp_path, capsys, dataset):
    """``<bids>/derivatives/<name>`` is the BIDS place for derivatives: accepted for the
    output (not for the work folder), and only that folder is written."""
    before = tree_digest(dataset)
    out = dataset / 'derivatives' / 'keyprep'
    code = run([str(dataset), f'{dataset}/../{dataset.name}/derivatives/keyprep',
                'participant', '-w', str(tmp_path / 'work'), '--boilerplate-only'])
    assert code == E.EXIT_OK, capsys.readouterr().err
    after = tree_digest(dataset)
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert changed and all(k == 'derivatives' or k.startswith('derivatives/') for k in changed)
    assert (out / 'dataset_description.json').is_file()
