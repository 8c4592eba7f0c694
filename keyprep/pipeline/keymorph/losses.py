"""Training losses of KeyMorph and the spatial regularisation of its heatmaps.

Similarities (``paper_keymorph.md`` §3): soft Dice on one-hot label maps warped bilinearly
(supervised variant), MSE and local normalised cross-correlation (unsupervised, same contrast),
and a differentiable Parzen-window mutual information (unsupervised, any contrasts).

Spatial regularisation (Billot et al. 2025, ``paper_spatial_regularisation.md`` §2), on the
per-keypoint spatial distributions ``F_k`` (the normalised heatmaps) with moments
``mu_k = sum_X X F_k(X)`` and ``Sigma_k = sum_X F_k(X) (X - mu_k)(X - mu_k)^T``:

* :func:`kl_gaussian_loss` (Eq. 1): ``KL(F_k || N(mu_k, Sigma_k))``, the Gaussian evaluated on
  the heatmap grid and renormalised there, with a stop-gradient through ``mu_k, Sigma_k`` (the
  authors' code). Reduction: mean over keypoints and batch (Eq. 1 without its ``1/|Omega|``,
  which would make the term depend on the grid size). Unit-free.
* :func:`variance_loss` (Eq. 2): ``mean_k ||Sigma_k||_F`` (``'fro'``, the paper's); ``'fro_sq'``
  (the authors' code) and ``'spectral'`` (largest eigenvalue) as options.
* :func:`repulsion_loss` (Eq. 3): mean over pairs ``k < k'`` of ``-log sigmoid(d / tau)``
  (``'log'``, the paper's); ``'sigmoid'`` = ``1 - sigmoid(d / tau)`` (the authors' code).

Frame of the regularisers (the paper leaves it open, §2.3): keypoints and covariances are
expressed in KeyMorph's normalised frame, ``[-1, 1]`` across the input grid's field of view
(``coordinate / (half the field of view)``). There ``tau = 0.1`` is 5 % of the field of view
(12 mm on a 240 mm grid), the scale at which repulsion acts, and the paper's weights
``lambda_KL, lambda_var, lambda_rep = 1, 1e-2, 1e-3`` are our defaults. :func:`to_normalised`
does the conversion.

Statistics for the ablation (paper Table 1, §7): :func:`heatmap_statistics` returns the sum
over keypoints of the KL (the paper's reported metric), the mean spectral norm of the
covariances (mm^2) and the keypoint spread (mean pairwise distance and RMS distance to the
centroid, mm).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    'soft_dice_loss', 'mse_loss', 'lncc_loss', 'mutual_information_loss', 'heatmap_moments',
    'kl_gaussian_loss', 'kl_per_keypoint', 'variance_loss', 'repulsion_loss',
    'heatmap_statistics', 'keypoint_spread', 'to_normalised',
]


# ---------------------------------------------------------------------------- similarities
def soft_dice_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-5,
                   ignore_background: bool = True, present_only: bool = True) -> torch.Tensor:
    """``1 - mean soft Dice`` between probability maps ``pred``, ``target`` ``[B, C, ...]``
    (e.g. one-hot moving labels warped bilinearly, and fixed one-hot labels).

    Dice per channel ``2 sum(p t) / (sum p + sum t)``, averaged over channels (without channel 0
    when ``ignore_background``) that occur in ``target`` (``present_only``) and over the batch."""
    dims = tuple(range(2, pred.ndim))
    inter = (pred * target).sum(dims)
    denom = pred.sum(dims) + target.sum(dims)
    dice = (2 * inter + eps) / (denom + eps)  # [B, C]
    keep = torch.ones_like(dice, dtype=torch.bool)
    if ignore_background:
        keep[:, 0] = False
    if present_only:
        keep &= target.sum(dims) > 0.5
    if not keep.any():
        return pred.sum() * 0
    return 1 - dice[keep].mean()


def mse_loss(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared intensity difference (inside ``mask`` when given)."""
    diff = (a - b) ** 2
    if mask is None:
        return diff.mean()
    m = mask.to(diff.dtype).expand_as(diff)
    return (diff * m).sum() / m.sum().clamp_min(1.0)


