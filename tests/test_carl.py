"""CARL (keyprep.pipeline.carl): the paper's claims checked exactly, the losses, the
inference API and the weights checks. Small grids, random weights, one CPU thread."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from keyprep.pipeline.carl import losses as L
from keyprep.pipeline.carl.network import (
    FORMAT, CarlConfig, CarlNet, CoordinateAttention, RefineUNet, cell_centres,
    check_carl_weights, compose, coordinate_attention, eval_disp, load_carl, register_arrays,
)
from keyprep.pipeline.errors import MissingInputError, WeightsError
from keyprep.pipeline.synth.generator import gaussian_blur, identity_grid

torch.set_num_threads(1)

#: a small CARL for tests: 32^3 working grid, attention at 8^3
TINY = CarlConfig(shape=(32, 32, 32), res_mm=4.0, enc_channels=8, enc_blocks=1,
                  dilations=(1, 2), feat_dim=8, pad=2, refine1=(4, 8), refine2=(4, 8))


def shifted(img: torch.Tensor, s) -> torch.Tensor:
    """``img o S`` for the translation ``S(x) = x + s`` (voxels): ``(I o S)(x) = I(x + s)``,
    the content moves by ``-s`` (a roll: the tests keep the content away from the edges)."""
    return torch.roll(img, shifts=tuple(-int(v) for v in s), dims=(2, 3, 4))


def expected_wu(u: torch.Tensor, level: int, w, r) -> torch.Tensor:
    """``W^-1 o Phi o U`` as a displacement on the cells of a level-``level`` field ``u`` of
    ``Phi``, for ``W(x) = x + w`` and ``U(x) = x + r`` (multiples of ``2**level`` voxels):
    ``u'(x) = u(x + r) + r - w``."""
    rr = [int(v) // 2 ** level for v in r]
    delta = (torch.as_tensor(r) - torch.as_tensor(w)).float().view(1, 3, 1, 1, 1)
    return shifted(u, rr) + delta


# ---------------------------------------------------------------------------- attention
def test_attention_permutation_equivariance():
    """Eq. 8: permuting keys and values together (P1) leaves the output unchanged, permuting
    the queries (P2) permutes the output alike."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 50, 16, generator=g), torch.randn(1, 70, 16, generator=g)
    v = torch.randn(1, 70, 3, generator=g) * 10
    out = coordinate_attention(q, k, v)
    p1, p2 = torch.randperm(70, generator=g), torch.randperm(50, generator=g)
    assert torch.allclose(coordinate_attention(q, k[:, p1], v[:, p1]), out, atol=1e-5)
    assert torch.allclose(coordinate_attention(q[:, p2], k, v), out[:, p2], atol=1e-5)
    # a permutation of the values alone changes it (the check can fail)
    assert not torch.allclose(coordinate_attention(q, k, v[:, p1]), out, atol=1e-2)


def test_attention_affine_equivariance():
    """Eq. 9: the weights sum to one, so an affine map of the values (coordinates) maps the
    output by the same affine map; a translation of the coordinates adds to the output."""
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 40, 8, generator=g), torch.randn(1, 60, 8, generator=g)
    v = torch.randn(1, 60, 3, generator=g) * 5
    a = torch.randn(3, 3, generator=g)
    t = torch.tensor([7.0, -3.0, 11.0])
    out = coordinate_attention(q, k, v)
    assert torch.allclose(coordinate_attention(q, k, v @ a.T + t), out @ a.T + t, atol=1e-4)
    assert torch.allclose(coordinate_attention(q, k, v + t), out + t, atol=1e-5)


def test_memory_efficient_attention_equals_naive():
    """The flash/memory-efficient kernel (values zero-padded to the key width) and the query
    chunks give the naive ``softmax(q k^T) v`` on a small grid, including sharp logits."""
    g = torch.Generator().manual_seed(2)
    for scale in (1.0, 4.0):
        q = torch.randn(2, 300, 16, generator=g) * scale
        k = torch.randn(2, 500, 16, generator=g) * scale
        v = torch.randn(2, 500, 3, generator=g) * 20
        naive = torch.softmax(q @ k.transpose(1, 2), -1) @ v
        assert torch.allclose(coordinate_attention(q, k, v), naive, atol=1e-4)
        assert torch.allclose(coordinate_attention(q, k, v, chunk=64), naive, atol=1e-4)


def test_one_dimensional_analytic_case():
    """Appendix C / Fig. 7: with intensity-only features (a 1x1 "convolution" with large
    weights followed by a sine: random-feature kernel of the intensity difference), coordinate
    attention between I^M = cos(pi x / 2) and I^F = x + 0.07 sin(3 pi x) reproduces the exact
    map (I^M)^-1 o I^F = (2 / pi) arccos(x + 0.07 sin(3 pi x)) within 1e-2 at every one of
    1000 samples (the largest error is at x = 1, where I^M is flat)."""
    n = 1000
    x = torch.linspace(0, 1, n, dtype=torch.float64)
    i_m = torch.cos(math.pi * x / 2)
    i_f = x + 0.07 * torch.sin(3 * math.pi * x)
    sigma_w, sharp = 200.0, 200.0
    w = torch.arange(1, int(4 * sigma_w / math.pi) + 1, dtype=torch.float64) * math.pi
    gw = torch.exp(-0.5 * (w / sigma_w) ** 2)
    gw = (gw / gw.sum()).sqrt().repeat(2)

    def features(intensity):  # weights w, biases 0 and pi/2, then sin
        a = intensity[:, None] * w[None]
        return torch.cat([torch.sin(a), torch.sin(a + math.pi / 2)], 1) * gw * math.sqrt(sharp)

    out = coordinate_attention(features(i_f)[None], features(i_m)[None], x[None, :, None])
    truth = (2 / math.pi) * torch.arccos(i_f)
    err = (out[0, :, 0].double() - truth).abs()
    assert float(err.max()) < 1e-2
    assert float(err.mean()) < 1e-3


# ---------------------------------------------------------------------------- equivariance
def _shell(n: int, r_in: float, r_out: float, seed: int) -> torch.Tensor:
    """A textured spherical shell at the centre of an ``n^3`` grid, zero elsewhere."""
    g = torch.Generator().manual_seed(seed)
    tex = gaussian_blur(torch.rand(1, 1, n, n, n, generator=g), [1.0] * 3)
    c = torch.full((3, 1, 1, 1), (n - 1) / 2)
    d = (identity_grid((n, n, n)) - c).norm(dim=0)
    return tex * ((d >= r_in) & (d <= r_out)).float()[None, None]


def _zero_biases(net: nn.Module, out_std: float = 0.3) -> nn.Module:
    """Random weights with every bias zero (a zero input then gives zero features: the
    background is what the zero padding assumes) and random, non-zero last layers for the
    U-Nets (zero-initialised otherwise, i.e. identity steps that would test nothing)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, nn.Conv3d) and mod.bias is not None:
                mod.bias.zero_()
            if isinstance(mod, RefineUNet):
                mod.out.weight.normal_(0, out_std, generator=g)
    return net.eval()


