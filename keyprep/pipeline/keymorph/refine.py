"""Test-time refinement of a keypoint registration by image similarity.

KeyMorph's closed-form fits are robust to any starting pose but only as accurate as the
keypoints. Refinement starts from that solution and optimises an image similarity for a
few dozen steps on a coarse grid of the fixed (target) space, so that robustness and
accuracy come together:

* linear engines: a correction ``C`` in the fixed space, composed as ``T o C`` with the
  keypoint map ``T`` (fixed mm -> moving mm); ``C`` is rigid for a rigid engine (rotation
  vector and translation about the fixed brain's centre: the result stays rigid) and affine
  for an affine one (:func:`refine_linear`);
* thin-plate splines: a smooth diffeomorphic correction ``psi = exp(v)`` of a stationary
  velocity field ``v`` on a coarse control grid (integrated there by scaling and squaring,
  the displacement then upsampled trilinearly), with a diffusion penalty on ``v``, composed
  as ``T o psi``
  (:func:`refine_svf`). Its inverse is ``exp(-v)``, so the composed map is inverted as
  ``psi^-1 o T^-1`` without another iteration.

Similarities (:func:`similarity_loss`, to minimise): ``'lncc'`` (local normalised
cross-correlation, for images of the same contrast), ``'mind'`` (modality-independent
neighbourhood descriptors, Heinrich et al. 2012, for different contrasts) and ``'mi'``
(normalised mutual information with Parzen windows, from :mod:`.losses`). LNCC is computed
here with separable box filters (about ten times faster than a cubic window at 7^3) and MIND
is used by refinement only.

Everything is device-agnostic torch; nothing here touches files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..optim import Adam

__all__ = [
    'REFINE_MODES',
    'SIMILARITIES',
    'RefineImages',
    'SVFCorrection',
    'choose_similarity',
    'lncc_loss',
    'make_similarity',
    'mind_descriptor',
    'mind_loss',
    'prepare_images',
    'refine_linear',
    'refine_svf',
    'similarity_loss',
    'svf_displacement',
]

#: Values of ``--keymorph-refine``.
REFINE_MODES = ('none', 'affine', 'deformable')
#: Similarities for refinement (``auto`` chooses from the contrasts).
SIMILARITIES = ('auto', 'lncc', 'mind', 'mi')


# --------------------------------------------------------------------------------------
# Similarities (losses: lower is better)
# --------------------------------------------------------------------------------------

def lncc_loss(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None,
              win: int = 7, eps: float = 1e-5) -> torch.Tensor:
    """``-mean(local correlation^2... )``: minus the local normalised cross-correlation of
    ``a`` and ``b`` (``[B, 1, D, H, W]``) in ``win^3`` windows, averaged inside ``mask``.

    The squared correlation ``cov^2 / (var_a var_b)`` of VoxelMorph's LNCC is used, so the
    loss is in ``[-1, 0]``."""
    from ..similarity import lncc

    return -_masked_mean(lncc(a, b, win, eps), mask)


def mind_descriptor(x: torch.Tensor, sigma: float = 0.8, radius: int = 1) -> torch.Tensor:
    """MIND with a six-neighbourhood (Heinrich et al., MedIA 2012): ``[B, 6, D, H, W]``.

    For each of the six neighbours at distance ``radius`` voxels, the Gaussian-weighted
    patch distance ``D_r(x)``; the descriptor is ``exp(-D_r / V)`` with ``V`` the mean of
    ``D_r`` over the six (a local variance estimate), normalised by its maximum."""
    from ..synth.generator import gaussian_blur

    shifts = [(radius, 0, 0), (-radius, 0, 0), (0, radius, 0), (0, -radius, 0),
              (0, 0, radius), (0, 0, -radius)]
    pad = F.pad(x, (radius,) * 6, mode='replicate')
    d, h, w = x.shape[2:]
    diffs = []
    for si, sj, sk in shifts:
        shifted = pad[:, :, radius + si:radius + si + d, radius + sj:radius + sj + h,
                      radius + sk:radius + sk + w]
        diffs.append((x - shifted) ** 2)
    dist = gaussian_blur(torch.cat(diffs, dim=1), (sigma,) * 3)
    var = dist.mean(1, keepdim=True)
    var = var.clamp(min=1e-3 * float(var.mean().detach()) + 1e-8, max=None)
    desc = torch.exp(-dist / var)
    return desc / desc.amax(1, keepdim=True).clamp_min(1e-8)


def mind_loss(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None
              ) -> torch.Tensor:
    """Mean absolute difference of the MIND descriptors of ``a`` and ``b`` inside ``mask``."""
    diff = (mind_descriptor(a) - mind_descriptor(b)).abs().mean(1, keepdim=True)
    return _masked_mean(diff, mask)


def similarity_loss(name: str, a: torch.Tensor, b: torch.Tensor,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of similarity ``name`` (``lncc``, ``mind``, ``mi``) between two images."""
    if name == 'lncc':
        return lncc_loss(a, b, mask)
    if name == 'mind':
        return mind_loss(a, b, mask)
    if name == 'mi':
        from .losses import mutual_information_loss

        return mutual_information_loss(a, b, mask=mask)
    raise ValueError(f'unknown similarity {name!r}; expected one of {SIMILARITIES[1:]}')


