"""Image similarities shared by the registration engines (pure torch, any device)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ['box_mean', 'lncc']


def box_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    """Mean of ``x [B, C, D, H, W]`` over a ``window``-voxel cube around each voxel (same
    size output), as three separable 1-D averages; at the borders over the voxels inside the
    grid. Along an axis shorter than the window, the largest odd size that fits.

    Each 1-D average is a sum of ``window`` shifted views of the zero-padded tensor, divided
    by the count of voxels inside the grid: on CPU bit-identical, forward and backward, to
    ``avg_pool3d`` with ``count_include_pad=False`` (tested), and 2.4-5x faster with its
    gradient on one thread (5 channels on 20x25x22 to 80x100x88 grids)."""
    for axis in range(3):
        dim = 2 + axis
        size = x.shape[dim]
        k = min(window, size if size % 2 else size - 1)
        if k <= 1:
            continue
        r = k // 2
        pad = [0] * 6  # F.pad's order: last axis first
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        padded = F.pad(x, pad)
        total = padded.narrow(dim, 0, size)
        for j in range(1, k):
            total = total + padded.narrow(dim, j, size)
        i = torch.arange(size, device=x.device)
        count = (i + r).clamp(max=size - 1) - (i - r).clamp(min=0) + 1
        shape = [1] * x.dim()
        shape[dim] = size
        x = total / count.to(x.dtype).reshape(shape)
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
