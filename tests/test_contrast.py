"""Label-guided contrast transfer (keyprep.pipeline.contrast): closed-form cases."""

from __future__ import annotations

import numpy as np
import pytest

from keyprep.pipeline.contrast import (apply_contrast_transfer, label_contrast_transfer,
                                       label_medians, resolve_contrast_transfer)


def test_label_medians_closed_form():
    image = np.array([[0, 1, 2, 9], [4, 5, 6, 7]], dtype=np.float32)
    labels = np.array([[3, 3, 3, 3], [5, 5, 5, 0]])
    # the zero voxel is outside the brain by default; label 0 has one voxel inside (7)
    assert label_medians(image, labels) == {0: 7.0, 3: 2.0, 5: 5.0}
    inside = np.ones_like(labels, dtype=bool)
    assert label_medians(image, labels, inside)[3] == 1.5
    assert label_medians(np.zeros((2, 2)), np.ones((2, 2), int)) == {}
    with pytest.raises(ValueError):
        label_medians(image, labels[:, :2])


def test_transfer_paints_the_fixed_contrast_on_the_moving_structures():
    """A T2-like moving image (dark white matter, bright CSF) and a T1-like fixed image
    (bright white matter): each moving structure takes the fixed image's median there."""
    rng = np.random.default_rng(0)
    shape = (6, 7, 8)
    fl = rng.integers(1, 4, shape)                    # fixed structures 1, 2, 3
    fl[0] = 0                                          # outside the fixed brain
    fixed = np.choose(fl, [0.0, 100.0, 60.0, 20.0]).astype(np.float32)
    fixed[fl > 0] += rng.normal(0, 1, (fl > 0).sum()).astype(np.float32)
    ml = rng.integers(1, 5, shape)                     # structure 4 is absent from the fixed
    ml[:, 0] = 0
    moving = np.choose(ml, [0.0, 30.0, 50.0, 90.0, 70.0]).astype(np.float32)
    inside = ml > 0
    inside[1, 0, 0] = True                             # an unlabelled voxel inside the brain
    moving[1, 0, 0] = 5.0
    out = label_contrast_transfer(fixed, moving, fl, ml, moving_inside=inside)
    assert out.dtype == np.float32 and out.shape == shape
    f_in = fixed != 0
    for lab in (1, 2, 3):
        want = np.median(fixed[(fl == lab) & f_in])
        np.testing.assert_allclose(out[ml == lab], want, rtol=1e-6)
    np.testing.assert_allclose(out[ml == 4], np.median(fixed[f_in]), rtol=1e-6)
    # fixed has no unlabelled brain voxel: label 0 inside takes the fixed brain's median
    assert out[1, 0, 0] == pytest.approx(np.median(fixed[f_in]))
    assert np.all(out[~inside] == 0)
    # the moving intensities are gone: a moving image of other values gives the same result
    np.testing.assert_array_equal(out, label_contrast_transfer(
        fixed, moving * 3 + 1, fl, ml, moving_inside=inside))
    # an image transferred onto itself keeps its structure medians
    self_out = label_contrast_transfer(fixed, fixed, fl, fl)
    for lab in (1, 2, 3):
        assert np.median(self_out[fl == lab]) == pytest.approx(np.median(fixed[fl == lab]))
    with pytest.raises(ValueError):
        label_contrast_transfer(fixed, moving[:-1], fl, ml[:-1])
    assert not label_contrast_transfer(np.zeros(shape), moving, fl, ml).any()
    # a NaN voxel of the fixed image is left out of the medians: the result stays finite
    nan_fixed = fixed.copy()
    nan_fixed[fl == 1] = np.where(np.arange((fl == 1).sum()) == 0, np.nan, fixed[fl == 1])
    got = label_contrast_transfer(nan_fixed, moving, fl, ml, moving_inside=inside)
    assert np.isfinite(got).all()
    with pytest.raises(ValueError):  # a 4-D image against 3-D labels
        label_contrast_transfer(fixed[..., None], moving[..., None], fl, ml)


def test_resolve_contrast_transfer():
    across = {'fixed': 'T1w', 'moving': 'T2w'}
    same = {'fixed': 'T1w', 'moving': 'T1w'}
    assert resolve_contrast_transfer('auto', across, True)[0] == 'both'
    assert resolve_contrast_transfer('auto', same, True)[0] == 'off'
    assert resolve_contrast_transfer('auto', None, True)[0] == 'off'
    assert resolve_contrast_transfer('auto', across, False) == ('off',
                                                               'no label maps of both images')
    assert resolve_contrast_transfer('both', same, True) == ('both', 'given')
    assert resolve_contrast_transfer('OFF', across, True)[0] == 'off'
    with pytest.raises(ValueError):
        resolve_contrast_transfer('sometimes', across, True)


def test_apply_contrast_transfer_modes():
    """'off' returns the inputs, 'moving' paints only the moving image, 'both' also paints
    the fixed image from its own labels: every fixed structure becomes its own median."""
    fixed = np.array([[0, 10, 20, 30], [0, 40, 50, 60]], dtype=np.float32)
    fl = np.array([[0, 1, 1, 1], [0, 2, 2, 2]])
    moving = np.array([[1, 1, 0, 5], [5, 5, 0, 0]], dtype=np.float32)
    ml = np.array([[1, 1, 0, 2], [2, 2, 0, 0]])
    f, m = apply_contrast_transfer(fixed, moving, fl, ml, 'off')
    assert f is fixed and m is moving
    f, m = apply_contrast_transfer(fixed, moving, fl, ml, 'moving')
    assert f is fixed
    assert np.array_equal(m, [[20, 20, 0, 50], [50, 50, 0, 0]])
    f, m = apply_contrast_transfer(fixed, moving, fl, ml, 'both')
    assert np.array_equal(f, [[0, 20, 20, 20], [0, 50, 50, 50]])
    assert np.array_equal(m, [[20, 20, 0, 50], [50, 50, 0, 0]])
    with pytest.raises(ValueError, match='mode'):
        apply_contrast_transfer(fixed, moving, fl, ml, 'auto')
