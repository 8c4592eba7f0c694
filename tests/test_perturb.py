"""Known-truth pairs (:mod:`keyprep.pipeline.perturb`) on real data: Colin27, AAL and the
real displacement field shipped with nitransforms."""

from __future__ import annotations

from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from keyprep.pipeline import perturb as pt
from keyprep.pipeline.transforms import read_itk_affine

TEMPLATES = Path('/usr/share/mricron/templates')
needs_colin = pytest.mark.skipif(not (TEMPLATES / 'ch2.nii.gz').exists(),
                                 reason='Colin27 (apt-get install mricron-data) not installed')


def _downsample(img: nb.Nifti1Image, factor: int, order: int) -> nb.Nifti1Image:
    """The image on a grid ``factor`` times coarser (same first voxel centre)."""
    shape = tuple(int(np.ceil(n / factor)) for n in img.shape[:3])
    grid = pt.Grid(shape, img.affine @ np.diag([factor, factor, factor, 1.0]))
    data = pt.resample(np.asanyarray(img.dataobj), img.affine, grid, order=order,
                       antialias=order > 0)
    return nb.Nifti1Image(data, grid.affine)


@pytest.fixture(scope='module')
def colin4():
    """Colin27 head and AAL at 4 mm."""
    t1 = nb.load(str(TEMPLATES / 'ch2.nii.gz'))
    aal = nb.load(str(TEMPLATES / 'aal.nii.gz'))
    return _downsample(t1, 4, 1), _downsample(aal, 4, 0)


def _linear_image(grid: pt.Grid, coef: np.ndarray, const: float) -> nb.Nifti1Image:
    pts = pt.grid_points(grid)
    return nb.Nifti1Image((pts @ coef + const).reshape(grid.shape).astype(np.float64),
                          grid.affine)


def test_exact_point_mapping_linear_field():
    """A linear intensity ramp moved by a known rotation is reproduced to float precision.

    Linear interpolation reproduces a linear function exactly, so every moved voxel must
    hold ``f(T(y))`` with ``T(y) = S^-1 y`` computed from Rodrigues' formula.
    """
    src_grid = pt.Grid((40, 44, 38), np.array([[1.5, 0, 0, -30.0], [0, 1.5, 0, -33.0],
                                               [0, 0, 1.5, -28.0], [0, 0, 0, 1]]))
    coef, const = np.array([0.7, -1.3, 2.1]), 5.0
    src = _linear_image(src_grid, coef, const)
    center = np.array([0.0, 0.0, 0.0])
    rot = pt.rotation_about_axis((1.0, 2.0, -0.5), 37.0)
    motion = pt.similarity_matrix(rot, (2.0, -1.0, 3.0), 1.05, center)
    xfm = pt.KnownTransform(motion)
    oblique = pt.rotation_about_axis((0.3, 1.0, 0.2), 12.0)
    grid = pt.fitting_grid(np.array([[-12.0, -12, -12], [12, 12, 12]]), (1.2, 1.0, 1.4),
                           rotation=oblique, orientation='LPS', margin_mm=0)
    moved, _ = pt.apply_known_transform(src, xfm, grid, order=1, antialias=False)
    y = pt.grid_points(grid)
    expected_src = (y - motion[:3, 3] + 0.0) @ np.linalg.inv(motion[:3, :3]).T
    expected = expected_src @ coef + const
    got = moved.get_fdata().reshape(-1)
    assert np.allclose(got, expected, atol=1e-3)
    assert np.allclose(xfm.pull(y), expected_src)
    assert np.allclose(moved.affine, grid.affine)
    assert np.allclose(pt.Grid.of(moved).zooms, (1.2, 1.0, 1.4))


def test_a_voxel_lands_where_the_formula_says():
    """A single labelled voxel rotated by exactly 90 degrees about z lands on the voxel that
    ``c + R (p - c)`` names, on a target grid with another voxel order."""
    src = np.zeros((21, 21, 21), dtype=np.int16)
    src[15, 8, 4] = 7
    affine = np.eye(4)
    affine[:3, 3] = -10.0
    center = np.array([1.0, 2.0, -1.0])
    motion = pt.similarity_matrix(pt.rotation_about_axis((0, 0, 1), 90.0), (0, 0, 0), 1.0,
                                  center)
    p = affine[:3, :3] @ [15, 8, 4] + affine[:3, 3]
    q = center + pt.rotation_about_axis((0, 0, 1), 90.0) @ (p - center)
    assert np.allclose(q, pt.KnownTransform(motion).push(p[None])[0])
    target = pt.fitting_grid(np.array([[-14.0, -14, -14], [14, 14, 14]]), 1.0, orientation='LAI',
                             margin_mm=0)
    out = pt.resample(src, affine, target, pt.KnownTransform(motion), order=0)
    hits = np.argwhere(out == 7)
    assert len(hits) == 1 and out.dtype == np.int16
    world = target.affine[:3, :3] @ hits[0] + target.affine[:3, 3]
    assert np.allclose(world, q)


