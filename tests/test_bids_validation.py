"""Input validation with the official BIDS validator (``bids-validator-deno``, offline):
only errors stop a run (exit 16), with one line and the full report in the output's
``logs/<run_uuid>/bids_validation.json``; warnings never stop it; errors in participants
that are not selected are ignored; ``--skip-bids-validation`` skips it."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from keyprep.bids_app.run import run
from keyprep.pipeline import errors as E

from .conftest import CH2BET, coarse, write_bids


@pytest.fixture(scope='module')
def image():
    return coarse(CH2BET, 8.0)


def _run(tmp_path, bids, *extra):
    return run([str(bids), str(tmp_path / 'out'), 'participant', '-w', str(tmp_path / 'work'),
                '--boilerplate-only', *extra])


def _lines(capsys, needle):
    err = capsys.readouterr().err
    assert 'Traceback' not in err
    return [ln for ln in err.splitlines() if needle in ln]


def _tree(path):
    return sorted((p.relative_to(path).as_posix(), p.stat().st_mtime_ns, p.stat().st_size)
                  for p in path.rglob('*'))


def _reports(tmp_path):
    return sorted((tmp_path / 'out' / 'logs').glob('*/bids_validation.json'))


def _bad_sidecar(bids: Path, subject: str) -> None:
    """A schema error: EchoTime must be a positive number (seconds)."""
    (bids / f'sub-{subject}' / 'anat' / f'sub-{subject}_T1w.json').write_text(
        json.dumps({'EchoTime': 'long'}))


def test_valid_dataset_passes_and_warnings_do_not_stop(tmp_path, capsys, image):
    bids = write_bids(tmp_path / 'ds', {'01': image, '02': image})
    before = _tree(bids)
    assert _run(tmp_path, bids) == E.EXIT_OK
    (line,) = _lines(capsys, 'BIDS validation')
    (report_file,) = _reports(tmp_path)
    assert str(report_file) in line
    n_warnings = int(re.search(r'0 errors, (\d+) warning', line).group(1))
    report = json.loads(report_file.read_text())
    issues = report['issues']['issues']
    assert not [i for i in issues if i['severity'] == 'error']
    # the dataset has no README, no Authors, bare sidecars: warnings, and the run went on
    assert n_warnings == report['keyprep']['warnings'] > 0
    assert {'README_FILE_MISSING', 'SIDECAR_KEY_RECOMMENDED'} <= {i['code'] for i in issues}
    assert report['keyprep']['validator'].startswith('bids-validator-deno ')
    assert sorted(report['summary']['subjects']) == ['01', '02']
    assert _tree(bids) == before  # nothing written into the input dataset
    assert not [p for p in report_file.parent.iterdir() if p.name.startswith('.')]


def test_schema_error_fails_with_the_validation_code(tmp_path, capsys, image):
    bids = write_bids(tmp_path / 'ds', {'01': image})
    _bad_sidecar(bids, '01')
    before = _tree(bids)
    assert _run(tmp_path, bids) == E.EXIT_VALIDATION
    (line,) = _lines(capsys, 'BIDS validation')
    assert 'JSON_SCHEMA_VALIDATION_ERROR[EchoTime] sub-01/anat/sub-01_T1w.json' in line
    assert '--skip-bids-validation' in line
    (report_file,) = _reports(tmp_path)
    assert str(report_file) in line
    report = json.loads(report_file.read_text())
    errors = [i for i in report['issues']['issues'] if i['severity'] == 'error']
    assert {(i['code'], i['location']) for i in errors} == {
        ('JSON_SCHEMA_VALIDATION_ERROR', '/sub-01/anat/sub-01_T1w.json')}
    assert report['keyprep']['errors'] == 1
    assert _tree(bids) == before
    # nothing else was done: no derivatives, no pybids index
    assert not (tmp_path / 'out' / 'dataset_description.json').exists()
    assert not (tmp_path / 'work' / 'bids_db').exists()


def test_image_that_is_not_3d_is_a_validation_error(tmp_path, capsys, image):
    img4d = nb.Nifti1Image(np.ones(image.shape + (2,), 'f4'), image.affine)
    bids = write_bids(tmp_path / 'ds', {'01': image, '02': img4d})
    assert _run(tmp_path, bids) == E.EXIT_VALIDATION
    (line,) = _lines(capsys, 'BIDS validation')
    assert 'T1W_FILE_WITH_TOO_MANY_DIMENSIONS sub-02/anat/sub-02_T1w.nii.gz' in line


def test_errors_of_participants_not_selected_are_ignored(tmp_path, capsys, image):
    bids = write_bids(tmp_path / 'ds', {'01': image, '02': image})
    _bad_sidecar(bids, '02')
    assert _run(tmp_path, bids, '--participant-label', '01') == E.EXIT_OK
    (line,) = _lines(capsys, 'BIDS validation')
    assert '0 errors (and 1 in participants not selected, ignored)' in line
    report = json.loads(_reports(tmp_path)[0].read_text())
    assert report['keyprep']['errors_ignored_other_participants'] == 1
    assert report['keyprep']['participants'] == ['01']
    assert _run(tmp_path, bids, '--participant-label', '02') == E.EXIT_VALIDATION
    assert 'sub-02_T1w.json' in _lines(capsys, 'BIDS validation')[0]


def test_skip_bids_validation_skips_it(tmp_path, capsys, image):
    bids = write_bids(tmp_path / 'ds', {'01': image})
    _bad_sidecar(bids, '01')
    assert _run(tmp_path, bids, '--skip-bids-validation') == E.EXIT_OK
    assert not _lines(capsys, 'BIDS validation')
    assert not _reports(tmp_path)


def test_missing_validator_is_one_line_not_a_silent_skip(tmp_path, capsys, image,
                                                        monkeypatch):
    """Without the validator's package (import blocked), validation is refused with the
    missing-requirement code (66) and the package's name; --skip-bids-validation works."""
    bids = write_bids(tmp_path / 'ds', {'01': image})
    monkeypatch.setitem(sys.modules, 'bids_validator_deno', None)
    assert _run(tmp_path, bids) == E.EXIT_NO_INPUT
    (line,) = _lines(capsys, 'BIDS validator is not installed')
    assert 'bids-validator-deno' in line and '--skip-bids-validation' in line
    assert _run(tmp_path, bids, '--skip-bids-validation') == E.EXIT_OK


def test_validator_that_cannot_start_under_an_address_space_limit(tmp_path, image):
    """Deno (V8) reserves more than 32 GB of address space: under ``ulimit -v`` 6 GB (a
    scheduler's h_vmem) it cannot start. That is one line naming the limit, exit 66, and
    --skip-bids-validation goes on."""
    import resource
    import subprocess

    bids = write_bids(tmp_path / 'ds', {'01': image})

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (6 * 2 ** 30, 6 * 2 ** 30))

    def keyprep(*extra):
        return subprocess.run(
            [sys.executable, '-m', 'keyprep', str(bids), str(tmp_path / 'out'), 'participant',
             '-w', str(tmp_path / 'work'), '--boilerplate-only', *extra],
            preexec_fn=limit, capture_output=True, text=True, timeout=300, check=False)

    res = keyprep()
    assert res.returncode == E.EXIT_NO_INPUT, res.stderr[-2000:]
    assert 'Traceback' not in res.stderr
    (line,) = [ln for ln in res.stderr.splitlines() if 'BIDS validator' in ln]
    assert 'cannot run here' in line and 'address-space limit of 6.0 GB' in line
    assert '--skip-bids-validation' in line
    assert keyprep('--skip-bids-validation').returncode == E.EXIT_OK
