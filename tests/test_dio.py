"""DIO (keyprep.pipeline.dio): solver, implicit gradients, representations, engine API, weights,
training. Small grids, one thread: the whole file runs in about a minute on one core."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.ndimage import distance_transform_edt, map_coordinates

from keyprep.pipeline.dio.implicit import (
    implicit_displacement, newton_polish, trilinear, voxel_terms,
)
from keyprep.pipeline.dio.network import (
    DioConfig, DioFeatureNet, check_dio_weights, init_from_label_network, load_dio,
)
from keyprep.pipeline.dio.register import intensity_features, register_arrays, warp_array
from keyprep.pipeline.dio.solver import (
    SolverConfig, feature_loss, invert_displacement, jacobian_determinant, sample, solve, warp,
)
from keyprep.pipeline.errors import MissingInputError, WeightsError
from keyprep.pipeline.synth.generator import gaussian_blur, identity_grid

TINY = DioConfig(features=4, levels=3, max_features=8, convs_per_level=1, out_channels=4,
                 iterations=(20, 10, 5))


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def _folds(disp: np.ndarray) -> int:
    return int((jacobian_determinant(torch.as_tensor(disp)) <= 0).sum())


# ---------------------------------------------------------------------------- the toy
N_TOY = 48


def _squares():
    """The paper's toy in 3-D: two cubes of side 8 that do not overlap (16 voxels apart)."""
    fixed = np.zeros((N_TOY,) * 3, np.float32)
    moving = np.zeros_like(fixed)
    fixed[12:20, 18:26, 18:26] = 1
    moving[28:36, 20:28, 18:26] = 1
    return fixed, moving


def distance_features(x: torch.Tensor) -> list[torch.Tensor]:
    """A fixed analytic feature map: exp(-distance to the object / 8 voxels), pooled 4, 2, 1."""
    img = x[0, 0].cpu().numpy() > 0.5
    feat = np.exp(-distance_transform_edt(~img) / 8.0)
    return intensity_features(torch.as_tensor(feat, dtype=torch.float32)[None, None])


@pytest.fixture(scope='module')
def toy_results():
    fixed, moving = _squares()
    iters = (100, 50, 25)
    # the exact solver (the trainer's): the registrations' default takes the velocity's
    # gradient to first order, which stops short on this 16-voxel translation (see
    # test_svf_displacement_gradient_registers_without_folds)
    exact = SolverConfig()
    return {
        'intensity': register_arrays(fixed, moving, intensity_features, iterations=iters,
                                     solver=exact),
        'distance': register_arrays(fixed, moving, distance_features, iterations=iters,
                                    solver=exact),
    }


def test_toy_intensity_loss_is_flat_between_non_overlapping_squares():
    """The paper's Fig. 2: over translations that keep the cubes apart, the intensity loss
    does not change (nothing leads the solver towards the other cube; its gradient is a
    sub-voxel interpolation artefact, the same along every axis), while the loss of the
    distance features falls all the way."""
    fixed, moving = _squares()
    f = torch.as_tensor(fixed)[None, None]
    m = torch.as_tensor(moving)[None, None]
    ff, fm = distance_features(f)[-1], distance_features(m)[-1]
    flat, falling = [], []
    for t in (0, 2, 4, 6, 8):  # whole voxels towards the moving cube (16 voxels away)
        shift = torch.zeros(1, 3, *fixed.shape)
        shift[:, 0] = t
        flat.append(float(feature_loss(f, warp(m, shift))))
        falling.append(float(feature_loss(ff, warp(fm, shift))))
    assert max(flat) - min(flat) < 1e-6 * flat[0]
    assert all(b < a for a, b in zip(falling[:-1], falling[1:]))
    shift = torch.zeros(1, 3, 1, 1, 1, requires_grad=True)
    loss = feature_loss(f, warp(m, shift.expand(1, 3, *fixed.shape)))
    (grad,) = torch.autograd.grad(loss, shift)
    assert torch.allclose(grad[0, 0], grad[0, 1]) and torch.allclose(grad[0, 0], grad[0, 2])


def test_toy_features_succeed_where_intensities_fail(toy_results):
    fixed, moving = _squares()
    for rep in ('ffd', 'diffeo', 'affine'):
        for kind, expect in (('intensity', 'fail'), ('distance', 'succeed')):
            disp = toy_results[kind][rep]['disp_fwd']
            d = _dice(warp_array(moving, disp) > 0.5, fixed > 0.5)
            if expect == 'fail':
                assert d < 0.05, (kind, rep, d)
            else:
                assert d > 0.95, (kind, rep, d)
    mat = toy_results['distance']['affine']['affine_vox']
    assert abs(mat[0, 3] - 16) < 1.5  # the 16-voxel translation along the first axis


def test_switching_representation_diffeo_never_folds_where_ffd_folds(toy_results):
    res = toy_results['distance']
    assert _folds(res['ffd']['disp_fwd']) > 100  # the free-form warp tears the background
    assert _folds(res['diffeo']['disp_fwd']) == 0
    assert _folds(res['diffeo']['disp_inv']) == 0
    assert _folds(res['affine']['disp_fwd']) == 0
    # a folded free-form warp has no inverse: the fixed-point iteration says so
    assert res['ffd']['inverse']['residual_max_vox'] > 1.0, res['ffd']['inverse']


def test_svf_displacement_gradient_registers_without_folds(toy_results):
    """The log-domain approximation of the velocity's gradient (``svf_gradient=
    'displacement'``, no back-propagation through scaling and squaring) still brings the
    toy's cubes together without a fold. It is first order: on this toy's 16-voxel
    translation it stops short of the exact gradient (Dice 0.88 against 1.0, measured); on
    the held-out brains it matched it (``benchmarks/results/dio-solver/``)."""
    fixed, moving = _squares()
    out = register_arrays(fixed, moving, distance_features, iterations=(100, 50, 25),
                          representations=('diffeo',),
                          solver=SolverConfig(svf_gradient='displacement'))['diffeo']
    before = _dice(moving > 0.5, fixed > 0.5)
    assert before == 0.0
    assert _dice(warp_array(moving, out['disp_fwd']) > 0.5, fixed > 0.5) > 0.8
    assert _folds(out['disp_fwd']) == 0 and _folds(out['disp_inv']) == 0
    exact = toy_results['distance']['diffeo']
    assert exact['loss'] <= out['loss']
    with pytest.raises(ValueError):
        SolverConfig(svf_gradient='adjoint')