@needs_colin
def test_labels_preserved_and_volumes_scale_with_det():
    t1 = nb.load(str(TEMPLATES / 'ch2.nii.gz'))
    aal = nb.load(str(TEMPLATES / 'aal.nii.gz'))
    src_lab = np.asanyarray(aal.dataobj)
    rng = np.random.default_rng(7)
    motion = pt.random_similarity(rng, 180.0, 10.0, (1.08, 1.08),
                                  center=pt.center_of_mass(t1), angle_deg=70.0)
    xfm = pt.KnownTransform(motion)
    assert np.isclose(xfm.volume_ratio, 1.08 ** 3)
    pts = xfm.push(pt.foreground_points(aal, 0, step=3))
    grid = pt.fitting_grid(pts, (2.5, 2.0, 3.0),
                           rotation=pt.rotation_about_axis((1, 1, 0), 20.0), margin_mm=6)
    _, (moved,) = pt.apply_known_transform(aal, xfm, grid, labels=[aal])
    out = np.asanyarray(moved.dataobj)
    assert out.dtype == src_lab.dtype
    src_counts = np.bincount(src_lab.ravel(), minlength=117)
    out_counts = np.bincount(out.ravel(), minlength=117)
    assert set(np.unique(out)) <= set(np.unique(src_lab))
    big = np.flatnonzero(src_counts[1:] >= 30) + 1
    assert np.all(out_counts[big] > 0), 'a label was lost'
    vox_out = float(np.prod(grid.zooms))
    total_src = src_counts[1:].sum() * 1.0
    total_out = out_counts[1:].sum() * vox_out
    assert total_out / total_src == pytest.approx(1.08 ** 3, rel=0.02)
    large = np.flatnonzero(src_counts[1:] >= 5000) + 1
    ratios = out_counts[large] * vox_out / src_counts[large]
    assert np.all(np.abs(ratios / 1.08 ** 3 - 1) < 0.12)


