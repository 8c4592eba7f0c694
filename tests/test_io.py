"""Image validation and conforming: bad inputs give one clear error; geometry is kept."""

from __future__ import annotations

import gzip

import nibabel as nb
import numpy as np
import pytest

from keyprep.pipeline.errors import EXIT_DATA, EXIT_NO_INPUT, ImageError, MissingInputError
from keyprep.pipeline.io import atomic_write_text, conform, load_image, save_image


def _img(shape=(8, 9, 10), affine=None, data=None):
    data = np.random.default_rng(0).random(shape).astype('f4') if data is None else data
    return nb.Nifti1Image(data, np.eye(4) if affine is None else affine)


def test_missing_file(tmp_path):
    with pytest.raises(MissingInputError) as err:
        load_image(tmp_path / 'nope.nii.gz')
    assert err.value.exit_code == EXIT_NO_INPUT


def test_truncated_file(tmp_path):
    good = tmp_path / 'good.nii.gz'
    _img((30, 30, 30)).to_filename(good)
    bad = tmp_path / 'bad.nii.gz'
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(ImageError, match='corrupt or truncated') as err:
        load_image(bad)
    assert err.value.exit_code == EXIT_DATA


def test_garbage_file(tmp_path):
    bad = tmp_path / 'bad.nii.gz'
    bad.write_bytes(gzip.compress(b'this is not a nifti header' * 20))
    with pytest.raises(ImageError):
        load_image(bad)


@pytest.mark.parametrize('data, message', [
    (np.zeros((6, 6, 6), 'f4'), 'empty'),
    (np.full((6, 6, 6), np.nan, 'f4'), 'NaN'),
    (np.random.default_rng(1).random((6, 6, 6, 3)).astype('f4'), '4-D with 3 volumes'),
    (np.ones((6, 6), 'f4'), '2-D'),
])
def test_bad_arrays(tmp_path, data, message):
    if data.ndim == 3 and np.isnan(data).all():
        data[0, 0, 0] = 1.0
    f = tmp_path / 'x.nii.gz'
    nb.Nifti1Image(data, np.eye(4)).to_filename(f)
    with pytest.raises(ImageError, match=message):
        load_image(f)


def test_single_volume_4d_is_accepted(tmp_path):
    f = tmp_path / 'x.nii.gz'
    _img((5, 6, 7, 1), affine=np.diag([4.0, 4.0, 4.0, 1.0])).to_filename(f)  # 20-28 mm
    assert load_image(f).shape == (5, 6, 7)


def test_conform_keeps_world_geometry_of_oblique_anisotropic_image():
    rng = np.random.default_rng(3)
    rot = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([1.2, 0.9, 2.5])
    aff[:3, 3] = [10, -20, 5]
    data = rng.random((11, 13, 7)).astype('f4')
    out = conform(_img(data=data, affine=aff))
    assert nb.aff2axcodes(out.affine) == ('R', 'A', 'S')
    # every voxel value sits at the same world position as before
    idx = np.argwhere(np.ones(data.shape, bool))
    world_in = nb.affines.apply_affine(aff, idx)
    vox_out = np.rint(nb.affines.apply_affine(np.linalg.inv(out.affine), world_in)).astype(int)
    assert np.array_equal(np.asanyarray(out.dataobj)[tuple(vox_out.T)], data[tuple(idx.T)])
    assert int(out.header['qform_code']) == 1 and int(out.header['sform_code']) == 1
    assert np.allclose(out.get_qform(), out.get_sform(), atol=1e-5)


def test_conform_matches_ants_geometry(tmp_path):
    """ITK (ANTs) reads the conformed oblique header exactly as nibabel does."""
    from keyprep.pipeline.antsutils import import_ants

    ants = import_ants()
    rot = np.linalg.qr(np.random.default_rng(5).normal(size=(3, 3)))[0]
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([1.1, 0.9, 1.8])
    aff[:3, 3] = [30, -10, 4]
    img = conform(_img((9, 10, 11), aff))
    f = save_image(img, tmp_path / 'c.nii.gz')
    a = ants.image_read(str(f))
    lps = np.diag([-1, -1, 1])
    world_ants = lps @ np.asarray(a.origin)
    assert np.allclose(world_ants, img.affine[:3, 3], atol=1e-4)
    direction = lps @ np.asarray(a.direction) @ np.diag(a.spacing)
    assert np.allclose(direction, img.affine[:3, :3], atol=1e-4)


def test_atomic_writes_have_normal_permissions(tmp_path):
    import os

    p = atomic_write_text(tmp_path / 'a.txt', 'x')
    mask = os.umask(0)
    os.umask(mask)
    assert (p.stat().st_mode & 0o777) == (0o666 & ~mask)
    assert not [f for f in tmp_path.iterdir() if f.name.startswith('.')]