def test_displacement_unet_is_uu_but_not_wu_equivariant():
    """Eq. 13: a displacement-predicting U-Net on cat(moving, fixed) (circular padding, so the
    check is exact everywhere) satisfies [U,U] for shifts that are multiples of its strides,
    and fails [W,U]: independent shifts change its output by voxels."""
    torch.manual_seed(0)
    net = _zero_biases(RefineUNet((4, 8), padding_mode='circular'))
    g = torch.Generator().manual_seed(4)
    m, f = torch.rand(1, 1, 32, 32, 32, generator=g), torch.rand(1, 1, 32, 32, 32, generator=g)
    with torch.no_grad():
        u = net(torch.cat([m, f], 1))
        r, w = (4, -8, 12), (-4, 8, 0)
        uu = net(torch.cat([shifted(m, r), shifted(f, r)], 1))
        wu = net(torch.cat([shifted(m, w), shifted(f, r)], 1))
    assert float(u.abs().max()) > 0.5  # a non-trivial field
    assert torch.allclose(uu, expected_wu(u, 0, r, r), atol=1e-4)
    assert float((wu - expected_wu(u, 0, w, r)).abs().amax(1).mean()) > 1.0


@pytest.fixture(scope='module')
def shell_pair():
    """Moving: a textured shell at the centre of 96^3; fixed: the same shell moved by
    (8, -8, 0) voxels. Independent shifts W (of the moving image) and U (of the fixed one),
    multiples of 8 voxels (the U-Nets' strides at 1/2: 2 x 4)."""
    n = 96
    moving = _shell(n, 16, 30, 1)
    fixed = torch.roll(moving, shifts=(8, -8, 0), dims=(2, 3, 4))
    w, r = (8, 0, 0), (0, 8, -8)
    return moving, fixed, w, r


def _wu_errors(cfg: CarlConfig, pair) -> dict[str, float]:
    """Max over the fixed image's content (eroded) of |Phi[M o W, F o U] - W^-1 o Phi o U|
    at each step (voxels)."""
    from scipy import ndimage

    moving, fixed, w, r = pair
    torch.manual_seed(0)
    net = _zero_biases(CarlNet(cfg))
    with torch.no_grad():
        ref = net.steps(moving, fixed)
        out = net.steps(shifted(moving, w), shifted(fixed, r))
    errors = {}
    for key, level, erode in (('u2', 2, 0), ('u1', 1, 2), ('u0', 0, 4)):
        err = (out[key] - expected_wu(ref[key], level, w, r)).abs().amax(1)[0]
        content = F.avg_pool3d(shifted(fixed, r), 2 ** level)[0, 0] > 0 if level \
            else shifted(fixed, r)[0, 0] > 0
        mask = ndimage.binary_erosion(content.numpy(), iterations=erode) if erode \
            else content.numpy()
        assert mask.sum() > 100
        errors[key] = float(err[torch.as_tensor(mask)].max())
    return errors


def test_carl_is_wu_equivariant_and_displacement_network_is_not(shell_pair):
    """Eq. 10 and Eq. 15 with untrained random weights: Xi_theta and the whole composition
    TwoStep{Down{TwoStep{Down{Xi}, Psi_1}}, Psi_2} give ``W^-1 o Phi o U`` for independent
    shifts W != U (multiples of 8 voxels), checked on the fixed image's content away from its
    edges; the same composition with a displacement U-Net in place of Xi (the paper's
    baseline) is off by voxels.

    Assumption (ii) of the paper (attention of small support) is met by sharp features
    (``feature_norm`` 30, logits 900 cos) with zero biases and no normalisation layer (zero
    features, logit 0, in the background; the default instance norm gives the background a
    non-zero feature that random weights may match): Xi_theta is then exact to float
    precision. The composition's residual error
    (a few 1e-3 voxels) comes from the cells around the content whose features are almost zero
    and whose attention is therefore not concentrated; it shrinks as ``feature_norm`` grows."""
    base = dict(shape=(96, 96, 96), enc_channels=16, enc_blocks=1, dilations=(1, 2),
                enc_norm='none', feat_dim=16, feature_norm=30.0, pad=4, refine1=(4, 8),
                refine2=(4, 8))
    carl = _wu_errors(CarlConfig(**base), shell_pair)
    assert carl['u2'] < 1e-4, carl
    assert carl['u1'] < 1e-2 and carl['u0'] < 1e-2, carl
    disp = _wu_errors(CarlConfig(**base, first='unet'), shell_pair)
    assert min(disp.values()) > 5.0, disp


def test_carl_composition_is_uu_equivariant(shell_pair):
    """With a shared shift (W = U) CARL's composition is equivariant as well."""
    moving, fixed, _, r = shell_pair
    cfg = CarlConfig(shape=(96, 96, 96), enc_channels=16, enc_blocks=1, dilations=(1, 2),
                     enc_norm='none', feat_dim=16, feature_norm=30.0, pad=4, refine1=(4, 8),
                     refine2=(4, 8))
    errs = _wu_errors(cfg, (moving, fixed, r, r))
    assert max(errs.values()) < 1e-2, errs


