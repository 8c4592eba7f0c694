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