def make_similarity(name: str, fixed: torch.Tensor, mask: torch.Tensor | None = None):
    """``loss(warped)`` for a fixed image: :func:`similarity_loss` with what depends on the
    fixed image alone (its MIND descriptor) computed once."""
    if name == 'mind':
        with torch.no_grad():
            ref = mind_descriptor(fixed)

        def loss(warped: torch.Tensor) -> torch.Tensor:
            diff = (ref - mind_descriptor(warped)).abs().mean(1, keepdim=True)
            return _masked_mean(diff, mask)

        return loss
    if name not in SIMILARITIES[1:]:
        raise ValueError(f'unknown similarity {name!r}; expected one of {SIMILARITIES[1:]}')
    return lambda warped: similarity_loss(name, fixed, warped, mask)


def choose_similarity(requested: str, contrasts: dict | None) -> str:
    """``auto``: LNCC when both contrasts are known and equal, MIND otherwise.

    >>> choose_similarity('auto', {'fixed': 'T1w', 'moving': 'T1w'})
    'lncc'
    >>> choose_similarity('auto', {'fixed': 'T1w', 'moving': 'T2w'})
    'mind'
    >>> choose_similarity('auto', {})
    'mind'
    """
    if requested != 'auto':
        if requested not in SIMILARITIES:
            raise ValueError(f'unknown similarity {requested!r}; expected one of {SIMILARITIES}')
        return requested
    c = contrasts or {}
    same = bool(c.get('fixed')) and c.get('fixed') == c.get('moving')
    return 'lncc' if same else 'mind'


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return x.mean()
    m = mask.expand_as(x)
    return (x * m).sum() / m.sum().clamp_min(1.0)


# --------------------------------------------------------------------------------------
# Images on the refinement grid
# --------------------------------------------------------------------------------------

@dataclass
class RefineImages:
    """The fixed image on an axis-aligned grid of the fixed space and the moving image on its
    own grid, both normalised to [0, 1] (torch ``[1, 1, ...]``).

    Attributes
    ----------
    fixed, mask
        Fixed image and the (dilated) fixed brain mask on the refinement grid.
    grid_affine
        Voxel-to-RAS matrix of the refinement grid (isotropic ``res_mm``).
    moving, moving_affine
        Moving image on its own grid, and that grid's voxel-to-RAS matrix.
    centre_mm
        Centre of the fixed brain (the centre of the linear corrections).
    """

    fixed: torch.Tensor
    mask: torch.Tensor
    grid_affine: np.ndarray
    moving: torch.Tensor
    moving_affine: np.ndarray
    centre_mm: np.ndarray
    res_mm: float

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.fixed.shape[2:])  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        return self.fixed.device

    def grid_points(self) -> torch.Tensor:
        """RAS mm of the refinement grid's voxels, ``[3, D, H, W]`` (float32)."""
        from ..synth.generator import identity_grid

        aff = torch.as_tensor(self.grid_affine, dtype=torch.float32, device=self.device)
        ijk = identity_grid(self.shape, self.device)
        return torch.einsum('ab,bijk->aijk', aff[:3, :3], ijk) + aff[:3, 3].view(3, 1, 1, 1)

    def sample_moving(self, points_mm: torch.Tensor) -> torch.Tensor:
        """The moving image at RAS points ``[3, D, H, W]`` (trilinear, zero outside)."""
        from ..synth.generator import sample_field

        inv = torch.as_tensor(np.linalg.inv(self.moving_affine), dtype=points_mm.dtype,
                              device=points_mm.device)
        vox = torch.einsum('ab,bijk->aijk', inv[:3, :3], points_mm) + inv[:3, 3].view(3, 1, 1, 1)
        return sample_field(self.moving, vox[None], padding_mode='zeros')