def test_max_vector_norm_equals_torch_norm():
    from keyprep.pipeline.dio.solver import max_vector_norm

    x = torch.randn(1, 3, 7, 8, 9, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(max_vector_norm(x), x.norm(dim=1).max(), rtol=1e-6)


def test_principal_channels_keep_the_loss_of_low_rank_features():
    """Projecting both feature maps on their joint principal components changes the loss
    by exactly the mismatch in the dropped components: none when the features have that
    rank (sampling is linear, so projection and warping commute)."""
    from keyprep.pipeline.dio.solver import principal_channels

    g = torch.Generator().manual_seed(0)
    basis = torch.randn(6, 3, generator=g, dtype=torch.float64)  # rank-3 features in 6 channels
    codes_f = torch.randn(1, 3, 8, 9, 10, generator=g, dtype=torch.float64)
    codes_m = torch.randn(1, 3, 8, 9, 10, generator=g, dtype=torch.float64)
    ff = torch.einsum('ck,bk...->bc...', basis, codes_f) + 2.0
    fm = torch.einsum('ck,bk...->bc...', basis, codes_m) + 2.0
    disp = torch.randn(1, 3, 8, 9, 10, generator=g, dtype=torch.float64)
    pf, pm, kept = principal_channels(ff, fm, 3)
    assert pf.shape == (1, 3, 8, 9, 10) and abs(kept - 1.0) < 1e-9
    full = float(feature_loss(ff, warp(fm, disp))) * 6
    projected = float(feature_loss(pf, warp(pm, disp))) * 3
    assert abs(full - projected) < 1e-8 * full
    pf2, pm2, kept2 = principal_channels(ff, fm, 2)
    assert kept2 < 1.0
    assert float(feature_loss(pf2, warp(pm2, disp))) * 2 < projected
    same = principal_channels(ff, fm, 0)
    assert same[0] is ff and same[2] == 1.0


def _blank_features(x: torch.Tensor) -> list[torch.Tensor]:
    """Features that carry nothing (constant): only a prompt can move the solver."""
    return intensity_features(torch.zeros_like(x))


def test_label_prompting_registers_what_the_features_cannot():
    """With uninformative features, the label-fidelity term alone recovers a 3-voxel shift
    of two labelled boxes (every representation); without it nothing moves."""
    fixed_lab = np.zeros((32, 32, 32), np.int16)
    fixed_lab[8:18, 8:24, 8:24] = 4
    fixed_lab[18:24, 8:24, 8:24] = 17
    moving_lab = np.roll(fixed_lab, 3, axis=0)
    img = fixed_lab.astype(np.float32)
    kw = dict(iterations=(60, 40, 20), spacing_mm=(1.0, 1.0, 1.0), res_mm=1.0,
              labels=(fixed_lab, moving_lab))
    plain = register_arrays(img, np.roll(img, 3, 0), _blank_features, label_weight=0.0, **kw)
    prompted = register_arrays(img, np.roll(img, 3, 0), _blank_features, label_weight=1.0, **kw)
    assert plain['label_channels'] == 0 and prompted['label_channels'] == 2
    for rep in ('ffd', 'diffeo', 'affine'):
        assert np.abs(plain[rep]['disp_fwd']).max() < 1e-6
        warped = warp_array(moving_lab, prompted[rep]['disp_fwd'], order=0)
        for k in (4, 17):
            assert _dice(warped == k, fixed_lab == k) > 0.9, (rep, k)
    with pytest.raises(ValueError):
        register_arrays(img, img, _blank_features, labels=(fixed_lab, moving_lab[:-1]),
                        label_weight=1.0)


# ---------------------------------------------------------------------------- implicit gradient
def _ift_problem(n: int = 8):
    """Smooth features with full-rank gradients, moving = fixed shifted by 0.25-0.75 voxel
    (so every optimum lies inside a trilinear cell: the per-voxel objective is smooth there)."""
    g = torch.Generator().manual_seed(0)
    dt = torch.float64

    def feats(shift):
        i, j, k = identity_grid((n,) * 3, dtype=dt) + shift
        return torch.stack([0.6 * i + 0.4 * torch.sin(0.9 * j), 0.6 * j + 0.4 * torch.sin(0.8 * k),
                            0.6 * k + 0.4 * torch.sin(0.7 * i),
                            torch.cos(0.5 * i + 0.3 * j - 0.4 * k)])[None]

    t = 0.5 + 0.25 * torch.tanh(3 * gaussian_blur(torch.randn(1, 3, n, n, n, generator=g,
                                                               dtype=dt), (2.0,) * 3))
    fixed = feats(0)
    moving = feats(-t[0]) + 0.03 * torch.randn(1, 4, n, n, n, generator=g, dtype=dt)
    return fixed, moving


def test_implicit_gradient_equals_finite_differences():
    fixed, moving = _ift_problem()
    cfg = SolverConfig(iterations=(200,), sigma_grad=0, sigma_warp=0, patience=0, lr=0.05)
    u0 = newton_polish(solve([fixed], [moving], 'ffd', cfg, (1,)).final.field, fixed, moving, 20)
    g, _ = voxel_terms(u0, fixed, moving)
    inner = g.reshape(8, 8, 8, 3)[:-1, :-1, :-1]  # the last plane samples past the border
    assert float(inner.abs().max()) < 1e-10  # an exact stationary point
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(1, 3, 8, 8, 8, generator=gen, dtype=torch.float64)
    w[:, :, -1], w[:, :, :, -1], w[:, :, :, :, -1] = 0, 0, 0

    def outer(ff, fm):  # T(u*(F)) with u* re-solved (Newton from u0)
        return float((w * newton_polish(u0, ff, fm, 10)).sum())

    df = torch.randn(fixed.shape, generator=gen, dtype=torch.float64)
    dm = torch.randn(moving.shape, generator=gen, dtype=torch.float64)
    eps = 1e-6
    plus = outer(fixed + eps * df, moving + eps * dm)
    minus = outer(fixed - eps * df, moving - eps * dm)
    fd = (plus - minus) / (2 * eps)  # central difference along one random direction
    grads = {}
    for mode in ('ift', 'jfb'):
        ff, fm = fixed.clone().requires_grad_(True), moving.clone().requires_grad_(True)
        (w * implicit_displacement(u0, ff, fm, mode, damping=0.0)).sum().backward()
        grads[mode] = torch.cat([ff.grad.flatten(), fm.grad.flatten()])
        if mode == 'ift':  # exact: relative error 1e-6 (measured about 1e-10 in float64)
            analytic = float((ff.grad * df).sum() + (fm.grad * dm).sum())
            assert abs(analytic - fd) < 1e-6 * abs(fd), (analytic, fd)
    # the Jacobian-free gradient is an approximation that still points the same way
    cos = torch.nn.functional.cosine_similarity(grads['ift'], grads['jfb'], dim=0)
    assert float(cos) > 0.3


def test_trilinear_sampler_matches_grid_sample_and_its_gradient():
    gen = torch.Generator().manual_seed(3)
    vol = torch.randn(1, 2, 6, 7, 8, generator=gen, dtype=torch.float64)
    pts = torch.rand(1, 3, 50, 1, 1, generator=gen, dtype=torch.float64) * 9 - 1  # some outside
    p = pts.clone().requires_grad_(True)
    ref = sample(vol, p)[0].reshape(2, -1)
    (ref_grad,) = torch.autograd.grad(ref[1].sum(), p)
    value, grad, _ = trilinear(vol[0], pts[0].reshape(3, -1))
    assert torch.allclose(value, ref, atol=1e-12)
    assert torch.allclose(grad[1], ref_grad[0].reshape(3, -1), atol=1e-12)


# ---------------------------------------------------------------------------- affine
def _blob(shape=(40, 40, 40)) -> np.ndarray:
    """A smooth, asymmetric phantom: a large ellipsoid and six smaller Gaussian blobs."""
    g = np.indices(shape, dtype=np.float64)
    c = [(n - 1) / 2 for n in shape]
    scale = min(shape) / 40
    img = np.exp(-sum(((g[a] - c[a]) / (s * scale)) ** 2 for a, s in enumerate((11, 8, 6))))
    rng = np.random.default_rng(7)
    for _ in range(6):
        centre = [ci + rng.uniform(-9, 9) * scale for ci in c]
        width = rng.uniform(2.5, 4.5) * scale
        img += rng.uniform(0.4, 0.9) * np.exp(-sum((g[a] - centre[a]) ** 2 for a in range(3))
                                              / (2 * width ** 2))
    return img.astype(np.float32)


def test_affine_representation_recovers_a_known_affine():
    fixed = _blob()
    ang = math.radians(6.0)
    rot = np.array([[math.cos(ang), -math.sin(ang), 0], [math.sin(ang), math.cos(ang), 0],
                    [0, 0, 1]])
    lin = rot @ np.diag([1.05, 0.97, 1.0])
    c = (np.array(fixed.shape) - 1) / 2
    true = np.eye(4)
    true[:3, :3] = lin
    true[:3, 3] = c - lin @ c + np.array([2.0, -1.5, 1.0])
    # moving(true @ x) = fixed(x): moving(y) = fixed(true^-1 y)
    inv = np.linalg.inv(true)
    grid = np.indices(fixed.shape).reshape(3, -1)
    src = inv[:3, :3] @ grid + inv[:3, 3:]
    moving = map_coordinates(fixed, src, order=1).reshape(fixed.shape).astype(np.float32)
    out = register_arrays(fixed, moving, intensity_features, representations=('affine',),
                          iterations=(200, 100, 50))
    mat = out['affine']['affine_vox']
    assert np.abs(mat[:3, :3] - true[:3, :3]).max() < 0.03
    # compare where it matters: the mapped positions of the blob's voxels
    inside = grid[:, fixed.reshape(-1) > 0.3]
    err = (mat[:3, :3] @ inside + mat[:3, 3:]) - (true[:3, :3] @ inside + true[:3, 3:])
    assert np.sqrt((err ** 2).sum(0)).max() < 0.6  # voxels
    # disp_inv is the inverse map
    fwd, bwd = out['affine']['disp_fwd'], out['affine']['disp_inv']
    x = np.array([20, 21, 19])
    y = x + fwd[:, 20, 21, 19]
    back = y + np.array([map_coordinates(bwd[a], y[:, None], order=1)[0] for a in range(3)])
    assert np.allclose(back, x, atol=0.05)


# ---------------------------------------------------------------------------- sizes, spacing
def test_different_sizes_and_anisotropic_voxels_run_without_retraining():
    torch.manual_seed(0)
    model = DioFeatureNet(TINY)
    for shape, spacing in (((30, 26, 20), (1.0, 1.0, 3.0)), ((17, 40, 33), (2.0, 1.5, 1.0))):
        img = np.random.default_rng(0).random(shape).astype(np.float32)
        out = register_arrays(img, np.roll(img, 1, 0), model, spacing_mm=spacing,
                              representations=('ffd', 'diffeo'), iterations=5)
        for rep in ('ffd', 'diffeo'):
            assert out[rep]['disp_fwd'].shape == (3, *shape)
            assert np.isfinite(out[rep]['disp_fwd']).all()


def test_anisotropic_grid_recovers_the_same_shift_in_mm():
    """One blob phantom shifted by (4, -2, 2) mm, sampled at 2 mm isotropic and at 2x2x4 mm:
    the affine representation finds the same physical shift on both grids."""
    shift_mm = np.array([4.0, -2.0, 2.0])
    results = []
    for spacing in ((2.0, 2.0, 2.0), (2.0, 2.0, 4.0)):
        shape = tuple(int(80 / s) for s in spacing)
        mm = (np.indices(shape, dtype=np.float64) + 0.5) * np.array(spacing).reshape(3, 1, 1, 1)

        def phantom(offset):
            p = mm - 40.0 - offset.reshape(3, 1, 1, 1)
            r = (p[0] / 18) ** 2 + (p[1] / 13) ** 2 + (p[2] / 10) ** 2
            return (np.exp(-r) + 0.5 * np.exp(-((p[0] - 8) ** 2 + p[1] ** 2 + p[2] ** 2) / 60)
                    ).astype(np.float32)

        out = register_arrays(phantom(np.zeros(3)), phantom(shift_mm), intensity_features,
                              spacing_mm=spacing, res_mm=2.0, representations=('affine',),
                              iterations=(150, 80, 40))
        mat = out['affine']['affine_vox']
        centre = (np.array(shape) - 1) / 2
        moved = mat[:3, :3] @ centre + mat[:3, 3] - centre
        results.append(moved * np.array(spacing))
    for found in results:
        assert np.abs(found - shift_mm).max() < 0.8, results
    assert np.abs(results[0] - results[1]).max() < 0.8


def test_invert_displacement_fixed_point_on_a_smooth_field():
    """v(y) = -u(y + v(y)) for a smooth 2.5-voxel field: converged, residual below 1e-3
    voxels, and the round trip x -> x + u(x) -> ... + v(...) measured independently with
    scipy is the identity; the identity field inverts to itself at once."""
    gen = torch.Generator().manual_seed(3)
    u = gaussian_blur(torch.randn(1, 3, 24, 20, 28, generator=gen), [3.0] * 3)
    u = u * (2.5 / float(u.square().sum(1).sqrt().max()))
    v, info = invert_displacement(u)
    assert info['converged'] and info['residual_max_vox'] < 1e-3, info
    fwd, inv = u[0].numpy().astype(np.float64), v[0].numpy().astype(np.float64)
    grid = np.indices(fwd.shape[1:], dtype=np.float64)
    pos = grid + fwd
    back = pos + np.stack([map_coordinates(inv[a], pos, order=1, mode='nearest')
                           for a in range(3)])
    err = np.sqrt(((back - grid) ** 2).sum(0))[4:-4, 4:-4, 4:-4]
    assert err.max() < 0.02, err.max()
    assert np.sqrt((fwd ** 2).sum(0)).mean() > 0.25  # not a trivial field
    zero, info0 = invert_displacement(torch.zeros(1, 3, 6, 6, 6))
    assert info0['iterations'] == 1 and float(zero.abs().max()) == 0.0


# ---------------------------------------------------------------------------- image prompting
def test_lncc_matches_direct_windowed_formula_and_ignores_affine_contrast():
    from keyprep.pipeline.dio.solver import image_loss, lncc

    rng = np.random.default_rng(3)
    a = rng.normal(size=(9, 10, 8))
    b = 0.5 * a + rng.normal(scale=0.7, size=a.shape)
    got = lncc(torch.tensor(a)[None, None], torch.tensor(b)[None, None], window=3,
               eps=0.0)[0, 0].numpy()

    def direct(x, y, idx):  # the window clipped to the grid, as the box mean is
        sl = tuple(slice(max(i - 1, 0), i + 2) for i in idx)
        xs, ys = x[sl].ravel(), y[sl].ravel()
        cov = ((xs - xs.mean()) * (ys - ys.mean())).mean()
        return cov ** 2 / (xs.var() * ys.var())

    for idx in [(4, 5, 3), (0, 0, 0), (8, 9, 7), (0, 5, 7)]:
        assert got[idx] == pytest.approx(direct(a, b, idx), rel=1e-8, abs=1e-10)
    assert 0.0 <= got.min() and got.max() <= 1.0 + 1e-9
    # squared, so an inverted contrast (negative slope, any offset) correlates the same
    flipped = lncc(torch.tensor(a)[None, None], torch.tensor(3.0 - 2.0 * b)[None, None],
                   window=3, eps=0.0)[0, 0].numpy()
    assert np.allclose(flipped, got, atol=1e-9)
    same = lncc(torch.tensor(a)[None, None], torch.tensor(a)[None, None], window=5)
    assert float(same.min()) > 0.99
    assert float(image_loss(torch.tensor(a)[None, None], torch.tensor(a)[None, None])) < 0.01 * a.size
    with pytest.raises(ValueError):
        lncc(torch.tensor(a)[None, None], torch.tensor(b)[None, None], window=4)


def test_box_mean_equals_average_pooling_forward_and_backward():
    """The shifted-sum box mean (shared by DIO's image term and KeyMorph's refinement) is
    the border-clipped average: bit-identical on CPU to ``avg_pool3d`` with
    ``count_include_pad=False``, values and gradients, including windows longer than an
    axis (largest odd size that fits) and even-sized axes."""
    import torch.nn.functional as F

    from keyprep.pipeline.similarity import box_mean

    def pooled(x, window):
        for axis in range(3):
            size = x.shape[2 + axis]
            k = min(window, size if size % 2 else size - 1)
            if k <= 1:
                continue
            kernel = tuple(k if a == axis else 1 for a in range(3))
            x = F.avg_pool3d(x, kernel, stride=1, padding=tuple(n // 2 for n in kernel),
                             count_include_pad=False)
        return x

    gen = torch.Generator().manual_seed(0)
    for shape, window in [((1, 5, 12, 9, 10), 5), ((2, 3, 7, 2, 9), 7), ((1, 1, 6, 6, 6), 3)]:
        x0 = torch.rand(*shape, generator=gen)
        w = torch.rand(*shape, generator=gen)
        out, grads = [], []
        for fn in (box_mean, pooled):
            x = x0.clone().requires_grad_(True)
            y = fn(x, window)
            (y * w).sum().backward()
            out.append(y.detach())
            grads.append(x.grad)
        assert torch.equal(out[0], out[1]) and torch.equal(grads[0], grads[1])
    # a hand-checked value: the corner of a 3-voxel window averages the 2x2x2 voxels inside
    x = torch.arange(27.0).reshape(1, 1, 3, 3, 3)
    assert float(box_mean(x, 3)[0, 0, 0, 0, 0]) == pytest.approx(
        float(x[0, 0, :2, :2, :2].mean()))

def test_image_term_off_is_dio_alone_and_with_no_feature_channel_is_the_image_term():
    fixed = torch.tensor(_blob((32, 32, 32)))[None, None]
    moving = torch.roll(fixed, 2, dims=3)
    ff, fm = intensity_features(fixed), intensity_features(moving)
    images = (intensity_features(fixed), intensity_features(moving))
    cfg = SolverConfig(iterations=(10, 10, 10), patience=0)
    plain = solve(ff, fm, 'diffeo', cfg)  # weight 0: exactly DIO's feature solve
    zero = solve(ff, fm, 'diffeo', cfg, images=images, image_weight=0.0)
    assert torch.equal(plain.final.field, zero.final.field)
    blank = [f * 0 for f in ff]  # constant features: the image term alone moves anything
    still = solve(blank, blank, 'ffd', cfg)
    assert float(still.final.field.abs().max()) == 0.0
    moved = solve(blank, blank, 'ffd', cfg, images=images, image_weight=1.0)
    assert float(moved.final.field.abs().max()) > 0.5
    empty = [f[:, :0] for f in ff]  # features with no channel
    alone = solve(empty, empty, 'ffd', cfg, images=images, image_weight=1.0)
    assert torch.allclose(alone.final.field, moved.final.field, atol=1e-5)
    with pytest.raises(ValueError):
        solve(empty, empty, 'ffd', cfg)  # nothing to register
    with pytest.raises(ValueError):
        solve(ff, fm, 'ffd', cfg, image_weight=1.0)  # a weight without images


def test_image_prompting_registers_what_the_features_cannot():
    """With uninformative features, the images' LNCC term alone recovers a 3-voxel shift of
    two boxes of different intensity (every representation); without it nothing moves."""
    fixed_lab = np.zeros((32, 32, 32), np.int16)
    fixed_lab[8:18, 8:24, 8:24] = 4
    fixed_lab[18:24, 8:24, 8:24] = 17
    moving_lab = np.roll(fixed_lab, 3, axis=0)
    img = np.where(fixed_lab == 4, 1.0, np.where(fixed_lab == 17, 0.4, 0.0)).astype(np.float32)
    kw = dict(iterations=(60, 40, 20), spacing_mm=(1.0, 1.0, 1.0), res_mm=1.0)
    plain = register_arrays(img, np.roll(img, 3, 0), _blank_features, **kw)
    prompted = register_arrays(img, np.roll(img, 3, 0), _blank_features, image_weight=1.0,
                               **kw)
    assert plain['image_weight'] == 0.0 and prompted['image_weight'] == 1.0
    assert prompted['image_window'] == 5
    for rep in ('ffd', 'diffeo', 'affine'):
        assert np.abs(plain[rep]['disp_fwd']).max() < 1e-6
        warped = warp_array(moving_lab, prompted[rep]['disp_fwd'], order=0)
        before = np.mean([_dice(moving_lab == k, fixed_lab == k) for k in (4, 17)])
        after = [_dice(warped == k, fixed_lab == k) for k in (4, 17)]
        assert after[0] > 0.95 and np.mean(after) > before + 0.15, (rep, after, before)


# ---------------------------------------------------------------------------- engine API
def test_register_arrays_shapes_dtypes_and_inverse():
    torch.manual_seed(0)
    model = DioFeatureNet(TINY)
    fixed = _blob((24, 28, 20)) * 300.0  # any intensity scale
    moving = np.roll(fixed, 2, axis=1)
    out = register_arrays(fixed, moving, model, spacing_mm=(2.0, 2.0, 2.0))
    assert set(out) == {'ffd', 'diffeo', 'affine', 'timings', 'label_channels',
                        'kept_variance', 'solver_channels', 'image_weight', 'image_window'}
    assert out['image_weight'] == 0.0  # DIO's feature objective alone by default
    assert out['label_channels'] == 0
    assert {'features_s', 'ffd_s', 'diffeo_s', 'affine_s', 'total_s'} <= set(out['timings'])
    for rep in ('ffd', 'diffeo', 'affine'):
        r = out[rep]
        assert r['disp_fwd'].shape == (3, 24, 28, 20) and r['disp_fwd'].dtype == np.float32
        assert len(r['iterations']) == 3 and np.isfinite(r['loss'])
    assert out['diffeo']['disp_inv'].dtype == np.float32
    assert out['ffd']['disp_inv'].dtype == np.float32
    assert out['affine']['affine_vox'].shape == (4, 4)
    grid = np.indices(fixed.shape, dtype=np.float64)

    def round_trip(rep):  # |x + u(x) + v(x + u(x)) - x| at interior voxels
        fwd, inv = out[rep]['disp_fwd'], out[rep]['disp_inv']
        pos = grid + fwd
        back = pos + np.stack([map_coordinates(inv[a], pos, order=1, mode='nearest')
                               for a in range(3)])
        return np.sqrt(((back - grid) ** 2).sum(0))[3:-3, 3:-3, 3:-3]

    err = round_trip('diffeo')  # exp(v) o exp(-v) is the identity
    assert err.mean() < 0.03 and err.max() < 0.25, (err.mean(), err.max())
    # the free-form field's fixed-point inverse, computed on the working grid
    # (an untrained network's free-form field is rough: the inverse is exact on the working
    # grid, and the round trip on the input grid is bounded by the resampling between them)
    info = out['ffd']['inverse']
    assert info['residual_mean_vox'] < 1e-2, info
    err = round_trip('ffd')
    size = np.sqrt((out['ffd']['disp_fwd'] ** 2).sum(0))[3:-3, 3:-3, 3:-3]
    assert err.mean() < 0.2 * size.mean(), (err.mean(), size.mean())
    with pytest.raises(ValueError):
        register_arrays(fixed, moving[:-1], model)
    with pytest.raises(ValueError):
        register_arrays(fixed, moving, model, representations=('bspline',))


def test_register_arrays_on_principal_channels():
    """The default solver registers each scale's 4 principal components (a network with 8
    feature channels: fewer than every channel's variance is kept, and said); every channel
    with ``channels=0``."""
    torch.manual_seed(0)
    model = DioFeatureNet(replace(TINY, out_channels=8))
    fixed = _blob((24, 28, 20)) * 300.0
    moving = np.roll(fixed, 2, axis=1)
    out = register_arrays(fixed, moving, model, spacing_mm=(2.0, 2.0, 2.0),
                          representations=('diffeo',))
    assert out['solver_channels'] == 4
    assert len(out['kept_variance']) == 3
    assert all(0.5 < v < 1.0 for v in out['kept_variance']), out['kept_variance']
    full = register_arrays(fixed, moving, model, spacing_mm=(2.0, 2.0, 2.0),
                           representations=('diffeo',), solver=SolverConfig())
    assert full['solver_channels'] == 8 and full['kept_variance'] == [1.0, 1.0, 1.0]
    for res in (out, full):
        assert _folds(res['diffeo']['disp_fwd']) == 0


def test_network_scales_and_label_network_encoder():
    model = DioFeatureNet(TINY)
    feats = model(torch.rand(1, 1, 16, 24, 8))
    assert [tuple(f.shape[2:]) for f in feats] == [(4, 6, 2), (8, 12, 4), (16, 24, 8)]
    with pytest.raises(ValueError):
        model(torch.rand(1, 1, 15, 24, 8))
    full = DioFeatureNet(DioConfig())
    before = full.down[0][0].weight.detach().clone()
    assert init_from_label_network(full) == 32  # 4 levels x 2 convs x (conv w, b, norm w, b)
    assert not torch.equal(before, full.down[0][0].weight)
    with pytest.raises(ValueError):
        init_from_label_network(DioFeatureNet(TINY))


# ---------------------------------------------------------------------------- weights
def test_check_dio_weights_and_errors(tmp_path):
    from keyprep.pipeline.dio.network import FORMAT

    model = DioFeatureNet(TINY)
    good = tmp_path / 'dio.pt'
    torch.save({'format': FORMAT, 'state_dict': {k: v.half() for k, v in
                                                  model.state_dict().items()},
                'config': TINY.to_dict(), 'step': 0, 'recipe': {}}, good)
    info = check_dio_weights(good)
    assert info['path'] == str(good) and len(info['sha256']) == 64
    loaded = load_dio(good)
    assert loaded.config == TINY and not loaded.training
    with pytest.raises(MissingInputError):
        check_dio_weights(tmp_path / 'absent.pt')
    corrupt = tmp_path / 'corrupt.pt'
    corrupt.write_bytes(b'not a torch file' * 10)
    with pytest.raises(WeightsError):
        check_dio_weights(corrupt)
    wrong = tmp_path / 'wrong.pt'
    state = model.state_dict()
    key = next(iter(state))
    state[key] = torch.zeros(1)
    torch.save({'format': FORMAT, 'state_dict': state, 'config': TINY.to_dict()}, wrong)
    with pytest.raises(WeightsError):
        check_dio_weights(wrong)
    other = tmp_path / 'other.pt'
    torch.save({'format': 'keyprep-keymorph-1', 'state_dict': model.state_dict(),
                'config': TINY.to_dict()}, other)
    with pytest.raises(WeightsError):
        check_dio_weights(other)


# ---------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_register_arrays_on_cuda_matches_cpu():
    torch.manual_seed(0)
    model = DioFeatureNet(TINY)
    fixed = _blob((24, 24, 24))
    moving = np.roll(fixed, 2, axis=0)
    cpu = register_arrays(fixed, moving, model, representations=('ffd', 'affine'))
    gpu = register_arrays(fixed, moving, model, representations=('ffd', 'affine'), device='cuda')
    for rep in ('ffd', 'affine'):
        assert np.abs(cpu[rep]['disp_fwd'] - gpu[rep]['disp_fwd']).max() < 0.05


# ---------------------------------------------------------------------------- training
@pytest.fixture(scope='module')
def toy_maps():
    from keyprep.pipeline.synth.generator import label_map_from_array
    from tests.test_keymorph_network import toy_volume

    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = -35.0
    return [label_map_from_array(toy_volume(36 + 2 * i, i), aff, f'toy_{i}') for i in range(5)]


def _tiny_train_cfg(**kw):
    from keyprep.pipeline.dio.train import DioTrainConfig
    from keyprep.pipeline.synth.generator import SynthConfig

    base = dict(net=TINY, synth=SynthConfig(shape=(32, 32, 32), translation_mm=2.0,
                                            skull_strip_prob=1.0, res_prob=0.0),
                steps=3, warmup=1, checkpoint_every=1, val_every=3, level_steps=(0, 1, 2),
                train_iterations=(8, 4, 2))
    base.update(kw)
    return DioTrainConfig(**base)


def test_training_resumes_exactly_validates_and_exports(toy_maps, tmp_path):
    from keyprep.pipeline.dio.train import INFERENCE_ITERATIONS, export_weights, train

    maps = (toy_maps[:3], toy_maps[3:])
    cfg = _tiny_train_cfg()
    straight = train(None, tmp_path / 'a', cfg, maps=maps, log=lambda *_: None)
    half = train(None, tmp_path / 'b', cfg, maps=maps, log=lambda *_: None, max_minutes=0)
    assert torch.load(half, weights_only=True)['step'] == 1  # stopped (and saved) after 1
    resumed = train(None, tmp_path / 'b', cfg, maps=maps, log=lambda *_: None)
    assert half == resumed
    a = torch.load(straight, weights_only=True)
    b = torch.load(resumed, weights_only=True)
    assert a['step'] == b['step'] == 3
    for key in a['model']:
        assert torch.equal(a['model'][key], b['model'][key]), key
    rows = (tmp_path / 'a' / 'train_log.tsv').read_text().splitlines()
    assert len(rows) == 4 and rows[-1].split('\t')[4] == '3'  # 3 levels at step 3
    def logged(run):  # every column but the timings
        rows = (tmp_path / run / 'train_log.tsv').read_text().splitlines()
        return [r.split('\t')[:8] for r in rows]

    assert logged('a') == logged('b')
    val = (tmp_path / 'a' / 'val_log.tsv').read_text().splitlines()
    header = val[0].split('\t')
    assert header[:3] == ['step', 'dice_identity', 'dice_ffd'] and val[1].startswith('3\t')
    values = dict(zip(header, val[1].split('\t')))
    assert 0 <= float(values['dice_diffeo']) <= 1 and float(values['fold_pct_diffeo']) >= 0
    meta = export_weights(straight, tmp_path / 'dio.pt')
    assert check_dio_weights(meta['path'])['sha256'] == meta['sha256']
    payload = torch.load(meta['path'], weights_only=True)
    assert set(payload) == {'format', 'state_dict', 'config', 'step', 'recipe'}
    model = load_dio(meta['path'])  # carries the registrations' default iterations
    assert model.config == replace(TINY, iterations=INFERENCE_ITERATIONS)
    kept = export_weights(straight, tmp_path / 'dio_train_iters.pt', iterations=None)
    assert load_dio(kept['path']).config == TINY
    # the held-out maps never enter training
    with pytest.raises(ValueError):
        train(None, tmp_path / 'c', cfg, maps=(toy_maps, toy_maps[3:]),
              held_out=('toy_3', 'toy_4'), log=lambda *_: None)


def test_implicit_gradient_reaches_the_network(toy_maps):
    from keyprep.pipeline.dio.train import DioTrainer

    for mode in ('jfb', 'ift'):
        trainer = DioTrainer(toy_maps[:3], _tiny_train_cfg(implicit=mode))
        batch = trainer.batch(0)
        batch['side'] = 'both'
        loss, terms = trainer.loss(2, batch)
        loss.backward()
        heads = {k: p.grad for k, p in trainer.model.named_parameters() if k.startswith('heads')}
        assert terms['levels'] == 3
        assert all(g is not None and float(g.abs().sum()) > 0 for g in heads.values()), mode


def test_prompted_training_solves_the_engines_objective(toy_maps):
    """With ``image_weight`` the trainer's inner solves add the images' LNCC (the engine's
    objective): on one batch the optimum moves and the outer loss changes, the gradient
    still reaches the network, and the recipe validates through the engine with it."""
    from keyprep.pipeline.dio.train import RECIPES, DioTrainConfig, DioTrainer

    losses, grads = {}, {}
    for weight in (0.0, 4.0):
        trainer = DioTrainer(toy_maps[:3], _tiny_train_cfg(image_weight=weight))
        batch = trainer.batch(0)
        batch['side'] = 'both'
        loss, terms = trainer.loss(2, batch)
        loss.backward()
        losses[weight] = float(loss.detach())
        grads[weight] = [p.grad for k, p in trainer.model.named_parameters()
                         if k.startswith('heads')]
        assert terms['levels'] == 3
    assert losses[0.0] != losses[4.0]
    assert all(g is not None and float(g.abs().sum()) > 0 for g in grads[4.0])
    recipe = RECIPES['cpu-2mm-prompted']
    assert (recipe.image_weight, recipe.image_window, recipe.init_weights) == (4.0, 5, 'shipped')
    assert DioTrainConfig.from_dict(recipe.to_dict()) == recipe
    for bad in ({'image_weight': -1.0}, {'image_weight': float('nan')}, {'image_window': 4}):
        with pytest.raises(ValueError):
            _tiny_train_cfg(**bad)


def _toy_real(n=36, seed=0):
    """A toy label map with a real-like image on the uncropped grid (the map is cropped, so
    the two grids differ): smooth texture inside the brain, independent of the labels."""
    from keyprep.pipeline.synth.generator import RealImage, label_map_from_array
    from tests.test_keymorph_network import toy_volume

    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = -35.0
    vol = toy_volume(n, seed)
    g = np.indices(vol.shape).astype(float)
    img = 100 + 40 * np.sin(g[0] / 3.0) * np.cos(g[1] / 4.0) + 20 * np.sin(g[2] / 5.0)
    img[np.isin(vol, (0, 502))] = 0
    return label_map_from_array(vol, aff, f'real_{seed}'), RealImage(img, aff, f'real_{seed}')


def test_real_pair_moves_image_and_labels_together():
    """Two copies of one real image, each moved by the synthesizer's spatial model: the
    moving copy sampled at the exact correspondence is the fixed copy (trilinear error
    only), the image is zero exactly where the labels are background, and a generator seed
    gives the same pair."""
    from keyprep.pipeline.synth.generator import SynthConfig, Synthesizer, sample_field

    lm, im = _toy_real()
    cfg = SynthConfig(shape=(32, 32, 32), rotation_deg=10, translation_mm=4, scaling=0.05,
                      nonlin_std_mm=2.0, bias_std=0.0, gamma_std=0.0, res_prob=0.0,
                      noise_std=0.0, flip_prob=0.5)
    syn = Synthesizer([lm], cfg)
    a = syn.real_pair({0: im}, torch.Generator().manual_seed(3))
    b = syn.real_pair({0: im}, torch.Generator().manual_seed(3))
    assert torch.equal(a['fixed']['image'], b['fixed']['image'])
    assert torch.equal(a['moving']['labels'], b['moving']['labels'])
    for side in ('fixed', 'moving'):
        img, lab = a[side]['image'][0, 0], a[side]['labels'][0]
        assert torch.all(img[lab == 0] == 0) and float((img[lab > 0] > 0).float().mean()) > 0.99
    fixed, moving = a['fixed']['image'], a['moving']['image']
    assert not torch.allclose(fixed, moving, atol=0.05)  # two different poses
    back = sample_field(moving, a['fixed_to_moving'])[0, 0]
    lab_back = sample_field(a['moving']['labels'][None].float(), a['fixed_to_moving'],
                            mode='nearest')[0, 0]
    inner = (a['fixed']['labels'][0] > 0) & (lab_back > 0)
    from scipy.ndimage import binary_erosion

    inner = torch.as_tensor(binary_erosion(inner.numpy(), iterations=2))
    err = (back[0] if back.ndim == 4 else back)[inner] - fixed[0, 0][inner]
    assert inner.sum() > 2000 and float(err.abs().mean()) < 0.02
    brain = a['fixed']['labels'][0] > 0
    agree = float((lab_back.long() == a['fixed']['labels'][0])[brain].float().mean())
    same_voxel = float((a['moving']['labels'][0] == a['fixed']['labels'][0])[brain].float().mean())
    # two nearest-neighbour resamplings of thin 2 mm structures: boundary voxels disagree
    assert agree > 0.85 and agree > same_voxel + 0.1, (agree, same_voxel)


def test_real_image_rejects_bad_input_and_ignores_nan():
    from keyprep.pipeline.synth.generator import RealImage

    aff = np.eye(4)
    with pytest.raises(ValueError, match='3-D'):
        RealImage(np.ones((4, 4, 4, 2)), aff)
    with pytest.raises(ValueError, match='no positive voxel'):
        RealImage(np.zeros((4, 4, 4)), aff)
    with pytest.raises(ValueError, match='invertible'):
        RealImage(np.ones((4, 4, 4)), np.zeros((4, 4)))
    data = np.full((4, 4, 4), 10.0)
    data[0, 0, 0] = np.nan
    im = RealImage(data, aff)
    assert np.isfinite(im.data).all() and im.data[0, 0, 0] == 0 and im.data.max() == 255.0


def test_real_pairs_in_training_and_init_from_weights(toy_maps, tmp_path):
    """``real_prob``: that fraction of the steps trains on a real image's pair (logged
    ``<side>/real``); ``init_weights`` starts a new run from exported weights exactly."""
    from keyprep.pipeline.dio.train import (DioTrainer, export_weights, init_from_weights,
                                            train)

    real = [_toy_real(36, 7)]
    cfg = _tiny_train_cfg(real_prob=1.0, real_anatomies=('icbm',), val_every=0)
    trainer = DioTrainer(toy_maps[:3], cfg, real=real)
    batch = trainer.batch(0)
    assert batch['real'] and batch['fixed'].shape == (1, 1, 32, 32, 32)
    terms = trainer.step(0, batch)
    assert terms['side'].endswith('/real') and np.isfinite(terms['loss'])
    ckpt = train(None, tmp_path / 'a', cfg, maps=(toy_maps[:3], toy_maps[3:]), real=real,
                 log=lambda *_: None)
    sides = [r.split('\t')[5] for r in
             (tmp_path / 'a' / 'train_log.tsv').read_text().splitlines()[1:]]
    assert len(sides) == 3 and all(x.endswith('/real') for x in sides)
    meta = export_weights(ckpt, tmp_path / 'w.pt', half=False)
    fresh = DioTrainer(toy_maps[:3], _tiny_train_cfg())
    assert init_from_weights(fresh.model, meta['path']) > 0
    done = torch.load(ckpt, weights_only=True)['model']
    for k, v in fresh.model.state_dict().items():
        assert torch.equal(v, done[k]), k
    cfg2 = _tiny_train_cfg(init_weights=meta['path'], steps=1, val_every=0)
    first = train(None, tmp_path / 'b', cfg2, maps=(toy_maps[:3], toy_maps[3:]),
                  log=lambda *_: None)
    assert torch.load(first, weights_only=True)['step'] == 1
    with pytest.raises(ValueError):
        _tiny_train_cfg(real_prob=0.5)  # real pairs need a real image
    with pytest.raises(ValueError):
        _tiny_train_cfg(real_prob=0.5, real_anatomies=('colin27',))  # the benchmark's brain


# ---------------------------------------------------------------------------- shipped model
def test_shipped_weights_register_a_real_brain():
    """The shipped model matches its card's checksum and step, passes the run-time check, and
    registers a real brain (Colin27, 2 mm) to a copy of itself shifted by (4, -3, 3) voxels and
    bent by a smooth sinusoid: the diffeomorphic variant recovers the motion (the brains'
    overlap rises from below 0.9 to above 0.94, the mean displacement error inside the brain
    falls below a voxel) without a fold. (A random network's features mislead the solver:
    `training/README.md`, the smoke runs.) Its held-out accuracy is in the model card."""
    import hashlib
    import json

    from scipy.ndimage import map_coordinates as mc

    from keyprep.pipeline.dio.network import check_dio_weights, default_weights
    from tests.conftest import CH2BET, coarse

    path = default_weights()
    card = json.loads(path.with_suffix('.json').read_text())
    assert hashlib.sha256(path.read_bytes()).hexdigest() == card['sha256']
    assert check_dio_weights(path)['sha256'] == card['sha256']
    assert path.stat().st_size < 5e6
    model = load_dio(path)
    assert card['training_step'] == torch.load(path, weights_only=True)['step']
    assert (path.parent / 'MODEL_CARD.md').read_text().count(card['sha256']) >= 1
    torch.set_num_threads(1)
    fixed = np.asarray(coarse(CH2BET, 2.0).dataobj, dtype=np.float32)
    grid = np.indices(fixed.shape, dtype=np.float64)
    # the true pull-back: moving(x + t(x)) = fixed(x), moving = fixed(y - t) to first order
    t = np.stack([np.full(fixed.shape, 4.0), np.full(fixed.shape, -3.0),
                  3.0 + 1.5 * np.sin(2 * np.pi * grid[0] / fixed.shape[0])])
    moving = mc(fixed, grid - t, order=1, mode='constant').astype(np.float32)
    out = register_arrays(fixed, moving, model, representations=('diffeo',),
                          spacing_mm=(2.0, 2.0, 2.0))
    disp = out['diffeo']['disp_fwd']
    brain = fixed > 0
    before = _dice(moving > 0, brain)
    after = _dice(warp_array(moving, disp) > 0, brain)
    err = np.sqrt(((disp - t) ** 2).sum(0))[brain]
    assert before < 0.9 and after > 0.94, (before, after)  # measured 0.864 -> 0.951
    assert err.mean() < 1.0, err.mean()  # of a 5.9-voxel mean motion; measured 0.45
    assert _folds(disp) == 0