# ---------------------------------------------------------------------------- geometry
def test_cell_centres_and_composition_conventions():
    """Cell c of level l sits at 2^l c + (2^l - 1) / 2; a constant field is a translation
    at any level; composing two translations adds them."""
    pts = cell_centres((3, 3, 3), 2)
    assert torch.allclose(pts[0, :, 1, 0, 2], torch.tensor([5.5, 1.5, 9.5]))
    t1 = torch.ones(1, 3, 4, 4, 4) * torch.tensor([1.0, -2.0, 3.0]).view(1, 3, 1, 1, 1)
    t2 = torch.ones(1, 3, 8, 8, 8) * torch.tensor([0.5, 0.5, -1.0]).view(1, 3, 1, 1, 1)
    u = compose(t1, 2, t2, 1)
    assert torch.allclose(u, t1.mean() * 0 + torch.tensor([1.5, -1.5, 2.0]).view(1, 3, 1, 1, 1))
    # a linear field is reproduced exactly at points between the cells
    lin = cell_centres((8, 8, 8), 1) * 0.1
    p = torch.tensor([[3.3, 7.1, 9.9]]).T.reshape(1, 3, 1, 1, 1)
    assert torch.allclose(eval_disp(lin, 1, p), p * 0.1, atol=1e-5)


