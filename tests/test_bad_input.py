"""Bad input: one clear line each, a documented exit code, other participants unaffected,
and nothing written into the input dataset."""

from __future__ import annotations

import json

import nibabel as nb
import numpy as np
import pytest

from keyprep.bids_app.run import run
from keyprep.pipeline import errors as E

from .conftest import CH2BET, coarse, write_bids


@pytest.fixture(scope='module')
def good_image():
    return coarse(CH2BET, 6.0)


def _run(tmp_path, bids, *extra):
    return run([str(bids), str(tmp_path / 'out'), 'participant', '-w', str(tmp_path / 'work'),
                '--boilerplate-only', *extra])


def _tree(path):
    return sorted((p.relative_to(path).as_posix(), p.stat().st_mtime_ns, p.stat().st_size)
                  for p in path.rglob('*'))


def _one_line(capsys, needle):
    err = capsys.readouterr().err
    assert 'Traceback' not in err
    lines = [ln for ln in err.splitlines() if needle in ln]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize('kind, code, needle', [
    ('nan', E.EXIT_DATA, 'NaN'),
    ('empty', E.EXIT_DATA, 'empty'),
    ('4d', E.EXIT_DATA, '4-D'),
    ('truncated', E.EXIT_DATA, 'truncated'),
    ('2d', E.EXIT_DATA, '2-D'),
    ('noanat', E.EXIT_NO_INPUT, 'no anatomical image'),
])
def test_bad_participant_does_not_stop_the_others(tmp_path, capsys, good_image, kind, code,
                                                  needle):
    shape = good_image.shape
    bad = {
        'nan': nb.Nifti1Image(np.where(np.arange(np.prod(shape)).reshape(shape) % 7 == 0,
                                       np.nan, 1.0).astype('f4'), good_image.affine),
        'empty': nb.Nifti1Image(np.zeros(shape, 'f4'), good_image.affine),
        '4d': nb.Nifti1Image(np.zeros(shape + (3,), 'f4') + 1, good_image.affine),
        '2d': nb.Nifti1Image(np.arange(shape[0] * shape[1], dtype='f4').reshape(shape[:2]),
                             good_image.affine),
        'noanat': None,
    }
    if kind == 'truncated':
        tmp = tmp_path / 'x.nii.gz'
        good_image.to_filename(tmp)
        bad['truncated'] = tmp.read_bytes()[:2000]
    bids = write_bids(tmp_path / 'ds', {'01': good_image, '02': bad[kind]})
    before = _tree(bids)
    # the official BIDS validator already refuses a T1w that is not 3-D (exit 16,
    # tests/test_bids_validation.py); keyprep's own check is what is tested here
    extra = ('--skip-bids-validation',) if kind in ('4d', '2d') else ()
    assert _run(tmp_path, bids, *extra) == code
    line = _one_line(capsys, needle)
    assert 'sub-02' in line
    assert _tree(bids) == before
    # the good participant's run was configured; the bad one only has its log
    assert (tmp_path / 'out' / 'sub-01' / 'log').is_dir()
    assert not (tmp_path / 'out' / 'sub-02' / 'anat').exists()
    errs = list((tmp_path / 'out' / 'sub-02' / 'log').glob('*/input_errors.tsv'))
    assert errs and needle in errs[0].read_text()


def test_not_a_bids_dataset(tmp_path, capsys):
    d = tmp_path / 'plain'
    d.mkdir()
    (d / 'image.nii.gz').write_bytes(b'')
    assert _run(tmp_path, d) == E.EXIT_VALIDATION
    assert 'dataset_description.json' in _one_line(capsys, 'not a BIDS dataset')
    assert _run(tmp_path, d, '--skip-bids-validation') == E.EXIT_VALIDATION


def test_invalid_file_names_fail_validation(tmp_path, capsys, good_image):
    bids = write_bids(tmp_path / 'ds', {'01': good_image})
    (bids / 'sub-01' / 'anat' / 'sub-01_scan.nii.gz').write_bytes(b'')
    assert _run(tmp_path, bids) == E.EXIT_VALIDATION
    line = _one_line(capsys, 'BIDS validation')
    assert 'sub-01_scan.nii.gz' in line and '--skip-bids-validation' in line


def test_labels_that_match_nothing(tmp_path, capsys, good_image):
    bids = write_bids(tmp_path / 'ds', {'01': good_image})
    assert _run(tmp_path, bids, '--participant-label', '99') == E.EXIT_NO_MATCH
    _one_line(capsys, 'sub-99')
    assert _run(tmp_path, bids, '--session-label', 'x') == E.EXIT_NO_MATCH
    filt = tmp_path / 'f.json'
    filt.write_text(json.dumps({'t1w': {'acquisition': 'none'}}))
    assert _run(tmp_path, bids, '--bids-filter-file', str(filt)) == E.EXIT_NO_MATCH


def test_missing_target(tmp_path, capsys, good_image):
    bids = write_bids(tmp_path / 'ds', {'01': good_image})
    assert _run(tmp_path, bids, '--target', str(tmp_path / 'nope.nii.gz')) == E.EXIT_NO_INPUT
    _one_line(capsys, 'target image not found')
    assert _run(tmp_path, bids, '--target', 'sub-07') == E.EXIT_NO_INPUT
    capsys.readouterr()
    assert _run(tmp_path, bids, '--target', 'NotATemplate') == E.EXIT_USAGE


def test_boilerplate_only_writes_citation(tmp_path, good_image):
    bids = write_bids(tmp_path / 'ds', {'01': good_image})
    assert _run(tmp_path, bids) == E.EXIT_OK
    text = (tmp_path / 'out' / 'logs' / 'CITATION.md').read_text()
    assert 'antsSyN' in text and 'deepbet' in text
    desc = json.loads((tmp_path / 'out' / 'dataset_description.json').read_text())
    assert desc['DatasetType'] == 'derivative' and desc['GeneratedBy'][0]['Name'] == 'keyprep'
