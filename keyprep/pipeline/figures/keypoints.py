"""Reportlet of the keypoints of two images (KeyMorph engines)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ._common import (
    _FG, _VIEW_AXES, PathLike, _annotate, _foreground, _load, _mosaic, _panels, _save,
    _show_gray, _window,
)

__all__ = ['OTHER_COLOUR', 'PAIR_COLOURS', 'keypoint_colours', 'plot_keypoints', 'select_pairs']


def keypoint_colours(index: np.ndarray) -> np.ndarray:
    """RGB colours ``(n, 3)`` of keypoint indices: golden-ratio hues, so that neighbouring
    indices differ and keypoint ``k`` has the same colour in every figure.

    >>> keypoint_colours(np.array([0, 1, 0])).shape
    (3, 3)
    """
    from matplotlib.colors import hsv_to_rgb

    idx = np.asarray(index, dtype=float)
    hues = (idx * 0.618033988749895) % 1.0
    sat = 0.6 + 0.35 * ((idx * 7) % 3) / 2
    return hsv_to_rgb(np.stack([hues, sat, np.full(idx.shape, 1.0)], axis=-1))


#: Colours of the numbered pairs of :func:`plot_keypoints` (distinct, none gray).
PAIR_COLOURS: tuple[str, ...] = ('#e6194b', '#3cb44b', '#ffe119', '#4363d8', '#f58231',
                                 '#911eb4', '#42d4f4', '#f032e6', '#bfef45', '#fabed4')
#: Colour of the keypoints that are not highlighted (small dots with a dark edge, visible on
#: dark and bright tissue).
OTHER_COLOUR = '#ffffff'


def select_pairs(fixed_points: np.ndarray, fixed_weights: np.ndarray, fixed_index: np.ndarray,
                 moving_index: np.ndarray, moving_weights: np.ndarray | None = None,
                 n_pairs: int = 8) -> np.ndarray:
    """Indices (keypoint numbers) of ``n_pairs`` corresponding keypoints to highlight.

    The candidates are the keypoints present in both tables whose weight (the product of
    their weights in the two images) is at least the median; of those, ``n_pairs`` spread
    over the target's cloud are kept (farthest-point sampling), in increasing order.

    >>> pts = np.array([[0, 0, 0], [50, 0, 0], [0, 50, 0], [1, 0, 0]], float)
    >>> select_pairs(pts, np.ones(4), np.arange(4), np.arange(4), n_pairs=3).tolist()
    [1, 2, 3]
    """
    from ..keymorph.keypoints import farthest_point_subset

    fixed_index = np.asarray(fixed_index, dtype=int)
    common = np.isin(fixed_index, np.asarray(moving_index, dtype=int))
    if not common.any() or n_pairs < 1:
        return np.zeros(0, dtype=int)
    weight = np.asarray(fixed_weights, dtype=float).copy()
    if moving_weights is not None:
        by_index = dict(zip(np.asarray(moving_index, dtype=int).tolist(),
                            np.asarray(moving_weights, dtype=float).tolist()))
        weight = weight * np.array([by_index.get(int(k), 0.0) for k in fixed_index])
    keep = common & (weight >= np.median(weight[common]))
    cand = np.flatnonzero(keep)
    chosen = cand[farthest_point_subset(np.asarray(fixed_points, float)[cand], n_pairs)]
    return np.sort(fixed_index[chosen])


def plot_keypoints(moving: PathLike, moving_keypoints: PathLike, fixed: PathLike,
                   fixed_keypoints: PathLike, out_png: PathLike, title: str | None = None,
                   *, labels: Sequence[str] = ('moving', 'target'),
                   views: Sequence[str] = ('sagittal', 'coronal', 'axial'),
                   n_pairs: int = 8) -> Path:
    """Keypoints of two images, with a few corresponding pairs numbered, on three slices.

    One row per image (``moving`` on top, ``fixed`` below), one slice per view through the
    middle of the image's foreground; every keypoint of the image is projected orthogonally
    onto each slice. ``n_pairs`` corresponding keypoints (:func:`select_pairs`: heavy ones,
    spread over the brain) are drawn large, each in its own colour
    (:data:`PAIR_COLOURS`) and with its number 1..n, identically in both rows, so that a
    reader can match them by eye: registration maps the point numbered k in the moving
    image onto the point numbered k in the target. The other keypoints are small white dots
    (:data:`OTHER_COLOUR`). Slices are of the image in its closest canonical (RAS)
    orientation; keypoints are mapped to its voxels through its affine.

    Parameters
    ----------
    moving, fixed : path-like
        The images (NIfTI; brains).
    moving_keypoints, fixed_keypoints : path-like
        Keypoint tables (TSV: ``x y z weight index``, world RAS mm of each image).
    out_png : path-like
        Output PNG file.
    title : str, optional
        Text at the top left of the figure.
    labels : sequence of str
        Row labels.
    views : sequence of str
        Projections, left to right.
    n_pairs : int
        Pairs to highlight (at most ``len(PAIR_COLOURS)``).

    Returns
    -------
    pathlib.Path
        ``out_png``. The footer says what the numbers and colours mean.
    """
    from matplotlib import patheffects

    from ..keymorph.keypoints import read_keypoints

    n_pairs = int(np.clip(n_pairs, 0, len(PAIR_COLOURS)))
    tables = [read_keypoints(moving_keypoints), read_keypoints(fixed_keypoints)]
    (_, mw, mi), (fp, fw, fi) = tables
    pairs = select_pairs(fp, fw, fi, mi, mw, n_pairs)
    number = {int(k): n for n, k in enumerate(pairs)}
    rows, vols, clouds = [], [], []
    for image, (pts, _, index) in zip((moving, fixed), tables):
        vol = _load(image)
        panels = _panels(_foreground(vol.data), vol.zooms, 1, views, robust=True)
        rows.append([panels[view][0] for view in views])
        vols.append(vol)
        inv = np.linalg.inv(vol.affine)
        clouds.append((pts @ inv[:3, :3].T + inv[:3, 3], index))
    layout = _mosaic(rows, title=title, row_labels=labels, footer_in=0.5)
    stroke = [patheffects.withStroke(linewidth=2.5, foreground='black')]
    for vol, row, row_axes, (vox, index) in zip(vols, rows, layout.axes, clouds):
        window = _window(vol.data)
        hot = np.array([int(k) in number for k in index], dtype=bool)
        for k, (panel, ax) in enumerate(zip(row, row_axes)):
            _, h, v, _ = _VIEW_AXES[panel.view]
            _show_gray(ax, panel, vol.data, window)
            xs, ys = vox[:, h] * panel.zooms[h], vox[:, v] * panel.zooms[v]
            ax.scatter(xs[~hot], ys[~hot], s=10, c=OTHER_COLOUR, edgecolors='#303030',
                       linewidths=0.6, alpha=0.85, zorder=3)
            for j in np.flatnonzero(hot):
                n = number[int(index[j])]
                ax.scatter([xs[j]], [ys[j]], s=95, c=PAIR_COLOURS[n], edgecolors='black',
                           linewidths=0.9, zorder=4)
                ax.annotate(str(n + 1), (xs[j], ys[j]), xytext=(6, 4),
                            textcoords='offset points', color=PAIR_COLOURS[n], fontsize=10,
                            fontweight='bold', path_effects=stroke, zorder=5)
            _annotate(ax, panel, vol.affine, k == 0)
    fl, fb, fw_, fh = layout.footer  # type: ignore[misc]
    layout.fig.text(fl + fw_ / 2, fb + fh / 2,
                    f'{len(pairs)} corresponding keypoints numbered 1-{len(pairs)}, same number '
                    'and colour in both rows (registration maps each onto its partner); white '
                    f'dots: the other {max(len(clouds[0][1]) - len(pairs), 0)}; all projected '
                    'onto each slice', ha='center', va='center', color=_FG, fontsize=10)
    return _save(layout.fig, out_png)
