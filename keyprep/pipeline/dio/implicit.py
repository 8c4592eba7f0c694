"""Gradients through the solver's optimum by implicit differentiation (CPU, pure torch).

At the free-form optimum ``u*`` of the pointwise feature objective (``paper_dio.md`` §1.4)::

    c(x) = mean_c (F_m,c(x + u(x)) - F_f,c(x))^2 ,   g(x) = dc/du(x) = 0 at u*,

the implicit function theorem gives ``du*/dF = -H^-1 dg/dF`` with ``H = dg/du``. Because
``c`` couples nothing across voxels, ``H`` is **block diagonal with one 3x3 block per voxel**::

    H(x) = 2/C sum_c [ grad F_m,c grad F_m,c^T + r_c hess F_m,c ]     (r_c = F_m,c(x+u) - F_f,c)

so the exact IFT backward is one batched 3x3 solve per voxel: for an outer gradient
``a = dT/du*``, ``v = (H + delta I)^-1 a`` and ``dT/dF = -d(v . g)/dF`` (``v`` held fixed).
The **Jacobian-free** variant (JFB, Fung et al. 2021, the paper's choice) replaces ``H`` by a
multiple of the identity, ``lambda I`` with ``lambda`` the mean over voxels of the trace of the
Gauss-Newton part divided by 3 (so the gradient keeps the scale of the exact one); it needs no
solve and no second derivatives.

No CUDA extension is needed: the sampler here (:func:`trilinear`) is written with gathers and
returns the interpolated value, its spatial gradient and its mixed second derivatives in closed
form (trilinear interpolation is linear along each axis, so the pure second derivatives are 0);
they are linear in the feature values, so one ordinary backward pass gives ``d(v . g)/dF``.
Coordinates are voxels of the level grid with border handling equal to the solver's
(``grid_sample(padding_mode='border')``: outside the grid the value is the edge's and the
derivatives are zero).

The solver's Gaussian smoothing of the warp means its fixed point is only close to ``g = 0``
(``paper_dio.md`` §1.3 caveat); :func:`newton_polish` takes per-voxel Newton steps with the same
blocks to reach the exact stationary point when that matters (the finite-difference test).
"""

from __future__ import annotations

import torch

from ..synth.generator import identity_grid

__all__ = ['trilinear', 'voxel_terms', 'implicit_displacement', 'ImplicitDisplacement',
           'newton_polish', 'MODES']

MODES = ('ift', 'jfb')


def trilinear(volume: torch.Tensor, points: torch.Tensor, derivatives: int = 2):
    """Trilinear interpolation of ``volume [C, D, H, W]`` at voxel coordinates ``points [3,
    N]`` (border padding). Returns ``value [C, N]``, with ``derivatives >= 1`` also ``grad
    [C, 3, N]``, with ``derivatives >= 2`` also ``mixed [C, 3, N]`` (d2/dij, d2/dik, d2/djk).
    Differentiable (to any order) in ``volume``; the derivatives are exact for the piecewise
    trilinear function (one-sided at cell faces)."""
    shape = volume.shape[1:]
    flat = volume.reshape(volume.shape[0], -1)
    idx0, idx1, w, inside = [], [], [], []
    for a in range(3):
        n = shape[a]
        p = points[a]
        pc = p.clamp(0, n - 1)
        i0 = pc.detach().floor().clamp(max=max(n - 2, 0))
        i1 = (i0 + 1).clamp(max=n - 1)
        w.append(pc - i0)
        idx0.append(i0.long())
        idx1.append(i1.long())
        inside.append(((p >= 0) & (p <= n - 1)).to(volume.dtype))
    strides = (shape[1] * shape[2], shape[2], 1)
    corners = []
    for bx in (idx0[0], idx1[0]):
        for by in (idx0[1], idx1[1]):
            for bz in (idx0[2], idx1[2]):
                index = bx * strides[0] + by * strides[1] + bz * strides[2]
                corners.append(torch.index_select(flat, 1, index))
    c = torch.stack(corners, 1).view(volume.shape[0], 2, 2, 2, -1)  # [C, x, y, z, N]
    wx, wy, wz = w

    def lerp(t, wa):  # interpolate the first corner axis of t [C, 2, ..., N]
        return t[:, 0] + (t[:, 1] - t[:, 0]) * wa

    cz = c[:, :, :, 0] + (c[:, :, :, 1] - c[:, :, :, 0]) * wz  # [C, x, y, N]
    cyz = lerp(cz.transpose(1, 2), wy)  # [C, x, N]
    value = lerp(cyz, wx)
    if derivatives < 1:
        return value
    dz = (c[:, :, :, 1] - c[:, :, :, 0]) * inside[2]  # d/dz, [C, x, y, N]
    dy = (cz[:, :, 1] - cz[:, :, 0]) * inside[1]  # d/dy after z, [C, x, N]
    dz_y = lerp(dz.transpose(1, 2), wy)  # d/dz after y, [C, x, N]
    grad = torch.stack([(cyz[:, 1] - cyz[:, 0]) * inside[0], lerp(dy, wx), lerp(dz_y, wx)], 1)
    if derivatives < 2:
        return value, grad
    dyz = (dz[:, :, 1] - dz[:, :, 0]) * inside[1]  # [C, x, N]
    mixed = torch.stack([(dy[:, 1] - dy[:, 0]) * inside[0], (dz_y[:, 1] - dz_y[:, 0]) * inside[0],
                         lerp(dyz, wx)], 1)
    return value, grad, mixed


