"""Image similarities shared by the registration engines (pure torch, any device)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ['box_mean', 'lncc']


def box_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    """Mean of ``x [B, C, D, H, W]`` over a ``window``-voxel cube around each voxel (same
    size output), as three separable 1-D averages; at the borders over the voxels inside the
    grid. Along an axis shorter than the window, the largest odd size that fits."""
    for axis in range(3):
        size = x.shape[2 + axis]
        k = min(window, size if size % 2 else size - 1)
        if k <= 1:
            continue
        kernel = tuple(k if a == axis else 1 for a in range(3))
        x = F.avg_pool3d(x, kernel, stride=1, padding=tuple(n // 2 for n in kernel),
                         count_include_pad=False)
    return x


def lncc(fixed: torch.Tensor, warped: torch.Tensor, window: int = 5,
         eps: float = 1e-5) -> torch.Tensor:
    """Local squared normalised cross-correlation ``[B, C, *grid]`` of two images
    ``[B, C, *grid]`` (channel by channel): ``cov^2 / (var_f var_w + eps)`` over a box of
    ``window`` voxels (odd; see :func:`box_mean`), VoxelMorph's and ANTs' squared form. In
    [0, 1) for any affine intensity relation with either sign; about 0 where either image is
    flat (background)."""
    if window < 1 or window % 2 == 0:
        raise ValueError(f'the LNCC window must be an odd number of voxels, not {window}')
    c = fixed.shape[1]
    means = box_mean(torch.cat([fixed, warped, fixed * fixed, warped * warped,
                                fixed * warped], 1), window)
    mf, mw, ff, ww, fw = means.split(c, 1)
    cov = fw - mf * mw
    var_f = (ff - mf * mf).clamp_min(0)
    var_w = (ww - mw * mw).clamp_min(0)
    return cov * cov / (var_f * var_w + eps)
