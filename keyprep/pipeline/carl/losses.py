"""CARL's training losses (``paper_carl.md`` §4): LNCC, diffusion, GradICON, and the
per-pair loss of the two phases.

All fields follow :mod:`.network`'s convention: a displacement ``u [B, 3, *shape]`` on the
full-resolution working grid, in its voxels, meaning ``phi(x) = x + u(x)`` with
``moving(phi(x)) ~ fixed(x)``.

* LNCC: local normalised cross-correlation with a Gaussian window of sigma = 4 voxels
  (kernel 4 sigma + 1 = 17, separable), ``(G(IJ) - G(I)G(J)) /
  sqrt((G(I^2) - G(I)^2 + eps) (G(J^2) - G(J)^2 + eps))``; loss ``1 - mean(lncc)``. Near the
  borders ``G`` averages over the part of the window inside the grid (the authors' code pads
  with zeros, which makes any two images of non-zero mean correlate there).
  ``squared=True`` uses ``1 - mean(lncc^2)``: blind to the sign of the local correlation, for
  pairs of different contrasts (keyprep's synthetic training; not in the paper).
* Diffusion: ``sum_d mean((u(x + e_d) - u(x))^2)``, the squared gradient of the displacement in
  voxel units (the paper's ``||grad u||^2`` with its unit-domain factor ``N^2``).
* GradICON: the Jacobian of the inverse-consistency error ``e(p) = phi_AB(phi_BA(p)) - p`` by
  finite differences (step ``delta`` voxels) at randomly jittered grid points (jitter of
  ``jitter`` voxels standard deviation), ``sum_d mean(((e(p + delta e_d) - e(p)) / delta)^2)``:
  zero exactly when ``phi_AB o phi_BA`` is a translation, so for an exact inverse pair.
* :func:`pair_loss`: ``sim(A o phi_AB, B) + sim(B o phi_BA, A) + lambda * reg`` with reg the
  diffusion of ``phi_AB`` (phase ``'diffusion'``, the first steps of training) or GradICON of
  the final composed maps (phase ``'gradicon'``), lambda = 1.5 (the paper's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .network import cell_centres, eval_disp, warp

__all__ = ['gaussian_kernel', 'local_ncc', 'lncc_loss', 'diffusion_loss', 'gradicon_loss',
           'jacobian_determinant', 'folding_fraction', 'pair_loss', 'LAMBDA']

#: Regularisation weight of both phases (the paper's lambda).
LAMBDA = 1.5


def gaussian_kernel(sigma: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian of ``4 sigma + 1`` taps (17 for sigma = 4)."""
    radius = int(round(2 * sigma))
    t = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _band(n: int, kernel: torch.Tensor) -> torch.Tensor:
    """The ``[n, n]`` matrix ``M`` with ``(x @ M)[j] = sum_t x[j + t - r] kernel[t]`` (zero
    outside ``0..n-1``, ``r = len(kernel) // 2``): a same-size 1-D correlation as a product."""
    r = kernel.numel() // 2
    i = torch.arange(n, device=kernel.device)
    t = i[:, None] - i[None, :] + r  # M[i, j] = kernel[i - j + r]
    inside = (t >= 0) & (t < kernel.numel())
    return torch.where(inside, kernel[t.clamp(0, kernel.numel() - 1)],
                       torch.zeros((), dtype=kernel.dtype, device=kernel.device))


