"""QC formulas: Dice and Jacobian statistics in closed form."""

from __future__ import annotations

import numpy as np
import pytest

from keyprep.pipeline import qc


def test_dice_identical_and_disjoint():
    a = np.array([[0, 1, 1], [2, 2, 3]])
    assert qc.dice_per_label(a, a) == {1: 1.0, 2: 1.0, 3: 1.0}
    b = np.where(a == 1, 0, a)
    assert qc.dice_per_label(a, b)[1] == 0.0


def test_dice_closed_form_on_shifted_boxes():
    a = np.zeros((20, 20, 20), int)
    b = np.zeros_like(a)
    a[2:12, 2:12, 2:12] = 5
    b[4:14, 2:12, 2:12] = 5  # shifted by 2 voxels along one axis: overlap 8/10
    assert qc.dice_per_label(a, b)[5] == pytest.approx(0.8)


def test_dice_shape_mismatch():
    with pytest.raises(ValueError, match='differ in shape'):
        qc.dice_per_label(np.zeros((2, 2)), np.zeros((2, 3)))


def test_jacobian_stats_mask_and_log():
    jac = np.array([[2.0, 0.5], [1.0, -3.0]])
    mask = np.array([[1, 1], [0, 0]], bool)
    s = qc.jacobian_stats(jac, mask)
    assert s['jac_min'] == 0.5 and s['jac_max'] == 2.0 and s['jac_neg_frac'] == 0.0
    assert s['logjac_std'] == pytest.approx(np.log(2.0))


@pytest.mark.parametrize('dice, neg, expected', [
    (0.9, 0.0, 'pass'), (qc.DICE_WARN - 1e-3, 0.0, 'warn'), (qc.DICE_FAIL - 1e-3, 0.0, 'fail'),
    (0.9, 1e-4, 'warn'), (0.9, qc.NEG_FAIL + 1e-3, 'fail'), (float('nan'), 0.0, 'fail'),
])
def test_status_thresholds(dice, neg, expected):
    assert qc.qc_status(dice, {'jac_neg_frac': neg, 'logjac_std': 0.1})[0] == expected


@pytest.mark.parametrize('dice, expected', [
    (0.50, 'pass'), (qc.STRUCTURE_DICE_WARN - 1e-3, 'warn'), (qc.STRUCTURE_DICE_FAIL - 1e-3, 'fail'),
])
def test_structure_status_thresholds(dice, expected):
    """32 structures overlap less than 3 tissue classes: their own thresholds, named in the
    reason."""
    status, reason = qc.qc_status(dice, {'jac_neg_frac': 0.0, 'logjac_std': 0.1},
                                  what='mean structure Dice', thresholds=qc.dice_thresholds('synthseg'))
    assert status == expected
    assert qc.qc_status(dice, {'jac_neg_frac': 0.0, 'logjac_std': 0.1})[0] != 'pass'  # tissue: stricter
    if expected != 'pass':
        assert reason.startswith('mean structure Dice') and str(qc.dice_thresholds('synthseg')[expected == 'warn']) in reason


def _label_files(tmp_path, ref, test, prefix='', zooms=(2.0, 2.0, 2.0)):
    import nibabel as nb

    aff = np.diag([*zooms, 1.0])
    out = []
    for name, data in (('ref', ref), ('test', test)):
        f = tmp_path / f'{prefix}{name}.nii.gz'
        nb.Nifti1Image(np.asarray(data, np.int16), aff).to_filename(f)
        out.append(str(f))
    return out


def test_structure_rows_with_known_overlap(tmp_path):
    """Per-structure Dice, volumes and the mean over the structures present in the target."""
    from keyprep.pipeline.qcreport import LONG_COLUMNS, label_set_rows

    ref = np.zeros((20, 20, 20), int)
    test = np.zeros_like(ref)
    ref[2:12, 2:12, 2:12] = 17       # left hippocampus, 1000 voxels
    test[4:14, 2:12, 2:12] = 17      # shifted by 2: overlap 800 -> Dice 0.8
    ref[14:18, 14:18, 14:18] = 53    # right hippocampus, 64 voxels, absent from the test: 0
    test[0:2, 0:2, 0:2] = 4          # a structure only in the moving labels: 0, not averaged
    lut = {17: 'Left-Hippocampus', 53: 'Right-Hippocampus', 4: 'Left-Lateral-Ventricle',
           10: 'Left-Thalamus'}      # thalamus absent from both: NaN
    groups = {17: 'hippocampus', 53: 'hippocampus', 4: 'lateral-ventricles'}
    rows, stats = label_set_rows(*_label_files(tmp_path, ref, test), lut, 'synthseg', groups)
    by = {r['label_name']: r for r in rows}
    assert [r['label_index'] for r in rows] == [4, 10, 17, 53]
    assert by['Left-Hippocampus']['dice'] == pytest.approx(0.8)
    assert by['Right-Hippocampus']['dice'] == 0.0
    assert by['Left-Lateral-Ventricle']['dice'] == 0.0
    assert np.isnan(by['Left-Thalamus']['dice'])
    assert by['Left-Hippocampus']['target_cm3'] == pytest.approx(8.0)  # 1000 x 8 mm3
    assert by['Left-Lateral-Ventricle']['warped_cm3'] == pytest.approx(0.064)
    assert by['Right-Hippocampus']['structure_group'] == 'hippocampus'
    assert stats == {'mean': pytest.approx(0.4), 'min': 0.0, 'n': 2}
    assert set(rows[0]) <= set(LONG_COLUMNS)