def lncc_loss(a: torch.Tensor, b: torch.Tensor, window: int = 9, eps: float = 1e-5,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """``1 - mean local squared normalised cross-correlation`` (cubic ``window`` voxels) of
    ``[B, 1, D, H, W]`` images (VoxelMorph's form: ``cc = cov^2 / (var_a var_b)``)."""
    pad = window // 2

    def box(x):
        return F.avg_pool3d(x, window, stride=1, padding=pad, count_include_pad=False)

    ma, mb = box(a), box(b)
    va = (box(a * a) - ma * ma).clamp_min(0)
    vb = (box(b * b) - mb * mb).clamp_min(0)
    cov = box(a * b) - ma * mb
    cc = cov * cov / (va * vb + eps)
    if mask is None:
        return 1 - cc.mean()
    m = mask.to(cc.dtype).expand_as(cc)
    return 1 - (cc * m).sum() / m.sum().clamp_min(1.0)


def mutual_information_loss(a: torch.Tensor, b: torch.Tensor, bins: int = 32,
                            sigma: float | None = None, mask: torch.Tensor | None = None,
                            max_voxels: int = 100_000, normalised: bool = True) -> torch.Tensor:
    """Negative (normalised) mutual information of two images with intensities in [0, 1],
    from a joint histogram with Gaussian Parzen windows (differentiable in both images).

    ``normalised``: ``-(H(a) + H(b)) / H(a, b)`` (in [-2, -1]); else ``-MI`` in nats. Voxels
    (inside ``mask`` if given) are subsampled on a regular stride to ``max_voxels``."""
    x, y = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    if mask is not None:
        keep = mask.reshape(mask.shape[0], -1) > 0.5
    else:
        keep = torch.ones_like(x, dtype=torch.bool)
    losses = []
    centres = torch.linspace(0, 1, bins, device=a.device, dtype=a.dtype)
    sig = sigma if sigma is not None else 0.5 / (bins - 1) * 2
    for i in range(x.shape[0]):
        xi, yi = x[i][keep[i]], y[i][keep[i]]
        if xi.numel() > max_voxels:
            step = int(math.ceil(xi.numel() / max_voxels))
            xi, yi = xi[::step], yi[::step]
        wa = torch.exp(-0.5 * ((xi[:, None] - centres) / sig) ** 2)
        wb = torch.exp(-0.5 * ((yi[:, None] - centres) / sig) ** 2)
        wa = wa / wa.sum(1, keepdim=True).clamp_min(1e-12)
        wb = wb / wb.sum(1, keepdim=True).clamp_min(1e-12)
        joint = wa.T @ wb / max(xi.numel(), 1)
        pa, pb = joint.sum(1), joint.sum(0)
        h_ab = -(joint * torch.log(joint + 1e-12)).sum()
        h_a = -(pa * torch.log(pa + 1e-12)).sum()
        h_b = -(pb * torch.log(pb + 1e-12)).sum()
        losses.append(-(h_a + h_b) / h_ab if normalised else -(h_a + h_b - h_ab))
    return torch.stack(losses).mean()


# ---------------------------------------------------------------------------- heatmap moments
def _cell_coords(shape, stride: float, device, dtype) -> list[torch.Tensor]:
    return [torch.arange(n, device=device, dtype=dtype) * stride + (stride - 1) / 2 for n in shape]


def heatmap_moments(heatmaps: torch.Tensor, stride: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[B, N, 3]`` and covariance ``[B, N, 3, 3]`` of normalised heatmaps
    ``[B, N, d, h, w]`` in input-grid voxels (cells placed as in
    :func:`~.network.center_of_mass`)."""
    b, n = heatmaps.shape[:2]
    shape = heatmaps.shape[2:]
    ax = _cell_coords(shape, stride, heatmaps.device, heatmaps.dtype)
    grid = torch.stack(torch.meshgrid(*ax, indexing='ij'), -1).reshape(-1, 3)  # [V, 3]
    p = heatmaps.reshape(b, n, -1)
    mu = p @ grid  # [B, N, 3]
    second = torch.einsum('bnv,vi,vj->bnij', p, grid, grid)
    cov = second - mu[..., :, None] * mu[..., None, :]
    return mu, 0.5 * (cov + cov.transpose(-1, -2))


def to_normalised(points_vox: torch.Tensor, shape) -> torch.Tensor:
    """Input-grid voxel coordinates -> KeyMorph's normalised frame ([-1, 1] across the field
    of view, voxel centres as ``align_corners=False``)."""
    n = torch.as_tensor(shape, dtype=points_vox.dtype, device=points_vox.device)
    return (2 * points_vox + 1) / n - 1


def kl_per_keypoint(heatmaps: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """``KL(F_k || G_k)`` ``[B, N]`` (nats) of each normalised heatmap to the Gaussian with its
    own mean and covariance, evaluated on the heatmap grid and renormalised over it (cell
    units; the KL does not depend on the frame). The Gaussian's moments carry no gradient."""
    b, n = heatmaps.shape[:2]
    shape = heatmaps.shape[2:]
    p = heatmaps.reshape(b, n, -1)
    with torch.no_grad():
        mu, cov = heatmap_moments(heatmaps.detach().double(), 1)
        cov = cov + ridge * torch.eye(3, dtype=cov.dtype, device=cov.device)
        ax = _cell_coords(shape, 1, heatmaps.device, torch.float64)
        grid = torch.stack(torch.meshgrid(*ax, indexing='ij'), -1).reshape(-1, 3)
        prec = torch.linalg.inv(cov)  # [B, N, 3, 3]
        d = grid[None, None] - mu[:, :, None]  # [B, N, V, 3]
        maha = torch.einsum('bnvi,bnij,bnvj->bnv', d, prec, d)
        logg = (-0.5 * maha).clamp(-80, 0)
        logg = logg - torch.logsumexp(logg, -1, keepdim=True)  # renormalised on the grid
        logg = logg.to(heatmaps.dtype)
    return (p * (torch.log(p + 1e-24) - logg)).sum(-1)


def kl_gaussian_loss(heatmaps: torch.Tensor) -> torch.Tensor:
    """L_KL: mean over keypoints and batch of :func:`kl_per_keypoint`."""
    return kl_per_keypoint(heatmaps).mean()


def variance_loss(heatmaps: torch.Tensor, stride: int, shape, form: str = 'fro') -> torch.Tensor:
    """L_var: mean over keypoints of a norm of each covariance, in the normalised frame
    (``shape``: input grid). ``form``: ``'fro'`` (paper), ``'fro_sq'`` (authors' code),
    ``'spectral'`` (largest eigenvalue)."""
    _, cov = heatmap_moments(heatmaps, stride)
    scale = 2.0 / torch.as_tensor(shape, dtype=cov.dtype, device=cov.device)  # voxel -> normalised
    cov = cov * scale[:, None] * scale[None, :]
    if form == 'fro':
        val = torch.sqrt((cov ** 2).sum((-1, -2)) + 1e-12)
    elif form == 'fro_sq':
        val = (cov ** 2).sum((-1, -2))
    elif form == 'spectral':
        val = torch.linalg.eigvalsh(cov)[..., -1]
    else:
        raise ValueError(f'unknown variance-loss form {form!r}')
    return val.mean()


def repulsion_loss(points: torch.Tensor, tau: float = 0.1, form: str = 'log') -> torch.Tensor:
    """L_rep: mean over pairs ``k < k'`` of ``-log sigmoid(d_kk' / tau)`` (``'log'``, paper) or
    ``1 - sigmoid(d / tau)`` (``'sigmoid'``, authors' code), for ``points [B, N, 3]`` in the
    frame of ``tau`` (normalised frame in training: see the module docstring)."""
    n = points.shape[1]
    diff = points[:, :, None] - points[:, None]
    d = torch.sqrt((diff ** 2).sum(-1) + 1e-12)
    iu = torch.triu_indices(n, n, 1, device=points.device)
    d = d[:, iu[0], iu[1]]
    if form == 'log':
        val = F.softplus(-d / tau)
    elif form == 'sigmoid':
        val = torch.sigmoid(-d / tau)
    else:
        raise ValueError(f'unknown repulsion form {form!r}')
    return val.mean()


# ---------------------------------------------------------------------------- statistics
def keypoint_spread(points_mm: torch.Tensor) -> dict[str, float]:
    """Mean pairwise distance and RMS distance to the centroid (mm) of ``[B, N, 3]`` points,
    averaged over the batch."""
    pts = points_mm.detach().double()
    d = torch.cdist(pts, pts)
    n = pts.shape[1]
    pair = d.sum((-1, -2)) / max(n * (n - 1), 1)
    rms = ((pts - pts.mean(1, keepdim=True)) ** 2).sum(-1).mean(-1).sqrt()
    return {'spread_mm': float(pair.mean()), 'rms_mm': float(rms.mean())}


@torch.no_grad()
def heatmap_statistics(heatmaps: torch.Tensor, stride: int, res_mm: float) -> dict[str, float]:
    """Interpretability measures of Billot et al. (Table 1) for ``[B, N, d, h, w]`` heatmaps:
    ``kl_sum`` (sum over keypoints of KL, nats, the paper's metric), ``kl_mean`` (per keypoint),
    ``spectral_mm2`` (mean largest eigenvalue of the covariances, mm^2), and the spread of the
    keypoints (``spread_mm``: mean pairwise distance; ``rms_mm``: RMS distance to centroid)."""
    kl = kl_per_keypoint(heatmaps.float())
    mu, cov = heatmap_moments(heatmaps.double(), stride)
    spec = torch.linalg.eigvalsh(cov)[..., -1] * res_mm ** 2
    out = {'kl_sum': float(kl.sum(-1).mean()), 'kl_mean': float(kl.mean()),
           'spectral_mm2': float(spec.mean())}
    out.update(keypoint_spread(mu * res_mm))
    return out