@needs_colin
def test_seed_determinism(colin4):
    t1, _ = colin4

    def make(seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        motion = pt.random_similarity(rng, 90.0, 10.0, (0.9, 1.1), center=pt.center_of_mass(t1))
        grid = pt.fitting_grid(pt.KnownTransform(motion).push(pt.foreground_points(t1, 5)),
                               (4.0, 3.5, 4.5))
        moved, _ = pt.apply_known_transform(t1, pt.KnownTransform(motion), grid)
        data = moved.get_fdata() * pt.bias_field(rng, grid.shape, grid.zooms)
        data = pt.apply_gamma(data, float(np.exp(rng.normal(0, 0.2))))
        return pt.add_noise(rng, data, 3.0)

    a, b, c = make(11), make(11), make(12)
    assert a.shape == b.shape and np.array_equal(a, b)
    assert a.shape != c.shape or not np.array_equal(a, c)


def test_intensity_changes():
    rng = np.random.default_rng(0)
    b = pt.bias_field(rng, (30, 40, 20), (2.0, 2.0, 3.0), strength=0.3)
    assert b.min() > 0 and np.isclose(np.abs(np.log(b)).max(), 0.3, atol=1e-5)
    assert np.abs(np.diff(np.log(b), axis=0)).max() < 0.05  # smooth at 2 mm voxels
    x = np.linspace(0, 100, 11)
    g = pt.apply_gamma(x, 1.5)
    assert g[0] == 0 and np.isclose(g[-1], 100) and np.all(np.diff(g) > 0) and g[5] < 50


@needs_colin
def test_itk_affine_export_is_reproduced_by_ants(colin4, tmp_path):
    from keyprep.pipeline.antsutils import import_ants

    ants = import_ants(1)
    t1, _ = colin4
    rng = np.random.default_rng(3)
    motion = pt.random_similarity(rng, 120.0, 10.0, (0.9, 1.1), center=pt.center_of_mass(t1))
    xfm = pt.KnownTransform(motion)
    grid = pt.fitting_grid(xfm.push(pt.foreground_points(t1, 5)), (3.5, 4.0, 4.5),
                           rotation=pt.rotation_about_axis((0, 1, 1), 15.0), orientation='LPS')
    moved, _ = pt.apply_known_transform(t1, xfm, grid, antialias=False)
    src_path, moved_path = tmp_path / 'src.nii.gz', tmp_path / 'moved.nii.gz'
    nb.Nifti1Image(t1.get_fdata().astype('f4'), t1.affine).to_filename(src_path)
    moved.to_filename(moved_path)
    pull = xfm.write_itk(tmp_path / 'from-src_to-moved.txt')
    push = xfm.write_itk(tmp_path / 'from-moved_to-src.txt', inverse=True)
    assert np.allclose(read_itk_affine(pull), np.linalg.inv(motion))
    assert np.allclose(read_itk_affine(push), motion)
    fix = ants.image_read(str(moved_path))
    mov = ants.image_read(str(src_path))
    out = ants.apply_transforms(fix, mov, [str(pull)], interpolator='linear').numpy()
    ref = moved.get_fdata()
    assert np.abs(out - ref).max() < 1e-3 * ref.max()  # the same, up to float32 rounding
    # and the inverse file brings the moved image back onto the source grid
    back = ants.apply_transforms(mov, fix, [str(push)], interpolator='linear').numpy()
    inside = back > 0
    assert np.corrcoef(back[inside], t1.get_fdata()[inside])[0, 1] > 0.9


def test_fsl_field_convention_matches_nitransforms():
    from nitransforms.nonlinear import DenseFieldTransform

    path = pt.nitransforms_field_path()
    field = pt.load_fsl_displacement_field(path)
    raw = np.asanyarray(nb.load(str(path)).dataobj).astype(np.float32)
    assert field.data.shape == (108, 146, 128, 3)
    # FSL's x runs against RAS x for this neurological (det > 0) grid: only x flips sign
    assert np.linalg.det(field.affine) > 0
    assert np.array_equal(field.data[..., 0], -raw[..., 0])
    assert np.array_equal(field.data[..., 1:], raw[..., 1:])
    # the same mapping as nitransforms' own reader, on and between grid points
    ref = DenseFieldTransform.from_filename(path, fmt='fsl')
    ijk = np.argwhere(np.any(raw != 0, axis=-1))[::997].astype(float)
    pts = ijk @ field.affine[:3, :3].T + field.affine[:3, 3]
    assert np.allclose(field.map(pts), ref.map(pts), atol=1e-4)
    assert np.abs(field.map(pts) - pts).max() > 3.0  # a real, non-trivial deformation
    # a physical deformation: no folding at its real scale
    jac = field.jacobian_determinant()
    assert jac[np.any(raw != 0, axis=-1)].min() > 0
    # recentring keeps the pattern and moves its support
    moved = field.recentred((0.0, -18.0, 18.0))
    assert np.allclose(moved.support_centroid(), (0.0, -18.0, 18.0))
    shift = moved.affine[:3, 3] - field.affine[:3, 3]
    assert np.allclose(moved.displacement(pts + shift), field.displacement(pts), atol=1e-4)


@needs_colin
def test_deformable_known_transform_and_its_itk_field(colin4, tmp_path):
    from keyprep.pipeline.antsutils import import_ants

    ants = import_ants(1)
    t1, aal = colin4
    com = pt.center_of_mass(t1)
    field = pt.load_fsl_displacement_field().recentred(com)
    motion = pt.similarity_matrix(pt.rotation_about_axis((1, 0, 0), 20.0), (3, 0, 0), 1.0, com)
    xfm = pt.KnownTransform(motion, field)
    assert not xfm.is_linear
    # pull composes the motion and the field: T(y) = D(S^-1 y); push inverts it
    y = pt.foreground_points(t1, 60, step=3)[::7]
    s_inv = np.linalg.inv(motion)
    assert np.allclose(xfm.pull(y), field.map(y @ s_inv[:3, :3].T + s_inv[:3, 3]))
    assert np.abs(xfm.push(xfm.pull(y)) - y).max() < 0.05
    grid = pt.fitting_grid(xfm.push(pt.foreground_points(t1, 5, step=2)), 4.0)
    moved, (mlab,) = pt.apply_known_transform(t1, xfm, grid, labels=[aal], antialias=False)
    moved_path, src_path = tmp_path / 'moved.nii.gz', tmp_path / 'src.nii.gz'
    moved.to_filename(moved_path)
    nb.Nifti1Image(t1.get_fdata().astype('f4'), t1.affine).to_filename(src_path)
    pull = xfm.write_itk(tmp_path / 'pull.nii.gz', grid=grid)
    out = ants.apply_transforms(ants.image_read(str(moved_path)), ants.image_read(str(src_path)),
                                [str(pull)], interpolator='linear').numpy()
    ref = moved.get_fdata()
    assert np.abs(out - ref).max() < 1e-3 * ref.max()
    # the inverse field on the source grid maps the moved labels back onto the source labels
    push = xfm.write_itk(tmp_path / 'push.nii.gz', grid=pt.Grid.of(t1), inverse=True)
    mlab_path = tmp_path / 'mlab.nii.gz'
    mlab.to_filename(mlab_path)
    back = ants.apply_transforms(ants.image_read(str(src_path)),
                                 ants.image_read(str(mlab_path)), [str(push)],
                                 interpolator='genericLabel').numpy().astype(int)
    src_lab = np.asanyarray(aal.dataobj).astype(int)
    both = (back > 0) | (src_lab > 0)
    assert np.mean(back[both] == src_lab[both]) > 0.6
