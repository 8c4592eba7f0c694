"""DIO's inner solver: register two multi-scale feature images, coarse to fine.

Given fixed and moving features ``F_f[l], F_m[l]`` (``[1, C, *grid_l]``, coarsest first; level
``l`` is ``s_l`` times coarser than the working grid), the solver minimises the feature
mismatch (``paper_dio.md`` §1.3, Algorithm 2)::

    C(phi) = sum_x mean_c (F_m,c(phi(x)) - F_f,c(x))^2        (losses are reported per voxel)

level by level, starting each level from the previous level's result upsampled. With image
pyramids ``I_f[l], I_m[l]`` and an image weight ``mu > 0`` (keyprep's *image prompting*, a test-time
term like the paper's label prompting) the objective becomes, per voxel::

    C(phi) = sum_x [ mean_c (F_m,c(phi(x)) - F_f,c(x))^2 / E_l + mu (1 - NCC_w^2(I_f, I_m o phi)(x)) ]

with ``E_l`` the fixed features' energy at the level (mean channel variance; it makes the
feature term dimensionless, about 0-2 per voxel) and ``NCC_w`` the local normalised
cross-correlation in a ``w``-voxel box window, squared as in ANTs' CC and the authors'
unsigned LNCC (:func:`lncc`), so locally inverted contrasts match too. The
transformation representation is chosen at call time, on the same features (no retraining):

``'ffd'``
    free-form displacement ``phi(x) = x + u(x)``; after each update ``u`` is smoothed with a
    Gaussian (``sigma_warp``, voxels of the level) and the gradient before it (``sigma_grad``),
    as in Demons/FireANTs and the authors' code. May fold.
``'diffeo'``
    a **stationary velocity field** ``v``: ``phi = exp(v)``, integrated by scaling and
    squaring (``v / 2^K`` composed with itself ``K`` times, ``K`` chosen so that the first
    step moves at most a quarter of a voxel); ``v`` is smoothed like ``u`` but with
    ``sigma_velocity`` (1 voxel: with the free-form 0.5 a large ``v`` is under-resolved, its
    numerical exponential loses inverse consistency and the warp's log-Jacobian spread more
    than doubles; below 0.5 it folds). Its inverse is exactly ``exp(-v)``. (The authors'
    test-time solver is compositive; the SVF is chosen here for the exact inverse.)
``'affine'``
    ``phi(x) = A x + t`` in centred, normalised millimetre coordinates of the grid
    (``q = (x_mm - centre) / R``, ``R`` the largest half-extent), starting at the identity.

Optimisers: ``'adam'`` (default; Adam moments of the smoothed gradient, the update direction
rescaled so that no voxel moves more than ``lr`` (0.25) voxels per iteration, FireANTs-style) or
``'sgd'`` (the smoothed gradient rescaled the same way). Early stopping: the level ends when the
relative loss decrease stays below ``tol`` for ``patience`` consecutive iterations.

Fields and coordinates
----------------------
Dense fields are ``[1, 3, *grid_l]`` in **voxels of the level's grid**, channel order
``(i, j, k)`` (the array axes). Voxel ``i`` of a level ``s`` times coarser covers working voxels
``[s i, s i + s - 1]`` (max-pooling), so it sits at working coordinate ``s i + (s - 1) / 2``;
fields move between levels with ``F.interpolate(..., align_corners=False)`` (which keeps that
cell-centre alignment) and a factor 2. Sampling uses voxel coordinates (voxel centres at
integers) with border padding (features beyond the grid repeat the edge).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from ..optim import Adam
from ..similarity import lncc
from ..synth.generator import gaussian_blur, identity_grid

__all__ = ['SolverConfig', 'REPRESENTATIONS', 'solve', 'warp', 'sample', 'integrate_velocity',
           'upsample_field', 'feature_loss', 'lncc', 'image_loss', 'Objective',
           'jacobian_determinant', 'LevelResult', 'SolveResult', 'affine_grid_vox', 'principal_channels', 'invert_displacement']

REPRESENTATIONS = ('ffd', 'diffeo', 'affine')


@dataclass(frozen=True)
class SolverConfig:
    """Settings of the inner solver (see the module docstring)."""

    iterations: tuple[int, ...] = (200, 100, 50)
    optimizer: str = 'adam'  # 'adam' | 'sgd'
    lr: float = 0.25  # largest move of one iteration, voxels of the level (ffd, diffeo)
    lr_affine: float = 0.01  # Adam step of the affine parameters (normalised coordinates)
    betas: tuple[float, float] = (0.9, 0.99)
    sigma_grad: float = 1.0  # Gaussian smoothing of the gradient (voxels of the level)
    sigma_warp: float = 0.5  # Gaussian smoothing of u (ffd) after each update
    sigma_velocity: float = 1.0  # Gaussian smoothing of v (diffeo) after each update
    tol: float = 1e-4  # early stop: relative loss decrease below this ...
    patience: int = 5  # ... for this many consecutive iterations (0: never stop early)
    max_squaring: int = 12
    #: ``'diffeo'`` only: ``'exact'`` back-propagates the feature loss through the scaling
    #: and squaring; ``'displacement'`` uses the loss's gradient with respect to the
    #: displacement ``exp(v) - id`` as the velocity's (the log-domain demons approximation:
    #: exact to first order for small ``v``; at full resolution, one thread, 16 channels:
    #: 1.8 s per iteration through the squarings, 0.45 + 0.64 s without)
    svf_gradient: str = 'exact'
    #: > 0: register the features' ``channels`` principal components (one projection per
    #: level, computed on the fixed and moving features together) instead of all channels.
    #: Sampling is linear, so the projected loss is the full one less the mismatch in the
    #: dropped components (whose variance the solve result records); 0: every channel
    channels: int = 0

    def __post_init__(self):
        object.__setattr__(self, 'iterations', tuple(int(i) for i in self.iterations))
        object.__setattr__(self, 'betas', tuple(float(b) for b in self.betas))
        if self.optimizer not in ('adam', 'sgd'):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', not {self.optimizer!r}")
        if self.svf_gradient not in ('exact', 'displacement'):
            raise ValueError("svf_gradient must be 'exact' or 'displacement', not "
                             f'{self.svf_gradient!r}')


@dataclass
class LevelResult:
    field: torch.Tensor  # [1, 3, *grid] (ffd: u, diffeo: v) or [3, 4] (affine)
    iterations: int
    loss: float
    losses: list = field(default_factory=list)


@dataclass
class SolveResult:
    representation: str
    levels: list  # LevelResult per level, coarsest first
    seconds: float
    #: per level, the fraction of the features' variance kept by ``cfg.channels`` (1.0: all)
    kept_variance: list = field(default_factory=list)

    @property
    def final(self) -> LevelResult:
        return self.levels[-1]

    @property
    def iterations(self) -> list[int]:
        return [lv.iterations for lv in self.levels]


# ---------------------------------------------------------------------------- sampling
def sample(volume: torch.Tensor, coords: torch.Tensor, mode: str = 'bilinear',
           padding_mode: str = 'border') -> torch.Tensor:
    """``volume [B, C, D, H, W]`` at voxel coordinates ``coords [B, 3, *S]`` (i, j, k)."""
    shape = volume.shape[2:]
    norm = [2 * coords[:, a] / max(shape[a] - 1, 1) - 1 for a in range(3)]
    grid = torch.stack(norm[::-1], dim=-1)
    return F.grid_sample(volume, grid, mode=mode, padding_mode=padding_mode, align_corners=True)


def warp(volume: torch.Tensor, disp: torch.Tensor, mode: str = 'bilinear',
         padding_mode: str = 'border') -> torch.Tensor:
    """``volume(x + disp(x))`` for a displacement ``[1, 3, *grid]`` in voxels of the grid."""
    base = identity_grid(disp.shape[2:], disp.device, disp.dtype)[None]
    return sample(volume, base + disp, mode, padding_mode)


def upsample_field(field: torch.Tensor, shape) -> torch.Tensor:
    """A field in voxels of its grid, resampled (cell-centre aligned) onto ``shape`` and
    rescaled to voxels of that grid."""
    if tuple(field.shape[2:]) == tuple(shape):
        return field
    scale = torch.tensor([n / m for n, m in zip(shape, field.shape[2:])], device=field.device,
                         dtype=field.dtype).view(1, 3, 1, 1, 1)
    return F.interpolate(field, size=tuple(shape), mode='trilinear', align_corners=False) * scale


def max_vector_norm(field: torch.Tensor) -> torch.Tensor:
    """The largest length of the vectors of a field ``[B, 3, ...]`` (over channels).
    ``sqrt(max(sum of squares))``: on the CPU torch's ``norm(dim=1)`` took 64 ms for one 2 mm
    brain's field against 1.5 ms for this, and the solver calls it every iteration."""
    return field.square().sum(1).max().sqrt()