def test_registration_rows_per_structure_and_tissue(tmp_path):
    """The long table has one row per structure and per tissue class; the summary's status
    follows the mean structure Dice while the tissue Dice stays in its own columns."""
    import nibabel as nb

    from keyprep.pipeline.qcreport import LONG_COLUMNS, SUMMARY_COLUMNS, registration_qc_rows
    from keyprep.pipeline.synth.labels import BRAIN_OUTPUT_LABELS

    shape = (24, 24, 24)
    struct_ref = np.zeros(shape, int)
    struct_ref[2:12, 2:12, 2:12] = 2     # left cerebral WM
    struct_ref[12:22, 2:12, 2:12] = 41   # right cerebral WM
    struct_test = np.zeros(shape, int)
    struct_test[2:12, 2:12, 2:12] = 2    # perfect
    struct_test[12:22, 2:12, 2:12] = 0   # missing: Dice 0 -> mean 0.5 -> warn
    tissue = np.zeros(shape, int)
    tissue[2:22, 2:12, 2:12] = 2
    t_ref, t_test = _label_files(tmp_path, tissue, tissue, prefix='tissue_')
    s_ref, s_test = _label_files(tmp_path, struct_ref, struct_test)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    mask, jac = tmp_path / 'mask.nii.gz', tmp_path / 'jac.nii.gz'
    nb.Nifti1Image((tissue > 0).astype(np.uint8), aff).to_filename(mask)
    nb.Nifti1Image(np.ones(shape, np.float32), aff).to_filename(jac)
    record = {'method': 'antsRigid', 'transform_kind': 'linear', 'runtime_s': 1.0,
              'peak_mem_mb': 10.0, 'device': 'cpu', 'threads': 1, 'seed': 3,
              'versions': {'keyprep': 'x'}}
    kw = dict(target_dseg=t_ref, warped_dseg=t_test, target_mask=str(mask), jacobian=str(jac),
              record=record, label_set='tissue', lut={1: 'GM', 2: 'WM', 3: 'CSF'},
              subject='01', session=None, source='bids:raw:sub-01/anat/sub-01_T1w.nii.gz',
              target='tpl')
    long, summary = registration_qc_rows(
        **kw, target_synthseg=s_ref, warped_synthseg=s_test,
        synthseg_meta={'NetworkWeightsSha256': 'ab' * 32, 'NetworkTrainingStep': 50})
    assert list(long.columns) == list(LONG_COLUMNS)
    assert list(summary.columns) == list(SUMMARY_COLUMNS)
    synth = long[long['label_set'] == 'synthseg']
    assert len(synth) == len(BRAIN_OUTPUT_LABELS) == 32
    assert len(long[long['label_set'] == 'tissue']) == 3
    dice = synth.set_index('label_name')['dice']
    assert dice['Left-Cerebral-White-Matter'] == 1.0
    assert dice['Right-Cerebral-White-Matter'] == 0.0
    assert dice.drop(['Left-Cerebral-White-Matter', 'Right-Cerebral-White-Matter']).isna().all()
    row = summary.iloc[0]
    assert row['label_set'] == 'synthseg' and row['n_labels'] == 2
    assert row['dice_mean'] == pytest.approx(0.5) and row['dice_min'] == 0.0
    assert row['tissue_dice_mean'] == 1.0  # the tissue Dice stays available
    # 0.5 passes the structures' thresholds (it would warn as a tissue Dice)
    assert row['status'] == 'pass' and not row['status_reason']
    assert row['synthseg_weights_sha256'] == 'ab' * 32 and row['synthseg_weights_step'] == 50
    # without structure labels: the tissue Dice sets the status, as before
    long_t, summary_t = registration_qc_rows(**kw)
    assert set(long_t['label_set']) == {'tissue'}
    assert summary_t.iloc[0]['label_set'] == 'tissue'
    assert summary_t.iloc[0]['dice_mean'] == 1.0 and summary_t.iloc[0]['status'] == 'pass'
    # a label network that is not validated yet: structure rows are reported, the status
    # rests on the tissue classes and says why
    long_u, summary_u = registration_qc_rows(
        **kw, target_synthseg=s_ref, warped_synthseg=s_test,
        synthseg_meta={'NetworkTrusted': False, 'NetworkHeldOutDice': 0.02})
    assert len(long_u[long_u['label_set'] == 'synthseg']) == 32
    row_u = summary_u.iloc[0]
    assert row_u['label_set'] == 'tissue' and row_u['status'] == 'pass'
    assert 'not validated' in row_u['status_reason'] and '0.02' in row_u['status_reason']
    # the structure Dice is always in its own, explicitly named columns
    assert row_u['structure_dice_mean'] == pytest.approx(0.5) and row_u['structure_dice_min'] == 0.0
    assert row_u['tissue_dice_mean'] == 1.0
    # a trusted network whose labels of the moving image failed their self-check: the
    # structure Dice is reported but does not set the status, which is at least warn
    long_c, summary_c = registration_qc_rows(
        **kw, target_synthseg=s_ref, warped_synthseg=s_ref,
        synthseg_meta={'NetworkTrusted': True,
                       'LabelCheck': {'ok': False, 'failed': ['left_right', 'mask_agreement']}})
    row_c = summary_c.iloc[0]
    assert row_c['label_set'] == 'tissue' and row_c['structure_dice_mean'] == 1.0
    assert row_c['status'] == 'warn' and 'self-check failed' in row_c['status_reason']
    assert row_c['labels_check'] == 'failed: left_right,mask_agreement'
    # and a passing self-check leaves a trusted network's structure Dice in charge
    _, summary_ok = registration_qc_rows(
        **kw, target_synthseg=s_ref, warped_synthseg=s_test,
        synthseg_meta={'NetworkTrusted': True, 'LabelCheck': {'ok': True, 'failed': []}})
    assert summary_ok.iloc[0]['label_set'] == 'synthseg'
    assert summary_ok.iloc[0]['labels_check'] == 'ok'
    assert not summary_ok.iloc[0]['labels_in_objective']
    # an engine that aligned those very labels (DIO's prompting): their Dice is reported,
    # the status rests on the independent tissue classes, and the reason says so
    prompted = dict(record, extras={'labels_in_objective': True})
    _, summary_p = registration_qc_rows(
        **dict(kw, record=prompted), target_synthseg=s_ref, warped_synthseg=s_test,
        synthseg_meta={'NetworkTrusted': True, 'LabelCheck': {'ok': True, 'failed': []}})
    row_p = summary_p.iloc[0]
    assert row_p['labels_in_objective'] and row_p['label_set'] == 'tissue'
    assert row_p['dice_mean'] == 1.0 and row_p['structure_dice_mean'] == pytest.approx(0.5)
    assert row_p['status'] == 'pass' and 'not an independent check' in row_p['status_reason']