def _smooth(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable convolution of ``x [B, C, D, H, W]`` with ``kernel`` along each axis (zero
    padding, same size), as three products with banded matrices: the same numbers as a
    depthwise ``conv3d`` per axis to float rounding, about 5x faster forward and backward on a
    CPU (BLAS instead of a 17-tap depthwise convolution)."""
    for axis in range(2, 5):
        x = torch.movedim(torch.movedim(x, axis, -1) @ _band(x.shape[axis], kernel), -1, axis)
    return x


def local_ncc(a: torch.Tensor, b: torch.Tensor, sigma: float = 4.0,
              eps: float = 1e-5) -> torch.Tensor:
    """The local normalised cross-correlation map of ``a`` and ``b`` (``[B, 1, ...]``)."""
    a, b = a.float(), b.float()
    k = gaussian_kernel(sigma, a.device, a.dtype)
    stats = _smooth(torch.cat([a, b, a * a, b * b, a * b], 1), k)
    # local means over the part of the window inside the grid (zero padding alone biases every
    # statistic near the borders: an image of non-zero mean would correlate with anything)
    mass = _smooth(torch.ones_like(a[:1]), k)
    stats = stats / mass
    ma, mb, aa, bb, ab = stats.split(1, dim=1)
    var_a = F.relu(aa - ma * ma)
    var_b = F.relu(bb - mb * mb)
    return (ab - ma * mb) / torch.sqrt((var_a + eps) * (var_b + eps))


def lncc_loss(a: torch.Tensor, b: torch.Tensor, sigma: float = 4.0,
              squared: bool = False) -> torch.Tensor:
    """``1 - mean(lncc)`` (``squared``: ``1 - mean(lncc^2)``), per batch item ``[B]``."""
    ncc = local_ncc(a, b, sigma)
    if squared:
        ncc = ncc * ncc
    return 1 - ncc.flatten(1).mean(1)


def diffusion_loss(u: torch.Tensor) -> torch.Tensor:
    """``sum_d mean((u(x + e_d) - u(x))^2)`` per batch item ``[B]`` (voxel units)."""
    total = 0
    for axis in range(3):
        d = u.diff(dim=2 + axis)
        total = total + (d * d).flatten(1).mean(1)
    return total


def gradicon_loss(u_ab: torch.Tensor, u_ba: torch.Tensor, delta: float = 0.1,
                  jitter: float = 1.0, generator: torch.Generator | None = None,
                  crop: int = 0, stride: int = 1) -> torch.Tensor:
    """GradICON: ``sum_d mean(|(e(p + delta e_d) - e(p)) / delta|^2)`` with
    ``e(p) = phi_AB(phi_BA(p)) - p`` at grid points jittered by ``N(0, jitter^2)`` voxels
    (clipped to 3 standard deviations); ``crop``: leave out that many voxels at each border
    (for exact tests of maps that leave the grid); ``stride``: one point per ``stride^3``
    voxels (the cell centres of a coarser lattice, jittered: the same expectation at a
    fraction of the cost; training uses 2). Per batch item ``[B]``."""
    shape = u_ab.shape[2:]
    pts = cell_centres(shape, 0, u_ab.device, u_ab.dtype)
    if stride > 1:
        pts = F.avg_pool3d(pts, stride)
    if crop:
        pts = pts[:, :, crop:-crop, crop:-crop, crop:-crop]
    pts = pts.expand(u_ab.shape[0], *pts.shape[1:])
    if jitter:
        noise = torch.randn(pts.shape, generator=generator, device=pts.device, dtype=pts.dtype)
        pts = pts + jitter * noise.clamp(-3, 3)

    def err(p):
        q = p + eval_disp(u_ba, 0, p)
        return q + eval_disp(u_ab, 0, q) - p

    e0 = err(pts)
    total = 0
    for axis in range(3):
        step = torch.zeros(1, 3, 1, 1, 1, device=pts.device, dtype=pts.dtype)
        step[0, axis] = delta
        g = (err(pts + step) - e0) / delta
        total = total + (g * g).flatten(1).mean(1)
    return total


def jacobian_determinant(u: torch.Tensor) -> torch.Tensor:
    """``det(I + grad u)`` ``[B, *shape]`` of a displacement ``[B, 3, *shape]`` (voxel units,
    central differences inside, one-sided at the borders)."""
    grads = [torch.gradient(u[:, c], dim=(1, 2, 3)) for c in range(3)]
    j = [[grads[c][d] + (1.0 if c == d else 0.0) for d in range(3)] for c in range(3)]
    return (j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
            - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
            + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0]))


def folding_fraction(u: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Fraction of voxels (inside ``mask`` when given) where ``det(I + grad u) <= 0``."""
    det = jacobian_determinant(u)
    if mask is not None:
        sel = mask.reshape(det.shape) > 0
        return float((det[sel] <= 0).float().mean()) if bool(sel.any()) else 0.0
    return float((det <= 0).float().mean())


def pair_loss(moving: torch.Tensor, fixed: torch.Tensor, u: torch.Tensor,
              phase: str = 'gradicon', lam: float = LAMBDA, sigma: float = 4.0,
              squared: bool = False, generator: torch.Generator | None = None,
              stride: int = 2, onehot_moving: torch.Tensor | None = None,
              onehot_fixed: torch.Tensor | None = None, dice_weight: float = 0.0,
              label_level: int = 0) -> dict:
    """The symmetric loss of a batch holding both directions of each pair: ``moving =
    cat(A, B)``, ``fixed = cat(B, A)``, ``u`` the network's ``[2n, 3, ...]`` output (first
    half ``phi_AB``, second ``phi_BA``); ``stride``: of GradICON's points. With
    ``dice_weight > 0`` and one-hot label maps of the same batches (``[2n, C, ...]``), adds
    ``dice_weight * (1 - soft Dice)`` of the warped moving labels (trilinear) against the
    fixed ones, per direction (keyprep's label-supervised recipe, not in the paper: the
    synthetic pairs carry their labels, and a label term teaches contrast invariance where
    LNCC across contrasts cannot); ``label_level``: the label maps are averaged over blocks of
    ``2**label_level`` voxels per axis first and compared on that coarser grid (1: 8x cheaper;
    the one-hot maps become partial-volume fractions). Returns ``loss`` (scalar) and its
    terms."""
    n = moving.shape[0] // 2
    warped = warp(moving.float(), 0, u, 0)
    sim = lncc_loss(warped, fixed.float(), sigma, squared)  # both directions
    dice = None
    if dice_weight > 0:
        if onehot_moving is None or onehot_fixed is None:
            raise ValueError('dice_weight > 0 needs onehot_moving and onehot_fixed')
        from ..keymorph.losses import soft_dice_loss

        oh_m, oh_f = onehot_moving.float(), onehot_fixed.float()
        if label_level > 0:
            k = 2 ** label_level
            oh_m, oh_f = F.avg_pool3d(oh_m, k), F.avg_pool3d(oh_f, k)
        warped_lab = warp(oh_m, label_level, u, 0)
        dice = torch.stack([soft_dice_loss(warped_lab[i:i + 1], oh_f[i:i + 1])
                            for i in range(2 * n)])
    if phase == 'diffusion':
        reg = diffusion_loss(u[:n])
    elif phase == 'gradicon':
        reg = gradicon_loss(u[:n], u[n:], generator=generator, stride=stride)
    else:
        raise ValueError(f"phase must be 'diffusion' or 'gradicon', not {phase!r}")
    sim_pair = sim[:n] + sim[n:]
    total = sim_pair + lam * reg
    if dice is not None:
        total = total + dice_weight * (dice[:n] + dice[n:])
    loss = total.mean()
    out = {'loss': loss, 'sim': sim_pair.mean().detach(), 'reg': reg.mean().detach()}
    if dice is not None:
        out['dice'] = (dice[:n] + dice[n:]).mean().detach()
    return out