# ---------------------------------------------------------------------------- losses
def _texture(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return gaussian_blur(torch.rand(1, 1, n, n, n, generator=g), [1.5] * 3)


def test_lncc_identity_and_affine_intensity_invariance():
    """LNCC of an image with itself is 1 (loss 0), unchanged by a positive affine change of
    intensities; a negative one gives -1 (loss 2), and the squared variant is blind to the
    sign. An unrelated image scores far from 1 (to the 1e-5 variance floor of the formula: the
    texture's local variances are about 0.1)."""
    a = 10 * _texture(seed=0)
    assert float(L.lncc_loss(a, a)) < 1e-3
    assert float(L.lncc_loss(a, 3.0 * a + 7.0)) < 1e-3
    assert abs(float(L.lncc_loss(a, -2.0 * a + 1.0)) - 2.0) < 1e-3
    assert float(L.lncc_loss(a, -2.0 * a + 1.0, squared=True)) < 1e-3
    assert float(L.lncc_loss(a, _texture(seed=1))) > 0.5
    assert L.gaussian_kernel(4.0).numel() == 17


def test_banded_smoothing_equals_depthwise_convolution_forward_and_backward():
    """LNCC's separable smoothing (three products with banded matrices) gives the numbers of a
    zero-padded depthwise conv3d per axis, and the same gradient, on a non-cubic grid with
    several channels and an asymmetric kernel (which catches a transposed band)."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 11, 7, 9, generator=g, dtype=torch.float64)
    k = torch.rand(5, generator=g, dtype=torch.float64)

    def reference(v):
        for axis in range(3):
            shape = [1, 1, 1, 1, 1]
            shape[2 + axis] = k.numel()
            pad = [0, 0, 0]
            pad[axis] = k.numel() // 2
            v = F.conv3d(v, k.view(shape).expand(v.shape[1], 1, *shape[2:]),
                         padding=tuple(pad), groups=v.shape[1])
        return v

    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    w = torch.rand(x.shape, generator=g, dtype=torch.float64)
    ya, yb = L._smooth(a, k), reference(b)
    assert torch.allclose(ya, yb, atol=1e-12)
    (ya * w).sum().backward()
    (yb * w).sum().backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-12)


def _affine_field(mat: torch.Tensor, t: torch.Tensor, n: int) -> torch.Tensor:
    """Displacement of x -> mat x + t (about the grid centre) on an ``n^3`` grid."""
    x = identity_grid((n, n, n)) - (n - 1) / 2
    y = torch.einsum('ab,bijk->aijk', mat, x) + t.view(3, 1, 1, 1)
    return (y - x)[None]


def test_gradicon_zero_for_exact_inverse_pair_positive_otherwise():
    n = 24
    g = torch.Generator().manual_seed(5)
    mat = torch.eye(3) + 0.05 * torch.randn(3, 3, generator=g)
    t = torch.tensor([0.7, -0.4, 0.3])
    inv = torch.linalg.inv(mat)
    u_ab = _affine_field(mat, t, n)
    u_ba = _affine_field(inv, -(inv @ t), n)
    exact = float(L.gradicon_loss(u_ab, u_ba, generator=g, crop=5, jitter=0.5))
    assert exact < 1e-6
    off = _affine_field(inv @ (torch.eye(3) + 0.03 * torch.randn(3, 3, generator=g)), -(inv @ t), n)
    assert float(L.gradicon_loss(u_ab, off, generator=g, crop=5, jitter=0.5)) > 1e-4
    # a translation pair that is not inverse: the error is constant, its gradient zero
    assert float(L.gradicon_loss(torch.ones(1, 3, n, n, n), torch.ones(1, 3, n, n, n))) < 1e-8


def test_diffusion_and_jacobian():
    n = 16
    assert float(L.diffusion_loss(torch.ones(1, 3, n, n, n) * 2.5)) == 0.0
    u = _affine_field(torch.diag(torch.tensor([1.1, 1.0, 1.0])), torch.zeros(3), n)
    assert abs(float(L.diffusion_loss(u)) - 0.01 / 3) < 1e-6  # (0.1)^2, mean over 3 comps
    assert torch.allclose(L.jacobian_determinant(u), torch.full((1, n, n, n), 1.1), atol=1e-5)
    fold = _affine_field(torch.diag(torch.tensor([-1.0, 1.0, 1.0])), torch.zeros(3), n)
    assert L.folding_fraction(fold) == 1.0 and L.folding_fraction(u) == 0.0


def test_pair_loss_phases():
    torch.manual_seed(0)
    net = CarlNet(TINY)
    a, b = _texture(32, 0), _texture(32, 1)
    u = net(torch.cat([a, b]), torch.cat([b, a]))
    for phase in ('diffusion', 'gradicon'):
        terms = L.pair_loss(torch.cat([a, b]), torch.cat([b, a]), u, phase=phase)
        assert terms['loss'].requires_grad and math.isfinite(float(terms['loss'].detach()))
    with pytest.raises(ValueError):
        L.pair_loss(torch.cat([a, b]), torch.cat([b, a]), u, phase='other')


# ---------------------------------------------------------------------------- inference API
def _ball_pair(n=32):
    g = np.indices((n, n, n)).astype(float) - (n - 1) / 2
    rng = np.random.default_rng(0)
    tex = rng.random((n, n, n)).astype(np.float32)
    fixed = ((g ** 2).sum(0) < 10 ** 2) * (100 + 50 * tex)
    g2 = g.copy()
    g2[0] -= 2
    moving = ((g2 ** 2).sum(0) < 9 ** 2) * (1000 + 400 * tex)
    return fixed.astype(np.float32), moving.astype(np.float32)


def test_register_arrays_shapes_and_io_leaves_model_untouched():
    torch.manual_seed(0)
    net = CarlNet(TINY)
    with torch.no_grad():  # non-trivial refinement layers
        net.refine2.out.weight.normal_(0, 0.01)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fixed, moving = _ball_pair()
    res = register_arrays(fixed, moving, net, device='cpu', spacing_mm=(2.0, 2.0, 2.0))
    assert res['disp_fwd'].shape == (3, 32, 32, 32) and res['disp_fwd'].dtype == np.float32
    assert res['disp_inv'].shape == (3, 32, 32, 32) and res['disp_inv'].dtype == np.float32
    assert np.isfinite(res['disp_fwd']).all() and res['inverse_consistency_vox'] >= 0
    assert res['io_losses'] == [] and res['timings']['total_s'] > 0
    io = register_arrays(fixed, moving, net, io_steps=2, io_lr=1e-3, seed=1,
                         spacing_mm=(2.0, 2.0, 2.0))
    assert len(io['io_losses']) == 2
    assert not np.allclose(io['disp_fwd'], res['disp_fwd'])  # IO changed the result...
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # ...not the model
    again = register_arrays(fixed, moving, net, spacing_mm=(2.0, 2.0, 2.0))
    assert np.array_equal(again['disp_fwd'], res['disp_fwd'])  # deterministic, reset per pair
    # a non-cubic grid and anisotropic voxels: the field comes back on the caller's grid
    res2 = register_arrays(fixed[:, :28, :20], moving[:, :28, :20], net,
                           spacing_mm=(1.0, 1.5, 3.0))
    assert res2['disp_fwd'].shape == (3, 32, 28, 20)
    with pytest.raises(ValueError):
        register_arrays(fixed, moving[:30], net)


def _refining_net() -> CarlNet:
    """A seeded TINY network whose refinement layers are not the identity."""
    torch.manual_seed(0)
    net = CarlNet(TINY)
    with torch.no_grad():
        net.refine2.out.weight.normal_(0, 0.01)
        net.refine1.out.weight.normal_(0, 0.01)
    return net


def test_io_can_adapt_the_refinement_networks_only():
    """``io_train='refine'``: instance optimisation changes the refinement networks' weights
    and leaves the coordinate-attention step (``first``) exactly as trained; ``'all'`` (the
    paper's) changes both; anything else is refused."""
    from keyprep.pipeline.carl.network import _io_copy

    net = _refining_net()
    fixed, moving = _ball_pair()
    f = torch.as_tensor(fixed / fixed.max())[None, None]
    m = torch.as_tensor(moving / moving.max())[None, None]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    changed = {}
    for train in ('refine', 'all'):
        io_net, losses = _io_copy(net, m, f, 2, 1e-2, 0, train=train)
        after = io_net.state_dict()
        changed[train] = {k.split('.')[0] for k in before
                          if before[k].is_floating_point() and not torch.equal(before[k], after[k])}
        assert len(losses) == 2
    assert 'first' not in changed['refine'] and {'refine1', 'refine2'} <= changed['refine']
    assert 'first' in changed['all']
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    with pytest.raises(ValueError, match='refine'):
        _io_copy(net, m, f, 1, 1e-3, 0, train='encoder')
    res = register_arrays(fixed, moving, net, io_steps=1, io_lr=1e-3,
                          spacing_mm=(2.0, 2.0, 2.0), io_train='refine')
    assert len(res['io_losses']) == 1
    # the frozen first stage runs once: the same losses as the whole network run every step
    ref = copy.deepcopy(net).train()
    for name, p in ref.named_parameters():
        p.requires_grad_(not name.startswith('first.'))
    opt = torch.optim.Adam([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    expected = []
    for _ in range(3):
        terms = L.pair_loss(torch.cat([m, f]), torch.cat([f, m]),
                            ref(torch.cat([m, f]), torch.cat([f, m])), generator=gen)
        opt.zero_grad()
        terms['loss'].backward()
        opt.step()
        expected.append(float(terms['loss']))
    _, losses = _io_copy(net, m, f, 3, 1e-2, 0, train='refine', similarity='lncc')
    assert losses == pytest.approx(expected, rel=1e-5)


def test_first_stage_is_shared_between_calls_without_changing_the_fields():
    """``first_stage``: the carl engine's two variants run the frozen first stage (coordinate
    attention) once between them when carlIO adapts the refinement networks only; the fields
    are bit-identical to calls without the cache; other images, or IO on all weights, do
    not reuse it."""
    net = _refining_net()
    fixed, moving = _ball_pair()
    kw = dict(spacing_mm=(2.0, 2.0, 2.0), symmetric=True)
    io = dict(io_steps=2, io_lr=1e-3, io_train='refine')
    plain, plain_io = register_arrays(fixed, moving, net, **kw), \
        register_arrays(fixed, moving, net, **kw, **io)
    calls = []  # first-stage runs (the hook goes with IO's copy of the network)
    net.first.register_forward_hook(lambda *a: calls.append(1))
    cache = {}
    shared = register_arrays(fixed, moving, net, first_stage=cache, **kw)
    shared_io = register_arrays(fixed, moving, net, first_stage=cache, **kw, **io)
    assert len(calls) == 1 and len(cache) == 1
    # the call that computed it says so (its variant's own time leaves it out)
    assert shared['timings']['first_stage_s'] > 0 == shared_io['timings']['first_stage_s']
    for a, b in ((plain, shared), (plain_io, shared_io)):
        assert np.array_equal(a['disp_fwd'], b['disp_fwd'])
        assert np.array_equal(a['disp_inv'], b['disp_inv'])
    assert plain_io['io_losses'] == shared_io['io_losses']
    # IO on all weights changes the first stage: it runs it in its step and after, and
    # stores nothing
    calls.clear()
    key = next(iter(cache))
    register_arrays(fixed, moving, net, first_stage=cache, io_steps=1, io_lr=1e-3, **kw)
    assert len(calls) == 2 and list(cache) == [key]
    # other images: computed again, and the cache holds the new pair only
    calls.clear()
    register_arrays(np.roll(fixed, 2, 0), moving, net, first_stage=cache, **kw)
    assert len(calls) == 1 and len(cache) == 1 and key not in cache


def test_field_refinement_recovers_a_known_shift():
    """Field-space instance optimisation (keyprep's ``refine_field``), started from the
    identity on a texture and its copy shifted by a known sub-voxel amount: its loss falls,
    the forward field approaches the shift (``moving(x + d) = fixed(x)``) and the backward
    field its opposite, in the interior; zero steps return the input unchanged; bad settings
    are refused."""
    from keyprep.pipeline.carl.network import refine_field, warp

    n = 32
    fixed = _texture(n, 0)
    shift = torch.tensor([1.5, -1.0, 0.5])
    const = shift.view(1, 3, 1, 1, 1).expand(1, 3, n, n, n)
    moving = warp(fixed, 0, -const, 0)  # moving(x) = fixed(x - s): moving(x + s) = fixed(x)
    u0 = torch.zeros(2, 3, n, n, n)
    same, none = refine_field(u0, moving, fixed, 0)
    assert same is u0 and none == []
    u, losses = refine_field(u0, moving, fixed, 40, lr=0.1, level=2, seed=0, similarity='lncc')
    assert len(losses) == 40 and losses[-1] < 0.5 * losses[0]
    inner = (slice(None), slice(8, -8), slice(8, -8), slice(8, -8))
    fwd = u[0][inner].reshape(3, -1).mean(1)
    bwd = u[1][inner].reshape(3, -1).mean(1)
    assert torch.allclose(fwd, shift, atol=0.25), fwd
    assert torch.allclose(bwd, -shift, atol=0.25), bwd
    for bad in (dict(lr=0.0), dict(lr=float('nan')), dict(level=-1), dict(level=1.5)):
        with pytest.raises(ValueError):
            refine_field(u0, moving, fixed, 1, **bad)


def test_register_arrays_field_refinement_after_the_network():
    """``field_steps``: the pair of fields is refined after the network (and after weight-space
    IO when both are asked), with the call's similarity and label prompt; the network's
    weights are untouched, its own inverse-consistency figure is the same as without
    refinement, and ``field_steps=0`` is the plain call, bit for bit."""
    net = _refining_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fixed, moving = _ball_pair()
    kw = dict(spacing_mm=(2.0, 2.0, 2.0), symmetric=True)
    plain = register_arrays(fixed, moving, net, **kw)
    zero = register_arrays(fixed, moving, net, field_steps=0, **kw)
    assert np.array_equal(plain['disp_fwd'], zero['disp_fwd']) and zero['field_losses'] == []
    assert zero['timings']['field_s'] == 0.0
    ref = register_arrays(fixed, moving, net, field_steps=3, field_lr=0.1, field_level=1, **kw)
    assert len(ref['field_losses']) == 3 and ref['timings']['field_s'] > 0
    assert not np.array_equal(plain['disp_fwd'], ref['disp_fwd'])
    assert ref['inverse_consistency_vox'] == plain['inverse_consistency_vox']
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    labels = ((fixed > 0.5 * fixed.max()).astype(np.int32),
              (moving > 0.5 * moving.max()).astype(np.int32))
    both = register_arrays(fixed, moving, net, io_steps=1, io_lr=1e-3, field_steps=2,
                           labels=labels, io_label_weight=1.0, field_label_weight=1.0,
                           passes=2, **kw)
    assert len(both['io_losses']) == 1 and len(both['field_losses']) == 2
    assert both['label_channels'] == 1
    # the field's own label weight: the maps alone, without it, change nothing
    unweighted = register_arrays(fixed, moving, net, field_steps=2, labels=labels, **kw)
    weighted = register_arrays(fixed, moving, net, field_steps=2, labels=labels,
                               field_label_weight=1.0, **kw)
    nolabels = register_arrays(fixed, moving, net, field_steps=2, **kw)
    assert unweighted['field_losses'] == nolabels['field_losses'] != weighted['field_losses']
    assert weighted['label_channels'] == 1 and unweighted['label_channels'] == 0
    with pytest.raises(ValueError):
        register_arrays(fixed, moving, net, field_steps=-1, **kw)
    # field_images: the refinement's similarity on other images of the pair (the network's
    # input unchanged); the same images give the same field, others another one
    same = register_arrays(fixed, moving, net, field_steps=3, field_lr=0.1, field_level=1,
                           field_images=(fixed.copy(), moving.copy()), **kw)
    assert np.array_equal(same['disp_fwd'], ref['disp_fwd'])
    other = register_arrays(fixed, moving, net, field_steps=3, field_lr=0.1, field_level=1,
                            field_images=(fixed.max() - fixed, moving), **kw)
    assert not np.array_equal(other['disp_fwd'], ref['disp_fwd'])
    with pytest.raises(ValueError, match='field_images'):
        register_arrays(fixed, moving, net, field_steps=1, field_images=(fixed[1:], moving),
                        **kw)


def test_register_arrays_translation_convention():
    """A constant working-grid displacement comes back on a finer input grid scaled by the
    ratio of the voxel sizes, with the documented sign (moving(x + d(x)) ~ fixed(x))."""
    from keyprep.pipeline.carl import network as N

    u = torch.ones(1, 3, 32, 32, 32) * torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1, 1)
    out = N._to_input(u, np.array([20.0, 20.0, 20.0]), 4.0, np.array([2.0, 1.0, 4.0]),
                      (40, 40, 40))
    assert torch.allclose(out[0, :, 5, 7, 9], torch.tensor([2.0, -8.0, 0.5]))


class _ConstantNet(nn.Module):
    """A stand-in network: ``+t`` working voxels for the first pair of the batch (moving,
    fixed), ``-t`` for the swapped one (an exactly inverse-consistent pair)."""

    def __init__(self, t):
        super().__init__()
        self.cfg = TINY
        self.t = nn.Parameter(torch.tensor(t))

    def forward(self, moving, fixed):
        n = moving.shape[0] // 2
        u = torch.ones(moving.shape[0], 3, *moving.shape[2:]) * self.t.view(1, 3, 1, 1, 1)
        u[n:] *= -1
        return u


def test_register_arrays_scales_the_working_field_to_the_caller_grid():
    """The working grid's voxels (4 mm here) become the caller's voxels (2, 1, 4 mm): a
    constant working displacement t comes back as t * 4 / spacing, its inverse as the
    opposite, with zero inverse-consistency error."""
    fixed, moving = _ball_pair()
    res = register_arrays(fixed, moving, _ConstantNet([1.0, -0.5, 0.25]),
                          spacing_mm=(2.0, 1.0, 4.0))
    assert res['working_grid']['res_mm'] == 4.0
    centre = res['disp_fwd'][:, 16, 16, 16]
    assert np.allclose(centre, [2.0, -2.0, 0.25], atol=1e-5)
    assert np.allclose(res['disp_inv'][:, 3, 30, 5], [-2.0, 2.0, -0.25], atol=1e-5)
    assert res['inverse_consistency_vox'] < 1e-5


def test_device_agnostic_cpu():
    torch.manual_seed(0)
    net = CarlNet(TINY)
    fixed, moving = _ball_pair()
    res = register_arrays(fixed, moving, net, device=torch.device('cpu'))
    assert res['disp_fwd'].shape == (3, 32, 32, 32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_cuda_matches_cpu():
    torch.manual_seed(0)
    net = CarlNet(TINY)
    with torch.no_grad():
        net.refine2.out.weight.normal_(0, 0.01)
    fixed, moving = _ball_pair()
    cpu = register_arrays(fixed, moving, net, device='cpu')
    gpu = register_arrays(fixed, moving, net, device='cuda')
    assert np.allclose(cpu['disp_fwd'], gpu['disp_fwd'], atol=1e-2)
    assert next(net.parameters()).device.type == 'cpu'


# ---------------------------------------------------------------------------- weights
def _weights_file(path, cfg=TINY, **changes):
    torch.manual_seed(0)
    net = CarlNet(cfg)
    payload = {'format': FORMAT, 'state_dict': {k: v.half() for k, v in net.state_dict().items()},
               'config': cfg.to_dict(), 'step': 0, 'recipe': 'test'}
    payload.update(changes)
    torch.save(payload, path)
    return net


def test_check_and_load_carl_weights(tmp_path):
    good = tmp_path / 'carl.pt'
    net = _weights_file(good)
    info = check_carl_weights(good)
    assert info['path'] == str(good) and len(info['sha256']) == 64
    model, meta = load_carl(good, 'cpu')
    assert meta['step'] == 0 and meta['sha256'] == info['sha256'] and not model.training
    ref = net.state_dict()
    assert all(torch.allclose(v, ref[k].half().float()) for k, v in model.state_dict().items())

    with pytest.raises(MissingInputError):
        check_carl_weights(tmp_path / 'missing.pt')
    junk = tmp_path / 'junk.pt'
    junk.write_bytes(b'not a torch file at all')
    with pytest.raises(WeightsError):
        check_carl_weights(junk)
    other = tmp_path / 'format.pt'
    _weights_file(other, format='keyprep-keymorph-1')
    with pytest.raises(WeightsError):
        check_carl_weights(other)
    wrong = tmp_path / 'shapes.pt'
    big = CarlConfig(**{**TINY.to_dict(), 'enc_channels': 12})
    torch.save({'format': FORMAT, 'state_dict': CarlNet(big).state_dict(),
                'config': TINY.to_dict()}, wrong)
    with pytest.raises(WeightsError, match='do not fit'):
        check_carl_weights(wrong)
    with pytest.raises(WeightsError):
        load_carl(wrong)
    bad_cfg = tmp_path / 'config.pt'
    _weights_file(bad_cfg, config={**TINY.to_dict(), 'shape': (30, 30, 30)})
    with pytest.raises(WeightsError, match='cannot be built'):
        check_carl_weights(bad_cfg)


def test_config_round_trip_and_presets():
    from keyprep.pipeline.carl.network import PRESETS

    for cfg in PRESETS.values():
        assert CarlConfig.from_dict(cfg.to_dict()) == cfg
    assert PRESETS['cpu'].attention_shape == (24, 24, 24)
    assert PRESETS['paper'].attention_shape == (44, 44, 44) and PRESETS['paper'].pad == 9
    with torch.device('meta'):  # the paper's encoder: 3 986 816 parameters (with its norms)
        enc = CarlNet(PRESETS['paper']).first.encoder
    assert sum(p.numel() for p in enc.parameters()) == 3_986_816
    with pytest.raises(ValueError):
        CarlConfig(shape=(30, 32, 32))
    assert isinstance(CarlNet(TINY).first, CoordinateAttention)


def test_pair_loss_label_term():
    """Soft Dice of warped one-hot labels: zero for equal maps and the identity, positive for a
    shifted map, differentiable in the displacement; the term needs both label maps."""
    import torch.nn.functional as Fn

    n = 32
    lab = torch.zeros((1, n, n, n), dtype=torch.long)
    lab[:, 8:20, 8:20, 8:20] = 1
    lab[:, 12:16, 12:16, 12:16] = 2
    oh = Fn.one_hot(lab, 3).movedim(-1, 1).float()
    shifted = torch.roll(oh, 3, dims=2)
    img = oh[:, 1:2] + 2 * oh[:, 2:3]
    u = torch.zeros((2, 3, n, n, n), requires_grad=True)
    pair = torch.cat([img, img])
    same = L.pair_loss(pair, pair, u, onehot_moving=torch.cat([oh, oh]),
                       onehot_fixed=torch.cat([oh, oh]), dice_weight=1.0)
    assert float(same['dice']) < 1e-6
    coarse = L.pair_loss(pair, pair, u, onehot_moving=torch.cat([shifted, oh]),
                         onehot_fixed=torch.cat([oh, shifted]), dice_weight=1.0, label_level=1)
    assert 0.1 < float(coarse['dice']) < 2
    moved = L.pair_loss(pair, pair, u, onehot_moving=torch.cat([shifted, oh]),
                        onehot_fixed=torch.cat([oh, shifted]), dice_weight=2.0)
    plain = L.pair_loss(pair, pair, u)
    assert float(moved['dice']) > 0.2
    total = float(plain['loss'].detach()) + 2 * float(moved['dice'])
    assert math.isclose(float(moved['loss'].detach()), total, rel_tol=1e-5)
    moved['loss'].backward()
    assert float(u.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match='onehot'):
        L.pair_loss(pair, pair, u, dice_weight=1.0)


def test_instance_optimisation_uses_the_given_similarity():
    """``io_similarity`` reaches IO's loss: on the same pair and network the squared LNCC
    (keyprep's cross-contrast recipes) and the paper's LNCC give different IO losses whose
    first values (before any update: the identity network, u = 0, GradICON 0) match
    ``pair_loss`` on the working-grid images; an unknown similarity is an error."""
    from dataclasses import replace

    from keyprep.pipeline.carl.network import _to_working, _working_grid, normalise_intensity

    torch.manual_seed(0)
    net = CarlNet(replace(TINY, first='unet'))  # starts as the identity (last conv zero)
    fixed, moving = _ball_pair()
    spacing = np.array([2.0, 2.0, 2.0])
    fn, mn = normalise_intensity(fixed), normalise_intensity(moving)
    centre, res = _working_grid(fn, mn, spacing, net.cfg)
    f = _to_working(fn, centre, res, spacing, net.cfg.shape, 'cpu').clamp(0, 1)
    m = _to_working(mn, centre, res, spacing, net.cfg.shape, 'cpu').clamp(0, 1)
    firsts = {}
    for sim in ('lncc', 'lncc2'):
        io = register_arrays(fixed, moving, net, io_steps=1, io_lr=1e-4,
                             spacing_mm=tuple(spacing), io_similarity=sim)
        expected = L.lncc_loss(m, f, squared=sim == 'lncc2') \
            + L.lncc_loss(f, m, squared=sim == 'lncc2')
        assert math.isclose(io['io_losses'][0], float(expected), rel_tol=1e-4), sim
        firsts[sim] = io['io_losses'][0]
    assert abs(firsts['lncc'] - firsts['lncc2']) > 1e-2, firsts
    with pytest.raises(ValueError, match='io_similarity'):
        register_arrays(fixed, moving, net, io_steps=1, io_similarity='mse')


def test_label_fractions_and_prompted_io():
    """The prompt's structure maps on the working grid are fractions that sum to one with the
    background channel, over the labels present in both maps; prompting adds the soft Dice
    to IO's first loss and counts its structures; a bad weight is an error."""
    from keyprep.pipeline.carl.network import label_fractions

    fixed, moving = _ball_pair()
    fl = (fixed > 0).astype(np.int32) * 17
    fl[fixed > 140] = 53
    ml = (moving > 0).astype(np.int32) * 17
    ml[:2] = 99  # only in the moving map: not a prompt channel
    lf, lm, k = label_fractions(fl, ml, np.array([15.5] * 3), 2.0, np.array([1.0] * 3),
                                (16, 16, 16), 'cpu')
    assert k == 1 and lf.shape == lm.shape == (1, 2, 16, 16, 16)
    assert float(lf.min()) >= 0 and torch.allclose(lf.sum(1), torch.ones(1, 16, 16, 16))
    torch.manual_seed(0)
    net = CarlNet(TINY)
    kw = dict(io_steps=1, io_lr=1e-4, spacing_mm=(2.0, 2.0, 2.0))
    plain = register_arrays(fixed, moving, net, **kw)
    prompted = register_arrays(fixed, moving, net, labels=(fl, ml), io_label_weight=1.0, **kw)
    assert plain['label_channels'] == 0 and prompted['label_channels'] == 1
    assert 0 < prompted['io_losses'][0] - plain['io_losses'][0] <= 2
    for bad in (-1.0, float('nan')):
        with pytest.raises(ValueError, match='io_label_weight'):
            register_arrays(fixed, moving, net, labels=(fl, ml), io_label_weight=bad, **kw)


def test_shipped_weights_register_a_real_brain():
    """The shipped model matches its card's checksum and step, passes the run-time check, and
    registers a real brain (Colin27, 2 mm) to a copy of itself shifted by (4, -3, 3) voxels and
    bent by a smooth sinusoid, with no prealignment: the brains' overlap rises from below 0.9
    to above 0.93 and the mean displacement error inside the brain stays below a third of the
    5.9-voxel motion, without a fold. Its held-out accuracy is in the model card."""
    import hashlib
    import json

    from scipy.ndimage import map_coordinates as mc

    from keyprep.pipeline.carl.network import default_weights
    from tests.conftest import CH2BET, coarse

    path = default_weights()
    card = json.loads(path.with_suffix('.json').read_text())
    assert hashlib.sha256(path.read_bytes()).hexdigest() == card['sha256']
    assert check_carl_weights(path)['sha256'] == card['sha256']
    assert path.stat().st_size < 5e6
    model, meta = load_carl(path)
    assert card['training_step'] == meta['step']
    assert (path.parent / 'MODEL_CARD.md').read_text().count(card['sha256']) >= 1
    torch.set_num_threads(1)
    fixed = np.asarray(coarse(CH2BET, 2.0).dataobj, dtype=np.float32)
    grid = np.indices(fixed.shape, dtype=np.float64)
    t = np.stack([np.full(fixed.shape, 4.0), np.full(fixed.shape, -3.0),
                  3.0 + 1.5 * np.sin(2 * np.pi * grid[0] / fixed.shape[0])])
    moving = mc(fixed, grid - t, order=1, mode='constant').astype(np.float32)
    out = register_arrays(fixed, moving, model, spacing_mm=(2.0, 2.0, 2.0))
    disp = out['disp_fwd']
    brain = fixed > 0

    def dice(a, b):
        return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))

    before = dice(moving > 0, brain)
    after = dice(mc(moving, grid + disp, order=1, mode='constant') > 0, brain)
    err = np.sqrt(((disp - t) ** 2).sum(0))[brain]
    assert before < 0.9 and after > 0.93, (before, after)
    assert err.mean() < 2.0, err.mean()
    folds = int((L.jacobian_determinant(torch.as_tensor(disp)[None]) <= 0).sum())
    assert folds == 0


def _smooth_field(shape, amp, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn((1, 3, *[max(s // 8, 2) for s in shape]), generator=g)
    u = F.interpolate(u, size=tuple(shape), mode='trilinear', align_corners=True)
    return amp * u / u.abs().max()


def test_invert_field_and_symmetrise():
    """Fixed-point inversion gives a round trip within 0.05 voxel (0.01 on average) for a smooth 2-voxel field;
    symmetrising a field with itself (what a network run both ways on one image gives) leaves
    nearly the identity, a consistent pair is left unchanged, and the symmetrised pair is
    inverse-consistent."""
    from keyprep.pipeline.carl.network import cell_centres, eval_disp, invert_field, symmetrise

    shape = (24, 28, 20)
    pts = cell_centres(shape, 0)
    u = _smooth_field(shape, 2.0)
    v = invert_field(u)
    inner = (slice(None), slice(None), slice(3, -3), slice(3, -3), slice(3, -3))
    round_trip = u + eval_disp(v, 0, pts + u)  # phi_v(phi_u(x)) - x
    # converged (10 iterations give the same); what is left is trilinear interpolation's error
    assert float(round_trip[inner].abs().max()) < 0.05
    assert float(round_trip[inner].abs().mean()) < 0.01
    a, b = symmetrise(u, u)
    assert float(a[inner].norm(dim=1).mean()) < 0.1 * float(u[inner].norm(dim=1).mean())
    a, b = symmetrise(u, v)
    assert torch.allclose(a[inner], u[inner], atol=0.05)
    w = _smooth_field(shape, 1.5, seed=1)
    a, b = symmetrise(u, w)  # two unrelated estimates: their average, made consistent
    assert float((b + eval_disp(a, 0, pts + b))[inner].abs().max()) < 0.05
    assert not torch.allclose(a, u, atol=0.1)


def test_symmetric_register_arrays_leaves_an_image_registered_to_itself():
    """The shipped network, registering a real brain to itself, moves it by about a voxel
    unsymmetrised (1.2-1.6 mm at 1 mm for steps 250 and 1000, measured) and by under 0.2 voxel
    on average with ``symmetric=True``; the reported inverse consistency is the network's own
    in both cases."""
    from tests.conftest import CH2BET, coarse

    torch.set_num_threads(1)
    fixed = np.asarray(coarse(CH2BET, 2.0).dataobj, dtype=np.float32)
    brain = fixed > 0
    raw = register_arrays(fixed, fixed, None, spacing_mm=(2.0, 2.0, 2.0))
    sym = register_arrays(fixed, fixed, None, spacing_mm=(2.0, 2.0, 2.0), symmetric=True)
    d_raw = np.linalg.norm(raw['disp_fwd'], axis=0)[brain].mean()
    d_sym = np.linalg.norm(sym['disp_fwd'], axis=0)[brain].mean()
    d_inv = np.linalg.norm(sym['disp_inv'], axis=0)[brain].mean()
    assert d_sym < 0.2 and d_inv < 0.2 and d_sym < 0.3 * d_raw, (d_raw, d_sym, d_inv)
    assert raw['inverse_consistency_vox'] == pytest.approx(sym['inverse_consistency_vox'])


class _Translation(nn.Module):
    """A stand-in for a trained network with a known output, to check the cascade's
    bookkeeping exactly: ``+t`` (working voxels) for the forward half of the batch, ``-t``
    for the backward half, whatever the images."""

    def __init__(self, cfg: CarlConfig, t):
        super().__init__()
        self.cfg = cfg
        self.t = nn.Parameter(torch.as_tensor(t, dtype=torch.float32).view(1, 3, 1, 1, 1),
                              requires_grad=False)

    def forward(self, moving, fixed):
        n = moving.shape[0] // 2
        out = self.t.expand(moving.shape[0], 3, *moving.shape[2:]).clone()
        out[n:] *= -1
        return out


def test_cascade_composes_the_passes():
    """``passes=N`` composes N network passes: with a network that always outputs the
    translation t (and -t backwards), the exported fields are N t and -N t (scaled from
    working to caller voxels), unsymmetrised and symmetrised; ``passes=1`` is the single pass;
    bad counts are refused."""
    fixed, moving = _ball_pair()
    net = _Translation(TINY, (0.5, -0.25, 0.75))
    one = register_arrays(fixed, moving, net, spacing_mm=(2.0, 2.0, 2.0))
    assert np.array_equal(one['disp_fwd'], register_arrays(
        fixed, moving, net, spacing_mm=(2.0, 2.0, 2.0), passes=1)['disp_fwd'])
    scale = one['working_grid']['res_mm'] / 2.0
    t = np.array([0.5, -0.25, 0.75]) * scale
    inner = (slice(None), slice(4, -4), slice(4, -4), slice(4, -4))
    for passes in (1, 2, 3):
        for sym in (False, True):
            out = register_arrays(fixed, moving, net, spacing_mm=(2.0, 2.0, 2.0),
                                  passes=passes, symmetric=sym)
            fwd = out['disp_fwd'][inner].reshape(3, -1)
            inv = out['disp_inv'][inner].reshape(3, -1)
            assert np.allclose(fwd, passes * t[:, None], atol=2e-3), (passes, sym)
            assert np.allclose(inv, -passes * t[:, None], atol=2e-3), (passes, sym)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match='passes'):
            register_arrays(fixed, moving, net, passes=bad)


def test_cascade_of_a_trained_network_stays_inverse_consistent_without_folds():
    """The shipped network in cascade (2 passes) on a real brain (Colin27, 2 mm) against a
    shifted and bent copy: the symmetrised fields compose into a pair that round-trips within
    0.05 voxel on average inside the brain (0.007 measured), with no fold, and the second pass
    changes the result."""
    from scipy.ndimage import map_coordinates as mc

    from tests.conftest import CH2BET, coarse

    fixed = np.asarray(coarse(CH2BET, 2.0).dataobj, dtype=np.float32)
    grid = np.indices(fixed.shape, dtype=np.float64)
    t = np.stack([np.full(fixed.shape, 4.0), np.full(fixed.shape, -3.0),
                  3.0 + 1.5 * np.sin(2 * np.pi * grid[0] / fixed.shape[0])])
    moving = mc(fixed, grid - t, order=1, mode='constant').astype(np.float32)
    brain = fixed > 0
    one = register_arrays(fixed, moving, None, spacing_mm=(2.0, 2.0, 2.0), symmetric=True)
    two = register_arrays(fixed, moving, None, spacing_mm=(2.0, 2.0, 2.0), symmetric=True,
                          passes=2)
    d, v = (torch.as_tensor(two[k])[None] for k in ('disp_fwd', 'disp_inv'))
    rt = v + eval_disp(d, 0, cell_centres(fixed.shape, 0) + v)  # phi_fwd(phi_inv(y)) - y
    assert float(rt[0].norm(dim=0)[torch.as_tensor(brain)].mean()) < 0.05
    assert int((L.jacobian_determinant(d) <= 0).sum()) == 0
    assert np.abs(two['disp_fwd'] - one['disp_fwd'])[:, brain].mean() > 0.05
    assert two['inverse_consistency_vox'] == pytest.approx(one['inverse_consistency_vox'])
