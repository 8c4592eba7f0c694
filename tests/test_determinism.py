"""Reproducibility: two runs with the same ``--random-seed`` give bit-identical images and
the same QC numbers, one with ``--nprocs 1`` (Nipype's Linear plugin, every node in this
process) and one with ``--nprocs 2`` (MultiProc, nodes in worker processes, in another
order).

Both runs use ``--omp-nthreads 1``: ANTs registration with several ITK threads is not
reproducible (two runs with two threads gave rigid transforms up to about 1 mm and 0.5
degrees apart here, with the Platform or the Pool threader alike), as the README says;
everything else is (conform, deepbet, N4, Atropos, the label network and KeyMorph gave the
same bytes with two threads as well).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd
import pytest

from .conftest import CH2, coarse, rotated_copy, write_bids

pytestmark = pytest.mark.slow

_BIN = Path(sys.executable).parent / 'keyprep'
KEYPREP = str(_BIN) if _BIN.exists() else 'keyprep'

#: QC columns that measure the run, not its results.
RUN_COLUMNS = ('runtime_s', 'peak_mem_mb', 'peak_gpu_mb')


def _outputs(root: Path) -> dict[str, Path]:
    """Result files of a run (logs, reports and figures aside)."""
    skip = ('logs/', '/log/', '/figures/')
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob('*'))
            if p.is_file() and not any(s in '/' + p.relative_to(root).as_posix() for s in skip)
            and p.suffix not in ('.html', '.png')}


def _differences(a: Path, b: Path) -> list[str]:
    """What differs between two output folders: NIfTI data and affines bit for bit, tables
    value for value (run-measuring columns aside), other files byte for byte (JSON sidecars
    are left out: they hold timings)."""
    fa, fb = _outputs(a), _outputs(b)
    diffs = [f'only in one run: {name}' for name in sorted(set(fa) ^ set(fb))]
    for name in sorted(set(fa) & set(fb)):
        pa, pb = fa[name], fb[name]
        if name.endswith(('.nii', '.nii.gz')):
            ia, ib = nb.load(pa), nb.load(pb)
            da, db = np.asanyarray(ia.dataobj), np.asanyarray(ib.dataobj)
            if da.dtype != db.dtype or da.shape != db.shape or \
                    not np.array_equal(da, db, equal_nan=True):
                frac = (float(np.mean(da != db)) if da.shape == db.shape else 1.0)
                diffs.append(f'{name}: data differ ({frac:.2%} of voxels)')
            elif not np.array_equal(ia.affine, ib.affine):
                diffs.append(f'{name}: affines differ')
        elif name.endswith('.tsv'):
            ta, tb = pd.read_csv(pa, sep='\t'), pd.read_csv(pb, sep='\t')
            keep = [c for c in ta.columns if c not in RUN_COLUMNS]
            if list(ta.columns) != list(tb.columns) or len(ta) != len(tb):
                diffs.append(f'{name}: columns or rows differ')
            else:
                diffs += [f'{name}: column {c} differs' for c in keep
                          if not ta[c].equals(tb[c])]
        elif not name.endswith('.json') and pa.read_bytes() != pb.read_bytes():
            diffs.append(f'{name}: bytes differ')
    return diffs


@pytest.fixture(scope='module')
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp('determinism')
    head = rotated_copy(coarse(CH2, 6.0), 10.0, axis=0, shift=(3.0, 0.0, -2.0))
    bids = write_bids(root / 'ds', {'01': head})
    procs = {}
    for nprocs in ('1', '2'):
        # Each run in its own process, as a user runs keyprep: ITK fixes its thread count at
        # its first use in a process, and with --nprocs 1 (Linear) the nodes run in the
        # process of the command, which must not be this test process (other tests have
        # used ANTs in it with the machine's default thread count). The two runs go at the
        # same time (their own work and output folders, one thread a node): the Linear run
        # keeps one core busy, so one after the other left the second core idle for half
        # of the test.
        with (root / f'stderr{nprocs}.txt').open('w') as err:
            procs[nprocs] = subprocess.Popen([
                KEYPREP, str(bids), str(root / f'out{nprocs}'), 'participant',
                '-w', str(root / f'work{nprocs}'),
                '--nprocs', nprocs, '--omp-nthreads', '1', '--sloppy', '--random-seed', '3',
                '--methods', 'antsRigid', 'keymorphAffine',
                '--target', 'MNI152NLin2009aSym:res-6'], stdout=subprocess.DEVNULL, stderr=err)
    codes = {}
    try:
        for nprocs, proc in procs.items():
            proc.wait(timeout=1200)
            err = (root / f'stderr{nprocs}.txt').read_text()
            assert proc.returncode == 0, err[-3000:]
            codes[nprocs] = proc.returncode
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return root, codes


def test_same_seed_same_outputs_with_one_and_two_processes(two_runs):
    root, codes = two_runs
    assert codes == {'1': 0, '2': 0}
    outputs = _outputs(root / 'out1')
    # what is compared: every image of the participant and of the target
    images = [n for n in outputs if n.endswith('.nii.gz')]
    for part in ('desc-preproc_T1w', 'desc-brain_mask', 'seg-tissue_dseg', 'seg-synthseg_dseg',
                 'desc-antsRigid_T1w', 'desc-keymorphAffine_T1w', 'desc-antsRigid_jacobian',
                 'seg-synthseg_desc-keymorphAffine_dseg', 'tpl-MNI152NLin2009aSym_res-6_'):
        assert any(part in n for n in images), part
    assert any(n.endswith('_xfm.txt') for n in outputs)
    assert any(n.endswith('desc-registration_qc.tsv') for n in outputs)
    assert _differences(root / 'out1', root / 'out2') == []


def test_comparison_sees_a_difference(two_runs, tmp_path):
    """The comparison is not blind: a changed voxel and a changed QC number are reported."""
    import shutil

    root, _ = two_runs
    copy = tmp_path / 'out'
    shutil.copytree(root / 'out1', copy)
    mask = next(copy.glob('sub-01/anat/sub-01_desc-brain_mask.nii.gz'))
    img = nb.load(mask)
    data = np.asanyarray(img.dataobj).copy()
    data.flat[0] = 1 - data.flat[0]
    nb.Nifti1Image(data, img.affine, img.header).to_filename(mask)
    qc = next(copy.glob('sub-01/anat/sub-01_desc-registrationsummary_qc.tsv'))
    table = pd.read_csv(qc, sep='\t')
    table.loc[0, 'dice_mean'] += 1e-4
    table.loc[0, 'runtime_s'] += 1.0  # a run-measuring column is not a difference
    table.to_csv(qc, sep='\t', index=False)
    diffs = _differences(root / 'out1', copy)
    assert len(diffs) == 2
    assert 'desc-brain_mask' in diffs[0] and 'dice_mean' in diffs[1]