def _load3d(img) -> tuple[np.ndarray, np.ndarray]:
    data = np.asarray(img.dataobj, dtype=np.float32)
    while data.ndim > 3:
        data = data[..., 0]
    return np.nan_to_num(data), np.asarray(img.affine, dtype=float)


def prepare_images(fixed, moving, fixed_mask=None, moving_mask=None, *, res_mm: float = 2.0,
                   margin_mm: float = 8.0, device: str | torch.device = 'cpu') -> RefineImages:
    """Put a fixed/moving pair (nibabel images, any grids) in the form refinement needs.

    The refinement grid covers the fixed brain (``fixed_mask``, else the fixed image's
    foreground above its 2nd percentile) plus ``margin_mm``, at ``res_mm`` isotropic. Both
    images are Gaussian-smoothed to that resolution and normalised robustly (0.5 and 99.5
    percentiles inside their brains) to [0, 1]; the loss mask is the fixed brain dilated by
    one voxel of the grid.
    """
    from ..synth.generator import gaussian_blur, identity_grid, sample_field
    from .network import robust_normalise

    dev = torch.device(device)
    fdata, faff = _load3d(fixed)
    mdata, maff = _load3d(moving)
    if fixed_mask is not None:
        fm, fmaff = _load3d(fixed_mask)
        fm = fm > 0
    else:
        fm, fmaff = fdata > np.percentile(fdata, 2.0), faff
    if not fm.any():
        raise ValueError('the fixed brain mask is empty')
    idx = np.argwhere(fm)
    corners = np.array([[a, b, c] for a in (idx[:, 0].min(), idx[:, 0].max())
                        for b in (idx[:, 1].min(), idx[:, 1].max())
                        for c in (idx[:, 2].min(), idx[:, 2].max())], dtype=float)
    world = corners @ fmaff[:3, :3].T + fmaff[:3, 3]
    lo, hi = world.min(0) - margin_mm, world.max(0) + margin_mm
    shape = tuple(int(v) for v in np.ceil((hi - lo) / res_mm).astype(int) + 1)
    gaff = np.diag([res_mm, res_mm, res_mm, 1.0])
    gaff[:3, 3] = lo
    centre = fm.nonzero()
    centre = np.asarray(centre, dtype=float).mean(1)
    centre_mm = fmaff[:3, :3] @ centre + fmaff[:3, 3]

    def onto_grid(data, affine, order='bilinear', smooth=True):
        vol = torch.as_tensor(np.ascontiguousarray(data, dtype=np.float32), device=dev)[None, None]
        if smooth:
            zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))
            vol = gaussian_blur(vol, [0.42 * res_mm / z if res_mm > 1.2 * z else 0.0
                                      for z in zooms])
        to_native = torch.as_tensor(np.linalg.inv(affine) @ gaff, dtype=torch.float32, device=dev)
        ijk = identity_grid(shape, dev)
        coords = torch.einsum('ab,bijk->aijk', to_native[:3, :3], ijk) + \
            to_native[:3, 3].view(3, 1, 1, 1)
        return sample_field(vol, coords[None], mode=order, padding_mode='zeros')

    f = onto_grid(fdata, faff)
    m_grid = onto_grid(fm.astype(np.float32), fmaff, order='nearest', smooth=False)
    f = robust_normalise(f, m_grid)
    mask = (F.max_pool3d(m_grid, 3, stride=1, padding=1) > 0.5).float()
    mov = torch.as_tensor(np.ascontiguousarray(mdata), device=dev)[None, None]
    zooms = np.sqrt((maff[:3, :3] ** 2).sum(0))
    mov = gaussian_blur(mov, [0.42 * res_mm / z if res_mm > 1.2 * z else 0.0 for z in zooms])
    mmask = None
    if moving_mask is not None:
        mm, mmaff = _load3d(moving_mask)
        if mm.shape == mdata.shape and np.allclose(mmaff, maff, atol=1e-3):
            mmask = torch.as_tensor((mm > 0).astype(np.float32), device=dev)[None, None]
    mov = robust_normalise(mov, mmask)
    return RefineImages(fixed=f, mask=mask, grid_affine=gaff, moving=mov, moving_affine=maff,
                        centre_mm=np.asarray(centre_mm, dtype=float), res_mm=float(res_mm))