def integrate_velocity(v: torch.Tensor, steps: int | None = None, max_steps: int = 12
                       ) -> torch.Tensor:
    """Displacement of ``exp(v)`` by scaling and squaring; ``steps=None`` picks the number of
    squarings so that ``v / 2^K`` moves at most a quarter of a voxel."""
    if steps is None:
        vmax = float(max_vector_norm(v.detach())) if v.numel() else 0.0
        steps = min(max_steps, max(4, math.ceil(math.log2(max(vmax, 1e-6) / 0.25)) + 1))
    disp = v / (2 ** steps)
    base = identity_grid(v.shape[2:], v.device, v.dtype)[None]
    for _ in range(steps):
        disp = disp + sample(disp, base + disp)
    return disp


def invert_displacement(u: torch.Tensor, iterations: int = 50, tol: float = 1e-3
                        ) -> tuple[torch.Tensor, dict]:
    """Fixed-point inverse ``v`` of a displacement ``u [1, 3, *grid]`` (voxels of its grid):
    ``v <- -u(y + v)`` from ``v = 0`` (Chen et al. 2008, as
    :func:`keyprep.pipeline.inverse.invert_displacement` does on an exported field, here on
    the solver's own grid) until the largest update is below ``tol`` voxels or after
    ``iterations`` steps. Returns ``v`` and ``{'iterations', 'converged', 'residual_mean_vox',
    'residual_max_vox'}``, the residual being ``|v(y) + u(y + v(y))|``."""
    base = identity_grid(u.shape[2:], u.device, u.dtype)[None]
    v = torch.zeros_like(u)
    converged, step = False, 0
    for step in range(1, int(iterations) + 1):
        new = -sample(u, base + v)
        change = float(max_vector_norm(new - v)) if v.numel() else 0.0
        v = new
        if change < tol:
            converged = True
            break
    residual = (v + sample(u, base + v)).square().sum(1).sqrt()
    info = {'method': 'fixed-point inversion on the working grid', 'iterations': step,
            'converged': converged,
            'residual_mean_vox': round(float(residual.mean()), 5) if residual.numel() else 0.0,
            'residual_max_vox': round(float(residual.max()), 5) if residual.numel() else 0.0}
    return v, info


