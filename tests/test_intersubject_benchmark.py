"""Smoke test of ``benchmarks/run_intersubject_benchmark.py`` on two small phantom label maps
made here (not the SynthSeg data): one ordered pair, one rotation, antsRigid (sloppy) at 4 mm,
the reference rows, both TSVs, the Markdown summary, resuming; plus the rotation protocol,
the goal lines computed from a table, and the keypoint statistics."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from keyprep.pipeline.benchmark import read_table

BENCH = Path(__file__).resolve().parents[1] / 'benchmarks'


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def bench():
    module = _load('run_intersubject_benchmark')
    yield module
    sys.modules.pop('run_intersubject_benchmark', None)


def phantom(scale=(1.0, 1.0, 1.0), shift=(0.0, 0.0, 0.0)) -> nb.Nifti1Image:
    """A small brain-like label map (generation labels, 2 mm): cerebral WM, cortex and CSF
    shells, ventricles, deep nuclei, hippocampi, cerebellum and brainstem, left/right."""
    shape, res = (64, 72, 60), 2.0
    affine = np.diag([res, res, res, 1.0])
    affine[:3, 3] = -res * (np.asarray(shape) - 1) / 2
    ijk = np.indices(shape).reshape(3, -1).T
    xyz = (ijk * res + affine[:3, 3]) / np.asarray(scale) - np.asarray(shift)
    x, y, z = xyz.T
    lab = np.zeros(len(xyz), dtype=np.int16)
    r = np.sqrt((x / 56) ** 2 + (y / 66) ** 2 + (z / 48) ** 2)
    left = x < 0
    lab[r < 1.0] = 24
    lab[r < 0.94] = np.where(left, 3, 42)[r < 0.94]
    lab[r < 0.8] = np.where(left, 2, 41)[r < 0.8]

    def blob(c, radii, left_label, right_label=None):
        for sign, value in ((-1, left_label), (1, right_label)):
            if value is None:
                continue
            cx = sign * c[0] if right_label is not None else c[0]
            inside = (((x - cx) / radii[0]) ** 2 + ((y - c[1]) / radii[1]) ** 2
                      + ((z - c[2]) / radii[2]) ** 2) < 1
            lab[inside] = value

    blob((12, 4, 10), (6, 20, 8), 4, 43)
    blob((10, -6, 0), (8, 10, 8), 10, 49)
    blob((14, 14, 8), (4, 8, 6), 11, 50)
    blob((24, 4, 0), (5, 10, 8), 12, 51)
    blob((26, -16, -14), (4, 12, 5), 17, 53)
    blob((20, -44, -30), (18, 16, 12), 8, 47)
    blob((0, -18, -30), (8, 8, 16), 16)
    return nb.Nifti1Image(lab.reshape(shape), affine)


@pytest.fixture(scope='module')
def label_maps(tmp_path_factory):
    folder = tmp_path_factory.mktemp('maps')
    phantom().to_filename(folder / 'phantomA.nii.gz')
    phantom((1.07, 0.94, 1.04), (2.0, -3.0, 1.5)).to_filename(folder / 'phantomB.nii.gz')
    return folder


def test_rotation_protocol(bench):
    from keyprep.pipeline import perturb as pt

    seen = set()
    for level in (45.0, 90.0, 135.0, 180.0):
        for mv, fx in (('a', 'b'), ('b', 'a'), ('c', 'a')):
            rot, axes, axis = bench.draw_rotation(3, mv, fx, level)
            mat = np.eye(4)
            mat[:3, :3] = rot
            assert pt.describe_similarity(mat)['angle_deg'] == pytest.approx(level, abs=1e-6)
            assert 1 <= len(axes) <= 3 and np.allclose(rot @ axis, axis)
            assert np.allclose(bench.draw_rotation(3, mv, fx, level)[0], rot)  # seeded
            seen.add(len(axes))
    assert seen == {1, 2, 3}
    assert np.array_equal(bench.draw_rotation(3, 'a', 'b', 0.0)[0], np.eye(3))


def test_missing_label_maps(bench, tmp_path):
    with pytest.raises(SystemExit, match='needs the SynthSeg label maps'):
        bench.main(['--label-maps', str(tmp_path / 'nowhere'), '--out', str(tmp_path / 'o')])


def test_main_rows_and_resume(bench, label_maps, tmp_path):
    args = ['--label-maps', str(label_maps), '--pairs', 'phantomB:phantomA', '--contrasts',
            't1-t1', '--rotations', '20', '--methods', 'antsRigid', '--resolution', '4',
            '--sloppy', '--threads', '1', '--skip-keypoints', '--out', str(tmp_path / 'res'),
            '--work-dir', str(tmp_path / 'work')]
    assert bench.main(args) == 0
    out = tmp_path / 'res'
    tsv, regions_tsv = out / 'intersubject_benchmark.tsv', out / 'intersubject_regions.tsv'
    assert tsv.read_text().splitlines()[0].split('\t') == bench.COLUMNS
    rows = {r['method']: r for r in read_table(tsv, bench.COLUMNS)}
    assert list(rows) == ['none', 'derotate', 'antsRigid']
    for method, row in rows.items():
        assert row['status'] == 'ok', row['status']
        assert row['case'] == 'phantomB-to-phantomA_t1-t1_rot020'
        assert row['rotation_deg'] == 20.0 and row['contrast_pair'] == 't1-t1'
        assert 0.0 <= row['dice_rois'] <= 1.0 and 0.0 <= row['dice_structures'] <= 1.0
        assert row['jac_neg_frac'] == 0.0
        assert row['jac_min'] == pytest.approx(1.0, abs=1e-3)  # rotations: no volume change
        assert math.isnan(row['time_ratio_to_antsAffine'])  # antsAffine was not run
    none, derotate, rigid = rows['none'], rows['derotate'], rows['antsRigid']
    # undoing the 20 degree turn restores much of the overlap; the rigid engine too (T1 to T1:
    # Mattes MI on this 4 mm toy phantom is not reliable across contrasts; seeds 0-2 gave
    # +0.20 to +0.27 here, T2 to T1 -0.14 to +0.14)
    assert derotate['dice_rois'] > none['dice_rois'] + 0.15
    assert rigid['dice_rois'] > none['dice_rois'] + 0.1
    assert rigid['runtime_s'] > 0 and rigid['peak_mem_mb'] >= rigid['baseline_mem_mb'] > 0
    assert rigid['engine'] == 'antsRigid' and none['engine'] == 'reference'
    regions = read_table(regions_tsv, bench.REGION_COLUMNS)
    rois = {(r['method'], r['region']) for r in regions if r['region_kind'] == 'roi'}
    assert ('antsRigid', 'thalamus') in rois and ('none', 'cerebral-wm') in rois
    assert all(0.0 <= float(r['dice']) <= 1.0 for r in regions)
    # the mean over ROIs in the main table is the mean of the region rows
    roi_dice = [float(r['dice']) for r in regions
                if r['method'] == 'antsRigid' and r['region_kind'] == 'roi']
    assert np.mean(roi_dice) == pytest.approx(rigid['dice_rois'], abs=1e-3)
    text = (out / 'intersubject_benchmark.md').read_text()
    assert '## Dice (12 paper ROIs, L/R merged) by rotation level' in text
    assert '| antsRigid |' in text and 'not measured' in text
    assert '| phantomB | phantomA | 20° |' in text
    before = tsv.read_text()
    assert bench.main(args) == 0  # resumed: nothing is rerun
    assert tsv.read_text() == before
    # a failed row is kept as a result, or measured again (and replaced) with --retry-errors
    tsv.write_text(before.replace('\tok\n', '\terror: test\n', 1))
    assert bench.main(args) == 0
    assert tsv.read_text().count('error: test') == 1
    assert bench.main(args + ['--retry-errors']) == 0
    rows = read_table(tsv, bench.COLUMNS)
    assert [r['method'] for r in rows] == ['derotate', 'antsRigid', 'none']
    assert all(r['status'] == 'ok' for r in rows)
    assert len(read_table(regions_tsv, bench.REGION_COLUMNS)) == len(regions)


def test_goal_lines_from_table(bench):
    rows = []
    values = {('keymorphAffine', 0.0): (0.700, 2.0), ('keymorphAffine', 180.0): (0.685, 2.2),
              ('antsAffine', 0.0): (0.730, 30.0), ('antsAffine', 180.0): (0.20, 30.0),
              ('antsSyN', 0.0): (0.76, 90.0), ('antsSyN', 180.0): (0.21, 90.0),
              ('keymorphAffineRefined', 0.0): (0.74, 9.0),
              ('keymorphAffineRefined', 180.0): (0.74, 9.0)}
    for (method, level), (dice, t) in values.items():
        case = f'a-to-b_t1-t1_rot{int(level):03d}'
        rows.append({**{k: math.nan for k in bench.COLUMNS}, 'case': case, 'method': method,
                     'engine': method, 'moving_subject': 'a', 'fixed_subject': 'b',
                     'contrast_pair': 't1-t1', 'rotation_deg': level, 'dice_rois': dice,
                     'dice_structures': dice - 0.05, 'runtime_s': t, 'resolution_mm': 1.0,
                     'sloppy': False, 'seed': 0, 'status': 'ok'})
    lines = '\n'.join(bench.goal_lines(bench.results_frame(rows), 1.0, 2))
    assert 'loss 1.50 points' in lines and '**met**' in lines
    assert 'antsAffine ahead by 3.00 points' in lines and '**NOT met**' in lines
    assert 'median 14.3×' in lines  # 30 s / 2 s and 30 s / 2.2 s
    assert 'keymorphAffineRefined matches or beats antsSyN: 74.00 vs 48.50' in lines
    assert 'more than 1 point below antsSyN at: 0° (74.00 vs 76.00).' in lines


def test_keypoint_statistics():
    from keyprep.pipeline.keymorph import keypoint_analysis as ka

    rng = np.random.default_rng(0)
    cloud = rng.normal(size=(20, 3)) * 30
    mats = [np.array([[1.1, 0.1, 0, 3], [0, 0.9, 0.05, -2], [0, 0, 1, 5]]),
            np.eye(4)[:3]]
    clouds = [cloud] + [cloud @ m[:, :3].T + m[:, 3] for m in mats]
    assert np.allclose(ka.aligned_spread(clouds), 0.0, atol=1e-6)  # affine copies
    noisy = clouds + [cloud + rng.normal(size=cloud.shape) * 2.0]
    assert 0.3 < float(np.median(ka.aligned_spread(noisy))) < 3.0
    assert 'no KeyMorph weights' in ka.unavailable(Path('/nonexistent/weights.pt'))
    assert ka.summary_lines({'status': 'skipped: x'})[-1] == 'Not measured: skipped: x.'


def test_brain_mask_is_the_labels_filled_not_the_nonzero_voxels(bench, tmp_path):
    """The label network's reference mask in the benchmark: the image's exact labels > 0 with
    holes filled, written once beside the image (the image's non-zero voxels, CSF shell and
    background noise included, made every self-check fail)."""
    labels = np.zeros((20, 20, 20), dtype=np.int16)
    labels[4:16, 4:16, 4:16] = 2
    labels[9:11, 9:11, 9:11] = 0  # a hole inside the brain
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    nb.Nifti1Image(labels, affine).to_filename(tmp_path / 'labels.nii.gz')
    image = np.random.default_rng(0).uniform(1, 5, labels.shape).astype(np.float32)
    nb.Nifti1Image(image, affine).to_filename(tmp_path / 'image.nii.gz')
    out = bench.brain_mask(tmp_path / 'image.nii.gz')
    mask = np.asanyarray(nb.load(str(out)).dataobj)
    assert out.name == 'brainmask.nii.gz' and mask.sum() == 12 ** 3
    assert np.allclose(nb.load(str(out)).affine, affine)
    mtime = out.stat().st_mtime_ns
    assert bench.brain_mask(tmp_path / 'image.nii.gz') == out and out.stat().st_mtime_ns == mtime


def test_thick_slices_average_blocks_on_a_grid_of_the_same_field_of_view(bench):
    """1 x 1 x 5 mm from a 1 mm image: each 5-slice block averaged (labels: its middle
    slice), the new voxel centres at the blocks' centres in world space."""
    rng = np.random.default_rng(0)
    data = rng.random((6, 7, 23)).astype(np.float32)
    affine = np.array([[0, -1.0, 0, 10], [1.0, 0, 0, -3], [0, 0, 1.0, 4], [0, 0, 0, 1]])
    out = bench.thick_slices(nb.Nifti1Image(data, affine), 5.0)
    assert out.shape == (6, 7, 4)  # 23 // 5 whole blocks
    assert np.allclose(out.header.get_zooms()[:3], (1, 1, 5))
    got = np.asanyarray(out.dataobj)
    assert np.allclose(got[:, :, 2], data[:, :, 10:15].mean(-1), atol=1e-6)
    centre_new = out.affine @ [2, 3, 1, 1]
    centre_old = affine @ [2, 3, 7, 1]  # block 1 = slices 5..9, centre 7
    assert np.allclose(centre_new, centre_old)
    labels = nb.Nifti1Image(np.arange(23, dtype=np.int16)[None, None].repeat(2, 0).repeat(2, 1),
                            np.eye(4))
    lab = np.asanyarray(bench.thick_slices(labels, 5.0, order=0).dataobj)
    assert lab.dtype == np.int16 and list(lab[0, 0]) == [2, 7, 12, 17]
    with pytest.raises(ValueError):
        bench.thick_slices(nb.Nifti1Image(data, affine), 2.5)
    spec = bench.CaseSpec('training_seg_14', 'training_seg_15', 't1', 't1', 0.0, 5.0)
    assert spec.name == 'seg14-to-seg15_t1-t1_rot000_slice5mm'