# --------------------------------------------------------------------------------------
# Linear refinement
# --------------------------------------------------------------------------------------

@dataclass
class LinearRefinement:
    """Result of :func:`refine_linear`: the refined map fixed mm -> moving mm, ``[3, 4]``
    float64, and the loss before and after (``losses[0]``, ``losses[-1]``)."""

    matrix: np.ndarray
    losses: list[float] = field(default_factory=list)
    similarity: str = ''




def _skew(w: torch.Tensor) -> torch.Tensor:
    z = torch.zeros((), dtype=w.dtype, device=w.device)
    return torch.stack([torch.stack([z, -w[2], w[1]]), torch.stack([w[2], z, -w[0]]),
                        torch.stack([-w[1], w[0], z])])


def _cosine_lr(step: int, steps: int, lr: float) -> float:
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1))))


def refine_linear(images: RefineImages, init: np.ndarray, *, rigid: bool, steps: int = 40,
                  similarity: str = 'lncc', lr: float = 0.01,
                  translation_unit_mm: float = 20.0) -> LinearRefinement:
    """Refine a linear map ``init`` (``[3, 4]`` or ``[4, 4]``, fixed mm -> moving mm).

    The correction ``C(x) = R (x - c) + c + t`` (rigid: ``R = exp([w]x)``; affine:
    ``R = I + M``) about the fixed brain's centre ``c`` is optimised with Adam (cosine
    learning-rate decay) for ``steps`` steps, starting from the identity; the result is
    ``init o C``. Parameters are scaled so that one unit is a radian, a unit of ``M``, or
    ``translation_unit_mm``. The returned matrix is the best iterate (lowest loss); with
    ``steps = 0`` it is ``init``.
    """
    dev = images.device
    init = np.asarray(init, dtype=float)[:3]
    a0 = torch.as_tensor(init[:, :3], dtype=torch.float32, device=dev)
    b0 = torch.as_tensor(init[:, 3], dtype=torch.float32, device=dev)
    c = torch.as_tensor(images.centre_mm, dtype=torch.float32, device=dev)
    pts = images.grid_points()
    rel = pts - c.view(3, 1, 1, 1)
    lin = torch.zeros(3 if rigid else 9, device=dev, requires_grad=True)
    trans = torch.zeros(3, device=dev, requires_grad=True)
    opt = Adam([lin, trans], lr=lr)
    eye = torch.eye(3, device=dev)
    sim_loss = make_similarity(similarity, images.fixed, images.mask)

    def matrices():
        r = torch.linalg.matrix_exp(_skew(lin)) if rigid else eye + lin.view(3, 3)
        t = trans * translation_unit_mm
        # x -> a0 (r (x - c) + c + t) + b0
        a = a0 @ r
        b = a0 @ (c + t) + b0
        return r, a, b

    def loss_of():
        _, a, b = matrices()
        mapped = torch.einsum('ab,bijk->aijk', a, rel) + b.view(3, 1, 1, 1)
        return sim_loss(images.sample_moving(mapped))

    best = (float('inf'), init.copy())
    losses = []
    for step in range(steps + 1):
        opt.lr = _cosine_lr(step, steps, lr)
        opt.zero_grad()
        loss = loss_of()
        value = float(loss.detach())
        losses.append(value)
        if value < best[0]:
            with torch.no_grad():
                _, a, b = matrices()
                # back to the plain form A x + b' with b' = b - A c
                full = np.concatenate([a.double().cpu().numpy(),
                                       (b - a @ c).double().cpu().numpy()[:, None]], axis=1)
            best = (value, full)
        if step == steps:
            break
        loss.backward()
        opt.step()
    return LinearRefinement(matrix=best[1], losses=losses, similarity=similarity)