def voxel_terms(u: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor,
                hessian: bool = True):
    """Per-voxel gradient ``g [N, 3]`` of ``c(x)`` (module docstring) at the displacement
    ``u [1, 3, *grid]`` (level voxels) of features ``[1, C, *grid]``, and (``hessian``) the
    3x3 blocks ``H [N, 3, 3]``, else the Gauss-Newton trace ``[N]``. ``g`` is differentiable
    in ``fixed`` and ``moving``."""
    grid = u.shape[2:]
    pts = (identity_grid(grid, u.device, u.dtype) + u[0]).reshape(3, -1)
    n_ch = fixed.shape[1]
    if not hessian:
        value, grad = trilinear(moving[0], pts, 1)
        res = value - fixed[0].reshape(n_ch, -1)  # [C, N]
        g = (2.0 / n_ch) * torch.einsum('kn,kan->na', res, grad)
        tr = (2.0 / n_ch) * grad.detach().square().sum((0, 1))
        return g, tr
    value, grad, mixed = trilinear(moving[0], pts, 2)
    res = value - fixed[0].reshape(n_ch, -1)  # [C, N]
    g = (2.0 / n_ch) * torch.einsum('kn,kan->na', res, grad)
    gd = grad.detach()
    h = (2.0 / n_ch) * torch.einsum('kan,kbn->nab', gd, gd)
    m = (2.0 / n_ch) * torch.einsum('kn,kan->na', res.detach(), mixed.detach())
    off = torch.zeros_like(h)
    off[:, 0, 1] = off[:, 1, 0] = m[:, 0]
    off[:, 0, 2] = off[:, 2, 0] = m[:, 1]
    off[:, 1, 2] = off[:, 2, 1] = m[:, 2]
    return g, h + off


def _damped_solve(h: torch.Tensor, rhs: torch.Tensor, damping: float) -> torch.Tensor:
    tr = torch.diagonal(h, dim1=1, dim2=2).sum(-1)
    delta = damping * float(tr.mean().abs()) / 3 + 1e-12
    eye = torch.eye(3, dtype=h.dtype, device=h.device)
    return torch.linalg.solve(h + delta * eye, rhs.unsqueeze(-1)).squeeze(-1)


class ImplicitDisplacement(torch.autograd.Function):
    """Identity on ``u*`` in the forward pass; the backward pass gives the features the
    gradient of the implicit function ``u*(F_f, F_m)`` (exact IFT or JFB)."""

    @staticmethod
    def forward(ctx, u_star, fixed, moving, mode, damping):
        ctx.save_for_backward(u_star.detach(), fixed.detach(), moving.detach())
        ctx.mode, ctx.damping = mode, damping
        return u_star.detach().clone()

    @staticmethod
    def backward(ctx, grad_out):
        u, fixed, moving = ctx.saved_tensors
        need_f, need_m = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        if not (need_f or need_m):
            return None, None, None, None, None
        with torch.enable_grad():
            ff = fixed.clone().requires_grad_(need_f)
            fm = moving.clone().requires_grad_(need_m)
            a = grad_out[0].reshape(3, -1).T  # [N, 3]
            if ctx.mode == 'ift':
                g, h = voxel_terms(u, ff, fm, hessian=True)
                v = _damped_solve(h, a.to(h.dtype), ctx.damping)
            else:
                g, tr = voxel_terms(u, ff, fm, hessian=False)
                lam = float(tr.detach().mean()) / 3 + 1e-12
                v = a / lam
            inputs = [t for t, need in ((ff, need_f), (fm, need_m)) if need]
            grads = torch.autograd.grad(-(v.detach() * g).sum(), inputs, allow_unused=True)
        grads = list(grads)
        gf = grads.pop(0) if need_f else None
        gm = grads.pop(0) if need_m else None
        return None, gf, gm, None, None


def implicit_displacement(u_star: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor,
                          mode: str = 'jfb', damping: float = 1e-4) -> torch.Tensor:
    """``u*`` (``[1, 3, *grid]``, level voxels, the solver's result) as a differentiable
    function of the features ``[1, C, *grid]`` through the optimality condition ``g(u*) = 0``.
    ``mode``: ``'ift'`` (exact per-voxel solve, ``H + delta I`` with ``delta = damping *
    mean trace / 3``) or ``'jfb'`` (Jacobian-free)."""
    if mode not in MODES:
        raise ValueError(f'mode must be one of {MODES}, not {mode!r}')
    return ImplicitDisplacement.apply(u_star, fixed, moving, mode, damping)


@torch.no_grad()
def newton_polish(u: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor, steps: int = 10,
                  damping: float = 1e-8, max_step: float = 0.5) -> torch.Tensor:
    """Per-voxel (damped) Newton steps on ``c(x)`` from ``u`` (each move capped at
    ``max_step`` voxels): the exact stationary point of the unsmoothed objective."""
    u = u.detach().clone()
    for _ in range(steps):
        g, h = voxel_terms(u, fixed.detach(), moving.detach(), hessian=True)
        step = _damped_solve(h, g, damping)
        norm = step.norm(dim=1, keepdim=True)
        step = step * (max_step / norm.clamp_min(max_step))
        u = u - step.T.reshape(u.shape)
    return u
