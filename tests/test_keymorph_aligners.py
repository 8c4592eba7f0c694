"""Closed-form KeyMorph aligners: exact recovery, TPS limits, lambda batching, gradients, the
TPS inverse, and ITK export reproduced by ``ants.apply_transforms``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from keyprep.pipeline.io import make_image
from keyprep.pipeline.keymorph.aligners import (
    TPSFit,
    affine_inverse,
    apply_affine,
    compose,
    displacement_grid,
    fit_affine,
    fit_rigid,
    fit_tps,
    grid_world_points,
    homogeneous,
    invert_displacement,
    write_itk_affine,
    write_itk_displacement_field,
)
from keyprep.pipeline.transforms import LPS, read_displacement_field, read_itk_affine

torch.set_num_threads(1)
F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rotation(axis, angle_deg: float) -> torch.Tensor:
    """Rodrigues rotation matrix (float64)."""
    k = torch.as_tensor(axis, dtype=F64)
    k = k / k.norm()
    kx = torch.tensor([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]], dtype=F64)
    a = math.radians(angle_deg)
    return torch.eye(3, dtype=F64) + math.sin(a) * kx + (1 - math.cos(a)) * kx @ kx


def _random_rotations(n: int, g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, 3, 3, generator=g, dtype=F64))
    q = q * torch.sign(torch.diagonal(r, dim1=1, dim2=2)).unsqueeze(1)
    return q * torch.sign(torch.linalg.det(q))[:, None, None]


def _points(n: int, g: torch.Generator, spread: float = 40.0, b: int | None = None):
    shape = (n, 3) if b is None else (b, n, 3)
    return torch.randn(shape, generator=g, dtype=F64) * spread + torch.tensor([5.0, -10.0, 12.0],
                                                                              dtype=F64)


# --------------------------------------------------------------------------------------
# Rigid
# --------------------------------------------------------------------------------------

def test_rigid_recovers_rotation_and_translation_exactly():
    g = _gen(0)
    rots = torch.stack([_rotation((1, 2, 3), 170.0), _rotation((0, 0, 1), 35.0),
                        _rotation((1, -1, 0.5), 179.0)])
    trans = torch.tensor([[10.0, -4.0, 3.0], [0.0, 0.0, 0.0], [-30.0, 12.0, 7.5]], dtype=F64)
    src = _points(25, g, b=3)
    dst = src @ rots.transpose(1, 2) + trans[:, None]
    mat = fit_rigid(src, dst)
    assert mat.shape == (3, 3, 4) and mat.dtype == F64
    assert torch.allclose(mat[..., :3], rots, atol=1e-12)
    assert torch.allclose(mat[..., 3], trans, atol=1e-10)
    # float32 in, float32 out, unbatched accepted
    m32 = fit_rigid(src[0].float(), dst[0].float())
    assert m32.shape == (3, 4) and m32.dtype == torch.float32
    assert torch.allclose(m32[:, :3].double(), rots[0], atol=1e-5)
    assert torch.allclose(m32[:, 3].double(), trans[0], atol=2e-3)


def test_rigid_weights_remove_outliers():
    g = _gen(1)
    rot, t = _rotation((0.3, -1, 0.2), 120.0), torch.tensor([3.0, 2.0, -8.0], dtype=F64)
    src = _points(30, g)
    dst = src @ rot.T + t
    dst[:5] += torch.randn(5, 3, generator=g, dtype=F64) * 25.0  # five gross outliers
    w = torch.ones(30, dtype=F64)
    w[:5] = 0.0
    plain, weighted = fit_rigid(src, dst), fit_rigid(src, dst, w)
    assert (plain[:, :3] - rot).abs().max() > 1e-2  # the outliers do pull the plain fit
    assert torch.allclose(weighted[:, :3], rot, atol=1e-12)
    assert torch.allclose(weighted[:, 3], t, atol=1e-10)
    # small but non-zero weights: close to the robust answer; weights scale-free
    w[:5] = 1e-6
    assert torch.allclose(fit_rigid(src, dst, 7.0 * w)[:, :3], rot, atol=1e-4)


def test_rigid_is_a_proper_rotation_when_a_reflection_fits_best():
    g = _gen(2)
    src = _points(40, g) * torch.tensor([1.0, 1.5, 0.7], dtype=F64)
    mirror = torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=F64))
    dst = src @ (mirror @ _rotation((1, 1, 0), 30.0)).T + 2.0
    # the unconstrained orthogonal Procrustes solution is a reflection here
    sc, dc = src.mean(0), dst.mean(0)
    u, _, vh = torch.linalg.svd((src - sc).T @ (dst - dc))
    assert torch.linalg.det(vh.T @ u.T) < 0
    mat = fit_rigid(src, dst)
    rot = mat[:, :3]
    assert torch.allclose(rot @ rot.T, torch.eye(3, dtype=F64), atol=1e-12)
    assert abs(float(torch.linalg.det(rot)) - 1.0) < 1e-12

    def cost(r):
        t = dc - r @ sc
        return float(((src @ r.T + t - dst) ** 2).sum())

    best = cost(rot)
    others = _random_rotations(4000, _gen(3))
    assert best <= min(cost(r) for r in others)
    for axis in torch.eye(3, dtype=F64):  # and no small rotation improves it
        for eps in (1e-3, -1e-3):
            assert cost(_rotation(axis, math.degrees(eps)) @ rot) >= best


# --------------------------------------------------------------------------------------
# Affine
# --------------------------------------------------------------------------------------

def test_affine_recovers_a_known_affine_exactly():
    g = _gen(4)
    a = torch.eye(3, dtype=F64) + 0.3 * torch.randn(2, 3, 3, generator=g, dtype=F64)
    t = torch.randn(2, 3, 1, generator=g, dtype=F64) * 20
    mat = torch.cat([a, t], dim=2)
    src = _points(12, g, b=2)
    dst = apply_affine(mat, src)
    assert torch.allclose(fit_affine(src, dst), mat, atol=1e-8)
    m32 = fit_affine(src.float(), dst.float())
    assert m32.dtype == torch.float32
    assert (apply_affine(m32.double(), src) - dst).abs().max() < 1e-3  # mm
    # inverse and composition
    inv = affine_inverse(mat)
    assert torch.allclose(apply_affine(inv, dst), src, atol=1e-9)
    assert torch.allclose(compose(inv, mat), torch.eye(3, 4, dtype=F64).expand(2, 3, 4),
                          atol=1e-12)
    assert torch.allclose(homogeneous(mat)[:, 3], torch.tensor([0.0, 0, 0, 1], dtype=F64))


def test_weighted_affine_with_binary_weights_is_the_subset_fit():
    g = _gen(5)
    src = _points(30, g)
    dst = src @ (torch.eye(3, dtype=F64) * 1.1).T + torch.randn(30, 3, generator=g,
                                                                 dtype=F64) * 3.0
    w = (torch.rand(30, generator=g) > 0.4).to(F64)
    keep = w > 0
    weighted = fit_affine(src, dst, w)
    subset = fit_affine(src[keep], dst[keep])
    assert torch.allclose(weighted, subset, atol=1e-10)
    assert (fit_affine(src, dst) - subset).abs().max() > 1e-2


# --------------------------------------------------------------------------------------
# Thin-plate spline
# --------------------------------------------------------------------------------------

LAMBDAS = (0.0, 0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1e5)


def _noisy_pair(n: int, seed: int):
    g = _gen(seed)
    src = _points(n, g)
    a = torch.eye(3, dtype=F64) + 0.15 * torch.randn(3, 3, generator=g, dtype=F64)
    dst = src @ a.T + torch.tensor([4.0, -2.0, 6.0], dtype=F64)
    return src, dst + torch.randn(n, 3, generator=g, dtype=F64) * 3.0


def test_tps_interpolates_at_zero_and_tends_to_the_affine_fit():
    src, dst = _noisy_pair(24, 6)
    fit = fit_tps(src.float(), dst.float(), LAMBDAS)
    res = fit.residuals()[0].double()  # [L, N] mm
    assert res.dtype == F64 and fit.residuals().dtype == torch.float32
    assert res[0].max() < 1e-3
    at_keypoints = fit.evaluate(src.float())[0, 0]  # float32 evaluation
    assert at_keypoints.dtype == torch.float32
    assert (at_keypoints.double() - dst).norm(dim=-1).max() < 1e-3
    sse = (res ** 2).sum(1)
    assert bool((sse[1:] >= sse[:-1] - 1e-9).all()) and sse[-1] > 10 * sse[1]
    # the whole map approaches the affine least-squares fit on a grid around the points
    aff = fit_affine(src, dst)
    grid = grid_world_points((9, 9, 9), np.diag([12.0, 12, 12, 1]) + np.c_[np.zeros((4, 3)),
                                                                          [-43, -58, -36, 0]])
    dist = (fit.evaluate(grid)[0].double() - apply_affine(aff, grid)).norm(dim=-1).max(dim=1)[0]
    assert bool((dist[1:] <= dist[:-1] + 1e-3).all())
    assert dist[0] > 1.0 and dist[-1] < 0.02
    # the same with weights: large lambda -> the weighted affine fit
    w = torch.linspace(0.2, 3.0, 24, dtype=F64)
    fit_w = fit_tps(src, dst, (1e6,), w)
    gap = (fit_w.evaluate(grid)[0, 0] - apply_affine(fit_affine(src, dst, w), grid)).norm(dim=-1)
    assert gap.max() < 0.02
    assert (fit_w.evaluate(grid)[0, 0] - apply_affine(aff, grid)).norm(dim=-1).max() > 0.5


def test_one_evaluation_over_lambdas_equals_separate_fits():
    src, dst = _noisy_pair(20, 7)
    g = _gen(8)
    src, dst = torch.stack([src, src + 3.0]), torch.stack([dst, dst * 0.9])
    w = torch.rand(2, 20, generator=g, dtype=F64) + 0.1
    pts = _points(300, g, b=2)
    for kernel in ('r2logr', 'r'):
        fit = fit_tps(src, dst, LAMBDAS[:6], w, kernel=kernel)
        together = fit.evaluate(pts, chunk=64)
        assert together.shape == (2, 6, 300, 3)
        for i, lam in enumerate(LAMBDAS[:6]):
            alone = fit_tps(src, dst, [lam], w, kernel=kernel).evaluate(pts)
            assert torch.allclose(together[:, i], alone[:, 0], atol=1e-9)
            assert torch.allclose(fit.select(i).evaluate(pts)[:, 0], alone[:, 0])
        # both kernels interpolate at lambda = 0 (sqrt amplifies rounding for U = -r)
        assert fit.residuals()[:, 0].max() < 1e-6
    # dense grid = evaluate - x, every lambda at once or one at a time, float32 close
    shape, affine = (5, 6, 7), np.diag([10.0, 9.0, 8.0, 1.0])
    affine[:3, 3] = (-20, -25, -15)
    x = grid_world_points(shape, affine)
    ref = (fit.evaluate(x)[1] - x).reshape((6,) + shape + (3,))
    grid64 = displacement_grid(fit, affine, shape, batch_index=1, dtype=F64, chunk=37)
    assert torch.allclose(grid64, ref, atol=1e-9)
    assert torch.allclose(displacement_grid(fit, affine, shape, 3, batch_index=1).double(),
                          ref[3], atol=1e-3)
    mat = fit_affine(src, dst)
    assert torch.allclose(displacement_grid(mat, affine, shape, batch_index=1, dtype=F64),
                          (apply_affine(mat[1], x) - x).reshape(shape + (3,)), atol=1e-10)


def test_tps_gradients():
    g = _gen(9)
    src = torch.randn(1, 6, 3, generator=g, dtype=F64) * 30
    dst = src + torch.randn(1, 6, 3, generator=g, dtype=F64) * 5
    w = torch.rand(1, 6, generator=g, dtype=F64) + 0.5
    pts = torch.randn(1, 4, 3, generator=g, dtype=F64) * 30
    pts[0, 0] = src[0, 2]  # a grid point on a keypoint: the kernel's zero must not give NaN
    for kernel in ('r2logr', 'r'):
        def f(s, d, ww, p):
            return fit_tps(s, d, (0.0, 0.3), ww, kernel=kernel).evaluate(p)

        inputs = tuple(x.clone().requires_grad_() for x in (src, dst, w, pts))
        if kernel == 'r':  # |x - c| has a kink at a keypoint: keep the grid points off them
            inputs[3].data[0, 0] += 1.0
        assert torch.autograd.gradcheck(f, inputs, atol=1e-5, rtol=1e-4)
    # and through the closed-form rigid and affine fits
    inputs = tuple(x.clone().requires_grad_() for x in (src, dst, w))
    assert torch.autograd.gradcheck(fit_affine, inputs)
    assert torch.autograd.gradcheck(fit_rigid, inputs)


def test_tps_inverse_error_is_measured_and_small():
    g = _gen(10)
    # keypoints inside a 60 mm ball, displaced by a smooth field (max ~6 mm) and an affine
    kp = torch.randn(60, 3, generator=g, dtype=F64)
    kp = kp / kp.norm(dim=1, keepdim=True) * torch.rand(60, 1, generator=g, dtype=F64) * 60
    smooth = 6.0 * torch.sin(kp[:, [1, 2, 0]] / 25.0)
    moving = kp @ _rotation((0, 0, 1), 15.0).T * 1.05 + smooth + 3.0
    fit = fit_tps(kp.float(), moving.float(), (0.1,))
    shape, affine = (20, 20, 20), np.diag([5.0, 5.0, 5.0, 1.0])
    affine[:3, 3] = -47.5 + 3.0
    y = grid_world_points(shape, affine)
    mask = (y - 3.0).norm(dim=1).reshape(shape) < 50.0
    inv = invert_displacement(fit, affine, shape, mask=mask.numpy(), tol_mm=1e-3)
    assert inv.field.shape == shape + (3,) and inv.field.dtype == torch.float32
    assert inv.mean_error_mm < 1e-3 and inv.max_error_mm < 2e-3
    assert inv.unconverged_fraction < 0.01 and inv.iterations >= 2
    # the reported error is what an independent evaluation finds
    back = fit.evaluate(y + inv.field.reshape(-1, 3).double())[0, 0]
    err = (back - y).norm(dim=1)[mask.reshape(-1)]
    assert abs(float(err.max()) - inv.max_error_mm) < 2e-4
    # the swapped fit alone (the start) is much worse: the iterations do the work
    start = fit.swapped().evaluate(y)[0, 0]
    err0 = (fit.evaluate(start)[0, 0] - y).norm(dim=1)[mask.reshape(-1)]
    assert err0.mean() > 0.05 > 50 * inv.mean_error_mm


def test_tps_inverse_handles_large_rotations():
    g = _gen(14)
    kp = torch.randn(40, 3, generator=g, dtype=F64) * 25.0
    moving = kp @ _rotation((1, 1, 0), 120.0).T + 4.0 * torch.sin(kp / 20.0) + 5.0
    fit = fit_tps(kp, moving, (0.1,))
    shape, affine = (12, 12, 12), np.diag([6.0, 6.0, 6.0, 1.0])
    affine[:3, 3] = -33.0 + 5.0
    y = grid_world_points(shape, affine)
    mask = ((y - 5.0).norm(dim=1) < 35.0).reshape(shape)
    # |I - R| > 1 at 120 degrees: the plain fixed-point iteration cannot contract
    plain = invert_displacement(fit, affine, shape, mask=mask, precondition=False, n_iter=10)
    assert plain.unconverged_fraction > 0.5
    inv = invert_displacement(fit, affine, shape, mask=mask)
    assert inv.unconverged_fraction == 0.0 and inv.max_error_mm < 1e-3


# --------------------------------------------------------------------------------------
# ITK export through ANTs
# --------------------------------------------------------------------------------------

def _oblique(axis, angle: float, zooms, centre_mm, shape, flip_i: bool = False) -> np.ndarray:
    rot = _rotation(axis, angle).numpy()
    aff = np.eye(4)
    aff[:3, :3] = rot * np.asarray(zooms, dtype=float)
    if flip_i:  # a left-handed voxel order
        aff[:3, 0] *= -1
    aff[:3, 3] = np.asarray(centre_mm) - aff[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return aff


def _smooth_volume(shape, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vol = ndi.gaussian_filter(rng.standard_normal(shape), 1.5)
    return (vol / np.abs(vol).max() * 100.0 + 100.0).astype(np.float32)


def _sample(volume: np.ndarray, affine: np.ndarray, points_mm: np.ndarray):
    """Linear sampling at RAS points; also whether each point is well inside the image."""
    inv = np.linalg.inv(affine)
    ijk = points_mm @ inv[:3, :3].T + inv[:3, 3]
    val = ndi.map_coordinates(volume.astype(np.float64), ijk.T, order=1, mode='nearest')
    inside = np.all((ijk > 0.5) & (ijk < np.asarray(volume.shape) - 1.5), axis=1)
    return val, inside


@pytest.fixture(scope='module')
def scene(tmp_path_factory):
    """An oblique 24^3 x 3 mm fixed image and an oblique, differently sampled moving image."""
    root = tmp_path_factory.mktemp('keymorph_export')
    shape = (24, 24, 24)
    fixed_aff = _oblique((1, 0.5, 0.2), 25.0, (3.0, 3.0, 3.0), (2.0, -5.0, 8.0), shape, True)
    moving_aff = _oblique((-0.3, 1.0, 0.4), -40.0, (3.2, 2.9, 3.0), (6.0, -2.0, 4.0), shape)
    fixed, moving = _smooth_volume(shape, 0), _smooth_volume(shape, 1)
    paths = {'fixed': root / 'fixed.nii.gz', 'moving': root / 'moving.nii.gz'}
    make_image(fixed, fixed_aff).to_filename(paths['fixed'])
    make_image(moving, moving_aff).to_filename(paths['moving'])
    from keyprep.pipeline.antsutils import import_ants

    ants = import_ants(1)
    return dict(root=root, shape=shape, fixed=fixed, moving=moving, fixed_aff=fixed_aff,
                moving_aff=moving_aff, paths=paths, ants=ants)


def _ants_warp(scene, transform_path, reference: str, image: str) -> np.ndarray:
    ants = scene['ants']
    ref = ants.image_read(str(scene['paths'][reference]))
    img = ants.image_read(str(scene['paths'][image]))
    return ants.apply_transforms(ref, img, [str(transform_path)], interpolator='linear',
                                 whichtoinvert=[False]).numpy()


def _keypoints(scene, n: int, seed: int) -> torch.Tensor:
    """Random keypoints inside the fixed field of view (RAS mm)."""
    g = _gen(seed)
    ijk = torch.rand(n, 3, generator=g, dtype=F64) * 16 + 4
    aff = torch.as_tensor(scene['fixed_aff'])
    return ijk @ aff[:3, :3].T + aff[:3, 3]


def test_affine_export_reproduced_by_ants(scene):
    root = scene['root']
    true = torch.cat([_rotation((0.2, 0.4, 1.0), 12.0) * 1.04, torch.tensor(
        [[2.5], [-3.0], [1.5]], dtype=F64)], dim=1)
    kp = _keypoints(scene, 16, 11)
    mat = fit_affine(kp, apply_affine(true, kp))  # fixed -> moving from keypoints
    assert torch.allclose(mat, true, atol=1e-8)
    fwd = write_itk_affine(mat, root / 'fwd.txt')
    inv = write_itk_affine(affine_inverse(mat), root / 'inv.txt')
    assert np.allclose(read_itk_affine(fwd)[:3], mat.numpy())

    # forward: the moving image on the fixed grid, sampled at T(x)
    x = grid_world_points(scene['shape'], scene['fixed_aff'])
    ref, inside = _sample(scene['moving'], scene['moving_aff'], apply_affine(mat, x).numpy())
    out = _ants_warp(scene, fwd, 'fixed', 'moving').reshape(-1)
    assert inside.mean() > 0.3
    assert np.abs(out - ref)[inside].max() < 1e-3 * 200

    # inverse file (whichtoinvert=[False]): the fixed image on the moving grid at T^-1(y)
    y = grid_world_points(scene['shape'], scene['moving_aff'])
    ref_i, inside_i = _sample(scene['fixed'], scene['fixed_aff'],
                              apply_affine(affine_inverse(mat), y).numpy())
    out_i = _ants_warp(scene, inv, 'moving', 'fixed').reshape(-1)
    assert inside_i.mean() > 0.3
    assert np.abs(out_i - ref_i)[inside_i].max() < 1e-3 * 200

    # point semantics in ITK's LPS: fwd maps a fixed point to T(p), inv maps it back
    ants = scene['ants']
    p = np.array([10.0, -20.0, 15.0])
    q = ants.read_transform(str(fwd)).apply_to_point(tuple(LPS @ p))
    assert np.allclose(LPS @ np.asarray(q), apply_affine(mat, torch.as_tensor(p)).numpy())
    back = ants.read_transform(str(inv)).apply_to_point(q)
    assert np.allclose(LPS @ np.asarray(back), p)


def test_tps_fields_reproduced_by_ants(scene):
    root = scene['root']
    kp = _keypoints(scene, 20, 12)
    g = _gen(13)
    moving_kp = kp @ _rotation((0, 1, 0), 10.0).T + 2.0 + torch.randn(20, 3, generator=g,
                                                                        dtype=F64) * 2.0
    fit = fit_tps(kp.float(), moving_kp.float(), (0.0, 0.1))
    assert isinstance(fit, TPSFit)
    fields = displacement_grid(fit, scene['fixed_aff'], scene['shape'])  # every lambda
    x = grid_world_points(scene['shape'], scene['fixed_aff'])
    for i in range(2):
        path = write_itk_displacement_field(fields[i], scene['fixed_aff'], root / f'tps{i}.nii.gz')
        u, aff = read_displacement_field(path)
        assert np.allclose(aff, scene['fixed_aff'], atol=1e-5)
        assert np.allclose(u, fields[i].numpy(), atol=1e-4)
        mapped = fit.evaluate(x)[0, i].numpy()  # the torch map, exactly
        ref, inside = _sample(scene['moving'], scene['moving_aff'], mapped)
        out = _ants_warp(scene, path, 'fixed', 'moving').reshape(-1)
        assert inside.mean() > 0.3
        assert np.abs(out - ref)[inside].max() < 1e-3 * 200
    # the inverse field on the moving grid brings the fixed image there
    inv = invert_displacement(fit, scene['moving_aff'], scene['shape'], 1)
    assert inv.mean_error_mm < 1e-3
    path = write_itk_displacement_field(inv.field, scene['moving_aff'], root / 'tps_inv.nii.gz')
    y = grid_world_points(scene['shape'], scene['moving_aff'])
    ref, inside = _sample(scene['fixed'], scene['fixed_aff'],
                          (y + inv.field.reshape(-1, 3).double()).numpy())
    out = _ants_warp(scene, path, 'moving', 'fixed').reshape(-1)
    assert inside.mean() > 0.3
    assert np.abs(out - ref)[inside].max() < 1e-3 * 200