def test_summary_sidecar_names_each_dice():
    """The data dictionary says which Dice each column holds (structure or tissue)."""
    from keyprep.pipeline.qcreport import SUMMARY_COLUMNS

    assert 'label_set' in SUMMARY_COLUMNS['dice_mean']
    assert 'tissue' in SUMMARY_COLUMNS['dice_mean']
    assert 'label network' in SUMMARY_COLUMNS['structure_dice_mean']
    assert 'GM, WM, CSF' in SUMMARY_COLUMNS['tissue_dice_mean'] or 'tissue' in SUMMARY_COLUMNS['tissue_dice_mean']


def test_mean_structure_dice_skips_small_structures():
    from keyprep.pipeline.benchmark import mean_structure_dice

    ref = np.zeros((10, 10, 10), np.int16)
    ref[:5] = 2  # 500 voxels
    ref[5:, :5] = 3  # 250 voxels
    ref[9, 9, :3] = 7  # 3 voxels: below min_voxels, not scored
    test = ref.copy()
    test[:5, :5] = 3  # label 2: 250 of 500 kept -> 2*250/(500+250); label 3: 250/(250+500)
    expect = np.mean([2 * 250 / 750, 2 * 250 / 750])
    assert abs(mean_structure_dice(ref, test) - expect) < 1e-12
    assert mean_structure_dice(ref, ref.astype(np.float32)) == 1.0