# --------------------------------------------------------------------------------------
# Deformable refinement (stationary velocity field)
# --------------------------------------------------------------------------------------

@dataclass
class SVFCorrection:
    """``psi = exp(v)`` on the refinement grid (fixed space): displacements in mm of ``psi``
    and ``psi^-1 = exp(-v)`` (``[1, 3, D, H, W]``), the grid, and the optimisation trace."""

    forward: torch.Tensor
    inverse: torch.Tensor
    grid_affine: np.ndarray
    losses: list[float] = field(default_factory=list)
    similarity: str = ''
    max_displacement_mm: float = 0.0

    def displacement_at(self, points_mm: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """Displacement (mm) of ``psi`` (or ``psi^-1``) at RAS points ``[M, 3]`` -> ``[M, 3]``;
        zero outside the refinement grid, where the correction is the identity."""
        from ..synth.generator import sample_field

        field_ = self.inverse if inverse else self.forward
        inv = torch.as_tensor(np.linalg.inv(self.grid_affine), dtype=points_mm.dtype,
                              device=points_mm.device)
        vox = points_mm @ inv[:3, :3].T + inv[:3, 3]
        coords = vox.T.reshape(1, 3, -1, 1, 1)
        out = sample_field(field_.to(points_mm.dtype), coords, padding_mode='zeros')
        return out.reshape(3, -1).T

    def apply(self, points_mm: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """``psi(x)`` (or ``psi^-1(x)``) for RAS points ``[M, 3]``."""
        return points_mm + self.displacement_at(points_mm, inverse)


def _diffusion(v: torch.Tensor, spacing_mm) -> torch.Tensor:
    """Mean squared forward-difference gradient of ``v [1, 3, d, h, w]`` (mm per mm);
    ``spacing_mm``: the grid's spacing, one value or one per axis."""
    sz, sy, sx = (spacing_mm,) * 3 if isinstance(spacing_mm, (int, float)) else spacing_mm
    dz = (v[:, :, 1:] - v[:, :, :-1]) / sz
    dy = (v[:, :, :, 1:] - v[:, :, :, :-1]) / sy
    dx = (v[..., 1:] - v[..., :-1]) / sx
    return (dz ** 2).mean() + (dy ** 2).mean() + (dx ** 2).mean()


def control_spacing(shape, cshape, res_mm: float) -> list[float]:
    """Spacing (mm) along each axis of a control grid ``cshape`` spanning a grid ``shape`` of
    voxel size ``res_mm`` (corner-aligned, as ``F.interpolate(..., align_corners=True)``)."""
    return [res_mm * max(s - 1, 1) / max(c - 1, 1) for s, c in zip(shape, cshape)]


def svf_displacement(vel: torch.Tensor, shape, res_mm: float, int_steps: int = 7
                     ) -> torch.Tensor:
    """Displacement (mm) of ``exp(v)`` on a grid ``shape`` of voxel size ``res_mm`` for a
    velocity ``vel [1, 3, *cshape]`` (mm) on a control grid spanning it.

    Scaling and squaring runs on the control grid itself (the velocity is trilinear between
    control points, so its flow is smooth at that scale) and the displacement is then
    upsampled trilinearly: (control spacing / voxel)^3 fewer samples per squaring step than
    integrating the upsampled velocity, for a difference below a twentieth of a voxel on
    average (``tests/test_keymorph_engine.py``).
    """
    from ..synth.generator import integrate_svf

    sp = torch.tensor(control_spacing(shape, vel.shape[2:], res_mm), dtype=vel.dtype,
                      device=vel.device).view(1, 3, 1, 1, 1)
    disp = integrate_svf(vel / sp, int_steps) * sp
    return F.interpolate(disp, size=tuple(shape), mode='trilinear', align_corners=True)


def refine_svf(images: RefineImages, base_field: torch.Tensor, *, steps: int = 40,
               similarity: str = 'lncc', control_mm: float = 8.0, smooth_weight: float = 1.0,
               lr: float = 0.25, int_steps: int = 7) -> SVFCorrection:
    """Optimise ``psi = exp(v)`` so that the moving image sampled at ``T(psi(x))`` matches the
    fixed image, where ``T(z) = z + base(z)``.

    Parameters
    ----------
    images
        From :func:`prepare_images`.
    base_field
        ``[1, 3, D, H, W]`` displacement (mm) of the keypoint map ``T`` at the refinement
        grid's voxels (fixed -> moving); sampled trilinearly at ``psi(x)`` (border values
        beyond the grid).
    control_mm
        Spacing of the velocity's control grid (the velocity is upsampled trilinearly).
    smooth_weight
        Weight of the diffusion penalty ``mean |grad v|^2`` (``v`` in mm, gradients per mm).
    lr, steps
        Adam's learning rate (mm per step, cosine decay) and number of steps.
    int_steps
        Scaling-and-squaring steps (on the control grid: :func:`svf_displacement`).

    Returns
    -------
    :class:`SVFCorrection` of the best iterate (with ``steps = 0``: the identity).
    """
    from ..synth.generator import sample_field

    dev = images.device
    shape = images.shape
    res = images.res_mm
    factor = max(1, int(round(control_mm / res)))
    cshape = tuple(max(2, int(math.ceil((s - 1) / factor)) + 1) for s in shape)
    v = torch.zeros((1, 3) + cshape, device=dev, requires_grad=True)
    opt = Adam([v], lr=lr)
    pts = images.grid_points()[None]  # [1, 3, D, H, W] mm
    inv = torch.as_tensor(np.linalg.inv(images.grid_affine), dtype=torch.float32, device=dev)
    base = base_field.to(dev, torch.float32)
    sim_loss = make_similarity(similarity, images.fixed, images.mask)

    cspacing = control_spacing(shape, cshape, res)

    def loss_of():
        disp = svf_displacement(v, shape, res, int_steps)
        moved = pts + disp  # psi(x), mm
        vox = torch.einsum('ab,nbijk->naijk', inv[:3, :3], moved) + inv[:3, 3].view(1, 3, 1, 1, 1)
        mapped = moved + sample_field(base, vox, padding_mode='border')  # T(psi(x))
        sim = sim_loss(images.sample_moving(mapped[0]))
        # on the control grid: the gradient of the trilinearly upsampled v is made of these
        # finite differences (interpolated across the other axes)
        reg = _diffusion(v, cspacing)
        return sim + smooth_weight * reg, sim

    best_value, best_v = float('inf'), v.detach().clone()
    losses = []
    for step in range(steps + 1):
        opt.lr = _cosine_lr(step, steps, lr)
        opt.zero_grad()
        total, sim = loss_of()
        value = float(total.detach())
        losses.append(float(sim.detach()))
        if value < best_value:
            best_value, best_v = value, v.detach().clone()
        if step == steps:
            break
        total.backward()
        opt.step()
    with torch.no_grad():
        fwd = svf_displacement(best_v, shape, res, int_steps)
        back = svf_displacement(-best_v, shape, res, int_steps)
    return SVFCorrection(forward=fwd, inverse=back, grid_affine=images.grid_affine,
                         losses=losses, similarity=similarity,
                         max_displacement_mm=float(fwd.norm(dim=1).max()))
