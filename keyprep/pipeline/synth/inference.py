"""Sliding-window inference of the label network (the one path that training validates).

The U-Net normalises its features per instance (InstanceNorm), so its output depends on the
field of view it sees: trained on 64³ crops (2 mm, mostly brain), it must be applied to crops
of the same size. A single pass over a whole head (about 19 % brain, plus scalp and air) cost
0.16 mean structure Dice on held-out volumes (``training_diagnosis.md`` F1).

:func:`sliding_window_probabilities` tiles the network grid with windows of the training crop
size and a fractional ``overlap``, runs the tiles in small batches, and blends the class
probabilities with a Gaussian importance map (``sigma = sigma_scale * roi``, as MONAI's
``sliding_window_inference`` with ``mode='gaussian'``) so that tile borders, where the network
sees the least context, count least. Tiles with no head in them (almost every voxel at the
image's background level) are not run: they are background, so air never produces labels.

Pure torch, device-agnostic; no randomness.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

__all__ = ['tile_starts', 'gaussian_importance', 'sliding_window_probabilities', 'head_fraction']


def tile_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Start indices of windows of ``roi`` voxels covering ``size`` voxels with at least
    ``overlap`` (fraction) between neighbours; the last window ends at ``size``.

    >>> tile_starts(128, 64, 0.5)
    [0, 32, 64]
    >>> tile_starts(104, 64, 0.5)
    [0, 20, 40]
    >>> tile_starts(40, 64, 0.5)
    [0]
    """
    if size <= roi:
        return [0]
    stride = max(1, int(round(roi * (1 - overlap))))
    n = -(-(size - roi) // stride) + 1  # ceil
    if n == 1:
        return [0]
    # spread the windows evenly between 0 and size - roi
    return [int(round(i * (size - roi) / (n - 1))) for i in range(n)]


def gaussian_importance(roi: Sequence[int], sigma_scale: float = 0.125,
                        device: torch.device | str = 'cpu') -> torch.Tensor:
    """Separable Gaussian weight map of shape ``roi`` (maximum 1, floor 1e-3)."""
    w = None
    for n in roi:
        x = torch.arange(n, dtype=torch.float32, device=device) - (n - 1) / 2
        g = torch.exp(-0.5 * (x / (sigma_scale * n)) ** 2)
        w = g if w is None else w[..., None] * g
    w = w / w.max()
    return w.clamp_min(1e-3)


def head_fraction(x: torch.Tensor, background: float, threshold: float = 0.05) -> float:
    """Fraction of voxels of ``x`` brighter than ``background + threshold`` (intensities in
    [0, 1])."""
    return float((x > background + threshold).float().mean())


@torch.no_grad()
def sliding_window_probabilities(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                                 n_classes: int, roi: Sequence[int] = (64, 64, 64),
                                 overlap: float = 0.5, sigma_scale: float = 0.125,
                                 batch_size: int = 4, min_head_fraction: float = 0.01,
                                 background_class: int = 0, region: torch.Tensor | None = None
                                 ) -> tuple[torch.Tensor, dict]:
    """Class probabilities ``[1, C, D, H, W]`` of a normalised volume ``x [1, 1, D, H, W]``.

    ``forward`` maps a batch ``[B, 1, *roi]`` to probabilities ``[B, C, *roi]``. The volume is
    padded with its minimum (the background) to at least ``roi``. A tile whose fraction of
    voxels above background (:func:`head_fraction`) is below ``min_head_fraction`` is skipped
    and counts as background; so does every voxel that no run tile covers. With ``region``
    (bool ``[D, H, W]``, e.g. near a reference brain mask), tiles without a region voxel are
    skipped too and every voxel outside it is background. Returns the probabilities and
    ``{'tiles': run, 'skipped': skipped}``.
    """
    if x.ndim != 5 or x.shape[:2] != (1, 1):
        raise ValueError(f'expected a [1, 1, D, H, W] volume, got {tuple(x.shape)}')
    shape = tuple(int(s) for s in x.shape[2:])
    roi = tuple(int(r) for r in roi)
    bg = float(x.min())
    pads = [max(0, r - s) for r, s in zip(roi, shape)]
    if any(pads):
        pad = []
        for p in reversed(pads):
            pad += [p // 2, p - p // 2]
        x = torch.nn.functional.pad(x, pad, value=bg)
        if region is not None:
            region = torch.nn.functional.pad(region[None, None].float(), pad, value=0.0)[0, 0] > 0.5
    full = tuple(int(s) for s in x.shape[2:])
    dev = x.device
    weight = gaussian_importance(roi, sigma_scale, dev)
    acc = torch.zeros((1, n_classes) + full, dtype=torch.float32, device=dev)
    norm = torch.zeros(full, dtype=torch.float32, device=dev)
    starts = [(i, j, k) for i in tile_starts(full[0], roi[0], overlap)
              for j in tile_starts(full[1], roi[1], overlap)
              for k in tile_starts(full[2], roi[2], overlap)]
    run, skipped = [], 0
    for s in starts:
        tile = x[:, :, s[0]:s[0] + roi[0], s[1]:s[1] + roi[1], s[2]:s[2] + roi[2]]
        if head_fraction(tile, bg) < min_head_fraction or (
                region is not None and not bool(region[s[0]:s[0] + roi[0], s[1]:s[1] + roi[1],
                                                       s[2]:s[2] + roi[2]].any())):
            skipped += 1
        else:
            run.append(s)
    for b in range(0, len(run), batch_size):
        chunk = run[b:b + batch_size]
        tiles = torch.cat([x[:, :, i:i + roi[0], j:j + roi[1], k:k + roi[2]] for i, j, k in chunk])
        probs = forward(tiles).float()
        for (i, j, k), p in zip(chunk, probs):
            acc[0, :, i:i + roi[0], j:j + roi[1], k:k + roi[2]] += p * weight
            norm[i:i + roi[0], j:j + roi[1], k:k + roi[2]] += weight
    covered = norm > 0
    acc /= norm.clamp_min(1e-12)
    if region is not None:
        covered &= region.to(dev)
        acc[0][:, ~covered] = 0.0
    acc[0, background_class][~covered] = 1.0
    if any(pads):
        sl = tuple(slice(p // 2, p // 2 + s) for p, s in zip(pads, shape))
        acc = acc[(slice(None), slice(None)) + sl]
    return acc, {'tiles': len(run), 'skipped': skipped}
