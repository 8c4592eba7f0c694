"""Errors against a known transform (:mod:`keyprep.pipeline.truth`) and the demo's table of
each engine's error (:func:`keyprep.bids_app.demo.groundtruth_errors`)."""

from __future__ import annotations

import shutil

import nibabel as nb
import numpy as np
import pandas as pd
import pytest

from keyprep.bids_app.demo import COLIN27_DIR
from keyprep.pipeline import perturb as pt
from keyprep.pipeline import truth
from keyprep.pipeline.transforms import write_itk_affine, write_itk_displacement_field

GRID = np.diag([2.0, 2.0, 2.0, 1.0])
GRID[:3, 3] = -40.0
SHAPE = (41, 41, 41)  # -40 .. 40 mm


def _points(n: int = 500, radius: float = 30.0) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.uniform(-radius, radius, size=(n, 3))


def _field_file(mapping, path) -> str:
    """``mapping`` (RAS points -> RAS points) written as an ITK displacement field."""
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in SHAPE], indexing='ij'), -1)
    pts = ijk @ GRID[:3, :3].T + GRID[:3, 3]
    disp = (mapping(pts.reshape(-1, 3)) - pts.reshape(-1, 3)).reshape(SHAPE + (3,))
    return str(write_itk_displacement_field(disp, GRID, path))


def test_map_points_agrees_with_ants(tmp_path):
    from keyprep.pipeline.antsutils import import_ants

    ants = import_ants()
    mat = pt.similarity_matrix(pt.rotation_about_axis((1, 2, 3), 25.0), (3.0, -4.0, 5.0), 1.05)
    affine = write_itk_affine(mat, tmp_path / 'a.txt')
    field = _field_file(lambda p: p + np.stack([np.sin(p[:, 1] / 15.0), 0.5 * p[:, 0] / 40.0,
                                                np.cos(p[:, 2] / 20.0)], -1),
                        tmp_path / 'f.nii.gz')
    pts = _points()
    lps = pts * [-1, -1, 1]
    for xfm in (affine, field):
        theirs = ants.apply_transforms_to_points(
            3, pd.DataFrame(lps, columns=['x', 'y', 'z']), [str(xfm)])
        theirs = theirs[['x', 'y', 'z']].to_numpy() * [-1, -1, 1]
        assert np.abs(truth.map_points(xfm, pts) - theirs).max() < 1e-3
    with pytest.raises(ValueError, match='not a transform'):
        truth.map_points(tmp_path / 'x.h5', pts)


def test_recovered_rotation_has_no_error_and_a_wrong_one_has_the_expected_error(tmp_path):
    centre = np.array([2.0, -3.0, 4.0])
    known = pt.KnownTransform(pt.similarity_matrix(pt.rotation_about_axis((0, 0, 1), 40.0),
                                                   (5.0, 2.0, -1.0), 1.04, center=centre))
    true_xfm = known.write_itk(tmp_path / 'true.txt', inverse=True)
    pts = _points()
    # the same mapping as an engine would export it: an affine, or a displacement field
    same_affine = write_itk_affine(known.motion, tmp_path / 'engine.txt')
    same_field = _field_file(known.push, tmp_path / 'engine.nii.gz')
    assert truth.point_errors(same_affine, true_xfm, pts)['error_max_mm'] < 1e-6
    assert truth.point_errors(same_field, true_xfm, pts)['error_max_mm'] < 1e-3
    # 10 degrees too little about the same axis and centre: |p' - q'| = 2 r sin(5 deg) s
    wrong = pt.similarity_matrix(pt.rotation_about_axis((0, 0, 1), 30.0), (5.0, 2.0, -1.0),
                                 1.04, center=centre)
    err = truth.point_errors(write_itk_affine(wrong, tmp_path / 'wrong.txt'), true_xfm, pts)
    r = np.linalg.norm((pts - centre)[:, :2], axis=1)  # distance to the rotation axis
    expected = 2 * r * np.sin(np.radians(5.0)) * 1.04
    assert err['error_mean_mm'] == pytest.approx(expected.mean(), rel=1e-6)
    assert err['error_max_mm'] == pytest.approx(expected.max(), rel=1e-6)
    assert err['n_points'] == len(pts) and err['error_mean_mm'] > 2.0


def test_label_dice(tmp_path):
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[5:20, 5:35, 5:35] = 1
    labels[21:36, 5:35, 5:35] = 2
    ref = tmp_path / 'labels.nii.gz'
    nb.Nifti1Image(labels, GRID).to_filename(ref)
    identity = write_itk_affine(np.eye(4), tmp_path / 'id.txt')
    assert truth.label_dice(ref, identity, ref, tmp_path) == (1.0, 1.0, 2)
    shift = np.eye(4)
    shift[0, 3] = 6.0  # 3 voxels along x: each block loses 3 of its 15 slices
    mean, low, n = truth.label_dice(ref, write_itk_affine(shift, tmp_path / 's.txt'), ref,
                                    tmp_path)
    assert n == 2 and mean == pytest.approx(12 / 15) and low == pytest.approx(12 / 15)


@pytest.mark.skipif(not (COLIN27_DIR / 'ch2.nii.gz').exists(),
                    reason='Colin27 (apt-get install mricron-data) not installed')
def test_demo_groundtruth_errors(tmp_path):
    """The demo's table on the real Colin27 dataset: a transform equal to the truth has no
    error and the truth's Dice; a rotated one has the error of its rotation."""
    from keyprep.bids_app import demo
    from keyprep.pipeline.transforms import read_itk_affine

    bids = demo.build_demo_dataset(tmp_path / 'bids', n_subjects=1, seed=3, resolution=4.0)
    anat_gt = bids / 'derivatives' / 'groundtruth' / 'sub-01' / 'anat'
    true_xfm = anat_gt / 'sub-01_from-T1w_to-colin27_mode-image_xfm.txt'
    deriv = tmp_path / 'out'
    anat = deriv / 'sub-01' / 'anat'
    anat.mkdir(parents=True)
    shutil.copyfile(true_xfm, anat / 'sub-01_from-T1w_to-colin27_mode-image_desc-exact_xfm.txt')
    # 8 degrees off about a point inside the brain: a clearly wrong answer
    off = pt.similarity_matrix(pt.rotation_about_axis((1, 0, 0), 8.0), center=(0, -18, 18))
    write_itk_affine(read_itk_affine(true_xfm) @ off,
                     anat / 'sub-01_from-T1w_to-colin27_mode-image_desc-wrong_xfm.txt')
    table = demo.write_groundtruth_errors(bids, deriv, step=4)
    df = pd.read_csv(table, sep='\t').set_index('method')
    assert list(df.index) == ['truth', 'exact', 'wrong']
    assert df.loc['exact', 'error_max_mm'] < 1e-3
    assert df.loc['exact', 'aal_dice_mean'] == pytest.approx(df.loc['truth', 'aal_dice_mean'])
    assert df.loc['truth', 'aal_dice_mean'] > 0.6  # 4 mm labels carried back to 1 mm
    assert df.loc['wrong', 'error_mean_mm'] > 5.0
    assert df.loc['wrong', 'aal_dice_mean'] < df.loc['truth', 'aal_dice_mean'] - 0.1
    assert df.loc['exact', 'brain_mask_dice'] == pytest.approx(df.loc['truth', 'brain_mask_dice'])
    assert df.loc['truth', 'brain_mask_dice'] > 0.9
    assert df.loc['wrong', 'brain_mask_dice'] < df.loc['truth', 'brain_mask_dice'] - 0.02
    assert (deriv / demo.TRUTH_TABLE).with_suffix('.json').is_file()