def feature_loss(fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
    """The inner objective: squared difference summed over voxels, averaged over channels."""
    return (warped - fixed).square().mean(1).sum()


def image_loss(fixed: torch.Tensor, warped: torch.Tensor, window: int = 5) -> torch.Tensor:
    """The image term: ``1 - LNCC`` (:func:`keyprep.pipeline.similarity.lncc`) summed over
    voxels, averaged over channels."""
    return (1 - lncc(fixed, warped, window)).mean(1).sum()


@dataclass(frozen=True)
class Objective:
    """The inner objective of one level (see the module docstring): the features' MSE,
    scaled by ``feature_scale``, plus ``image_weight`` times :func:`image_loss` of the images
    carried as the last ``image_channels`` channels of the sampled maps."""

    image_weight: float = 0.0
    window: int = 5
    feature_scale: float = 1.0
    image_channels: int = 0

    def __call__(self, fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
        n = self.image_channels
        if n == 0:
            return feature_loss(fixed, warped) * self.feature_scale
        loss = self.image_weight * image_loss(fixed[:, -n:], warped[:, -n:], self.window)
        if fixed.shape[1] > n:
            loss = loss + feature_loss(fixed[:, :-n], warped[:, :-n]) * self.feature_scale
        return loss


def _level_objective(ff: torch.Tensor, fm: torch.Tensor, images, level: int,
                     image_weight: float, window: int):
    """The level's fixed and moving maps to sample (images appended as channels when they
    take part) and its :class:`Objective`."""
    if images is None or image_weight <= 0:
        return ff, fm, Objective()
    imf, imm = images[0][level].detach(), images[1][level].detach()
    energy = (float(ff.reshape(ff.shape[1], -1).var(1, unbiased=False).mean())
              if ff.shape[1] else 0.0)
    scale = 1.0 / energy if energy > 1e-12 else 1.0
    obj = Objective(float(image_weight), int(window), scale, imf.shape[1])
    return torch.cat([ff, imf], 1), torch.cat([fm, imm], 1), obj


def jacobian_determinant(disp: torch.Tensor) -> torch.Tensor:
    """``det(I + grad disp)`` ``[D-2, H-2, W-2]`` by central differences (interior voxels) of a
    displacement ``[1, 3, D, H, W]`` or ``[3, D, H, W]`` in voxels."""
    d = disp[0] if disp.ndim == 5 else disp
    d = torch.as_tensor(d, dtype=torch.float64)
    grads = []
    for a in range(3):  # derivative along axis a of every component
        sl_p = [slice(1, -1)] * 3
        sl_m = [slice(1, -1)] * 3
        sl_p[a] = slice(2, None)
        sl_m[a] = slice(None, -2)
        grads.append((d[(slice(None), *sl_p)] - d[(slice(None), *sl_m)]) / 2)
    jac = torch.stack(grads, 1)  # [component, axis, ...]
    jac = jac + torch.eye(3, dtype=jac.dtype).view(3, 3, 1, 1, 1)
    return torch.linalg.det(jac.permute(2, 3, 4, 0, 1))


# ---------------------------------------------------------------------------- affine
def _affine_frame(shape, scale: int, res_mm: float, device, dtype):
    """Centred normalised coordinates ``q [3, *shape]`` of a level grid's voxels and the
    factors that map ``q`` back to level voxels (``vox = q * R / h - 0.5 + c / h``)."""
    h = scale * res_mm  # mm per level voxel
    extent = torch.tensor([n * h for n in shape], device=device, dtype=dtype)
    centre = extent / 2
    radius = float(extent.max()) / 2
    vox = identity_grid(shape, device, dtype)
    mm = (vox + 0.5) * h
    q = (mm - centre.view(3, 1, 1, 1)) / radius
    return q, centre, radius, h


def affine_grid_vox(mat: torch.Tensor, shape, scale: int = 1, res_mm: float = 1.0
                    ) -> torch.Tensor:
    """Level-voxel coordinates ``[1, 3, *shape]`` of ``phi(x)`` for the affine ``mat [3, 4]``
    acting on centred normalised coordinates (see the module docstring)."""
    q, centre, radius, h = _affine_frame(shape, scale, res_mm, mat.device, mat.dtype)
    mapped = torch.einsum('ab,bijk->aijk', mat[:, :3], q) + mat[:, 3].view(3, 1, 1, 1)
    mm = mapped * radius + centre.view(3, 1, 1, 1)
    return (mm / h - 0.5)[None]


def affine_to_voxel_matrix(mat: torch.Tensor, shape, res_mm: float) -> torch.Tensor:
    """The 4x4 matrix (float64) mapping working-grid voxels to voxels for ``mat``."""
    mat = mat.detach().double().cpu()
    q, centre, radius, h = _affine_frame(shape, 1, res_mm, 'cpu', torch.float64)
    # vox -> q: q = ((vox + 0.5) h - c) / R ; q -> vox: vox = (q R + c) / h - 0.5
    to_q = torch.eye(4, dtype=torch.float64)
    to_q[:3, :3] *= h / radius
    to_q[:3, 3] = (0.5 * h - centre) / radius
    from_q = torch.linalg.inv(to_q)
    m4 = torch.eye(4, dtype=torch.float64)
    m4[:3] = mat
    return from_q @ m4 @ to_q


# ---------------------------------------------------------------------------- the solver
def principal_channels(fixed: torch.Tensor, moving: torch.Tensor, k: int
                       ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Project two feature maps ``[1, C, ...]`` onto the ``k`` principal components of
    their voxels taken together (centred by their joint mean); returns both projections and
    the fraction of the variance kept. ``k >= C``: the maps unchanged (fraction 1)."""
    c = fixed.shape[1]
    if k <= 0 or k >= c:
        return fixed, moving, 1.0
    both = torch.cat([fixed.reshape(c, -1), moving.reshape(c, -1)], 1).double()
    mean = both.mean(1, keepdim=True)
    centred = both - mean
    evals, evecs = torch.linalg.eigh(centred @ centred.T)  # ascending
    proj = evecs[:, -k:].flip(1).T.to(fixed.dtype)  # [k, C]
    kept = float(evals[-k:].sum() / evals.sum().clamp_min(1e-30))
    mean = mean.to(fixed.dtype)

    def project(x):
        return torch.einsum('kc,bc...->bk...', proj, x - mean.view(1, c, *[1] * (x.ndim - 2)))
    return project(fixed), project(moving), kept


class _Stepper:
    """Adam or SGD on a dense field, the step rescaled so that no voxel moves more than
    ``lr`` voxels."""

    def __init__(self, cfg: SolverConfig, like: torch.Tensor):
        self.cfg = cfg
        self.m = torch.zeros_like(like)
        self.v = torch.zeros_like(like)
        self.t = 0

    def direction(self, grad: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if cfg.optimizer == 'adam':
            self.t += 1
            b1, b2 = cfg.betas
            self.m.mul_(b1).add_(grad, alpha=1 - b1)
            self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            mhat = self.m / (1 - b1 ** self.t)
            vhat = self.v / (1 - b2 ** self.t)
            scale = float(vhat.max().sqrt()) * 1e-6 + 1e-30
            d = mhat / (vhat.sqrt() + scale)
            norm = max_vector_norm(d)
            return d / norm.clamp_min(1.0) * cfg.lr
        norm = max_vector_norm(grad)
        return grad / norm.clamp_min(1e-30) * cfg.lr


def _stop(losses: list[float], cfg: SolverConfig) -> bool:
    if cfg.patience <= 0 or len(losses) <= cfg.patience:
        return False
    recent = losses[-cfg.patience - 1:]
    for prev, cur in zip(recent[:-1], recent[1:]):
        if (prev - cur) > cfg.tol * max(abs(prev), 1e-30):
            return False
    return True


def _dense_level(rep: str, f_fix: torch.Tensor, f_mov: torch.Tensor, init: torch.Tensor,
                 iters: int, cfg: SolverConfig, objective=feature_loss) -> LevelResult:
    x = init.detach().clone()
    stepper = _Stepper(cfg, x)
    fshape = tuple(f_fix.shape[2:])
    n_vox = f_fix[0, 0].numel()
    base = identity_grid(fshape, f_fix.device, f_fix.dtype)[None]
    through_svf = rep == 'diffeo' and cfg.svf_gradient == 'exact'

    def displacement(field: torch.Tensor) -> torch.Tensor:
        return field if rep == 'ffd' else integrate_velocity(field, max_steps=cfg.max_squaring)

    losses: list[float] = []
    for _ in range(iters):
        if rep == 'ffd' or through_svf:
            var = x.requires_grad_(True)
        else:  # gradient with respect to the displacement exp(v) - id
            with torch.no_grad():
                var = integrate_velocity(x, max_steps=cfg.max_squaring)
            var.requires_grad_(True)
        with torch.enable_grad():
            disp = displacement(var) if var is x else var
            loss = objective(f_fix, sample(f_mov, base + disp))
            (grad,) = torch.autograd.grad(loss, var)
        x = x.detach()
        losses.append(float(loss.detach()) / n_vox)
        if _stop(losses, cfg):
            break
        grad = gaussian_blur(grad, (cfg.sigma_grad,) * 3) if cfg.sigma_grad > 0 else grad
        x = x - stepper.direction(grad)
        sigma = cfg.sigma_warp if rep == 'ffd' else cfg.sigma_velocity
        if sigma > 0:
            x = gaussian_blur(x, (sigma,) * 3)
    with torch.no_grad():
        final = float(objective(f_fix, sample(f_mov, base + displacement(x)))) / n_vox
    return LevelResult(x, len(losses), final, losses)


def _affine_level(f_fix, f_mov, init: torch.Tensor, iters: int, cfg: SolverConfig, scale: int,
                  res_mm: float, level: int, objective=feature_loss) -> LevelResult:
    mat = init.detach().clone().requires_grad_(True)
    opt = Adam([mat], lr=cfg.lr_affine * 0.5 ** level, betas=cfg.betas)
    n_vox = f_fix[0, 0].numel()
    losses: list[float] = []
    shape = f_fix.shape[2:]
    for _ in range(iters):
        with torch.enable_grad():
            coords = affine_grid_vox(mat, shape, scale, res_mm)
            loss = objective(f_fix, sample(f_mov, coords))
            opt.zero_grad()
            loss.backward()
        losses.append(float(loss.detach()) / n_vox)
        if _stop(losses, cfg):
            break
        opt.step()
    with torch.no_grad():
        final = float(objective(f_fix, sample(f_mov, affine_grid_vox(mat, shape, scale,
                                                                        res_mm)))) / n_vox
    return LevelResult(mat.detach(), len(losses), final, losses)


def solve(fixed: list[torch.Tensor], moving: list[torch.Tensor], representation: str = 'ffd',
          cfg: SolverConfig = SolverConfig(), scales: tuple[int, ...] = (4, 2, 1),
          res_mm: float = 1.0, init=None, images=None, image_weight: float = 0.0,
          image_window: int = 5) -> SolveResult:
    """Register the feature pyramids (coarsest first, ``[1, C, *grid_l]``, level ``l``
    ``scales[l]`` times coarser than the working grid of voxel size ``res_mm``).

    Returns every level's result (``ffd``: displacement ``u``, ``diffeo``: velocity ``v``,
    both ``[1, 3, *grid_l]`` in level voxels; ``affine``: ``[3, 4]`` on centred normalised
    coordinates). ``init``: a starting field of the coarsest level (or matrix). Runs without
    building a graph for the features (they are detached).

    ``images``: optional ``(fixed, moving)`` image pyramids (``[1, 1, *grid_l]`` per level,
    like the features) registered alongside them with weight ``image_weight`` through
    :func:`image_loss` (window ``image_window`` voxels of each level); the feature term is then
    divided by the fixed features' energy at each level (module docstring). Features with
    no channel (``[1, 0, *grid]``) leave the image term alone. The principal components
    (``cfg.channels``) are taken of the features only."""
    if representation not in REPRESENTATIONS:
        raise ValueError(f'unknown representation {representation!r}; '
                         f'choose from {REPRESENTATIONS}')
    if len(fixed) != len(moving) or len(fixed) != len(scales):
        raise ValueError('one fixed and one moving feature map per scale')
    if images is not None and (len(images) != 2 or any(len(p) != len(fixed) for p in images)):
        raise ValueError('images: one fixed and one moving image pyramid, one map per scale')
    if not image_weight >= 0:
        raise ValueError(f'image_weight must be >= 0, not {image_weight}')
    if image_weight > 0 and images is None:
        raise ValueError('image_weight > 0 needs the image pyramids')
    if images is None or image_weight == 0:
        if any(f.shape[1] == 0 for f in fixed):
            raise ValueError('features without channels need an image term')
    iters = list(cfg.iterations)
    if len(iters) != len(fixed):
        iters = (iters + [iters[-1]] * len(fixed))[:len(fixed)]
    t0 = time.perf_counter()
    levels: list[LevelResult] = []
    kept: list[float] = []
    state = init
    for level, (ff, fm, s) in enumerate(zip(fixed, moving, scales)):
        ff, fm, frac = principal_channels(ff.detach(), fm.detach(), cfg.channels)
        kept.append(frac)
        ff, fm, objective = _level_objective(ff, fm, images, level, image_weight, image_window)
        if representation == 'affine':
            if state is None:
                state = torch.eye(3, 4, device=ff.device, dtype=ff.dtype)
            res = _affine_level(ff, fm, state, iters[level], cfg, s, res_mm, level, objective)
        else:
            shape = ff.shape[2:]
            if state is None:
                state = torch.zeros(1, 3, *shape, device=ff.device, dtype=ff.dtype)
            state = upsample_field(state.detach(), shape)
            res = _dense_level(representation, ff, fm, state, iters[level], cfg, objective)
        levels.append(res)
        state = res.field
    return SolveResult(representation, levels, time.perf_counter() - t0, kept)


def with_iterations(cfg: SolverConfig, iterations) -> SolverConfig:
    """``cfg`` with ``iterations`` (an int for every level, or one per level) when given."""
    if iterations is None:
        return cfg
    if isinstance(iterations, int):
        iterations = (iterations,) * len(cfg.iterations)
    return replace(cfg, iterations=tuple(int(i) for i in iterations))