def test_carl_checkpoint_check_table_and_verdict(tmp_path):
    """``benchmarks/check_carl_checkpoint.py``: carl minus its start per case, means, and the
    verdict (every case above its start), from a benchmark table; a missing row is 'not
    measured', not a pass."""
    check = _load('check_carl_checkpoint')
    header = 'case\tmethod\tdice_structures\tstatus\n'
    rows = [('a_t1', 'keymorphAffine', 0.60), ('a_t1', 'carl', 0.65),
            ('a_t2', 'keymorphAffine', 0.60), ('a_t2', 'carl', 0.55),
            ('a_t2', 'none', 0.30), ('b_t1', 'carl', 0.9)]
    tsv = tmp_path / 't.tsv'
    tsv.write_text(header + ''.join(f'{c}\t{m}\t{d}\tok\n' for c, m, d in rows))
    lines, verdict = check.summarise(tsv)
    assert lines[2] == '| a_t1 | 60.0 | 65.0 | +5.0 |'
    assert lines[3] == '| a_t2 | 60.0 | 55.0 | -5.0 |'
    assert lines[4] == '| b_t1 | n/a | 90.0 | n/a |'
    assert lines[5] == '| mean | 60.0 | 70.0 | |'
    assert verdict is None
    tsv.write_text(header + ''.join(f'{c}\t{m}\t{d}\tok\n' for c, m, d in rows[:4]))
    assert check.summarise(tsv)[1] is False
    tsv.write_text(header + ''.join(f'{c}\t{m}\t{d}\tok\n' for c, m, d in rows[:2]))
    assert check.summarise(tsv)[1] is True
