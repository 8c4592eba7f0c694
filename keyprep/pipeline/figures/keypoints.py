"""Reportlet of the keypoints of two images (KeyMorph engines)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ._common import (
    _FG, _VIEW_AXES, PathLike, _annotate, _footer_axes, _foreground, _load, _mosaic, _panels,
    _save, _show_gray, _window,
)

__all__ = ['keypoint_colours', 'plot_keypoints']


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


def plot_keypoints(moving: PathLike, moving_keypoints: PathLike, fixed: PathLike,
                   fixed_keypoints: PathLike, out_png: PathLike, title: str | None = None,
                   *, labels: Sequence[str] = ('moving', 'target'),
                   views: Sequence[str] = ('sagittal', 'coronal', 'axial')) -> Path:
    """Keypoints of two images, coloured by index, projected onto three orthogonal slices.

    One row per image (``moving`` on top, ``fixed`` below), one slice per view through the
    middle of the image's foreground; every keypoint of the image is projected orthogonally
    onto each slice and drawn in the colour of its index (:func:`keypoint_colours`), so that
    corresponding keypoints of the two images have the same colour (marker size: the
    keypoint's weight relative to the mean). Slices are of the image in its closest canonical
    (RAS) orientation; keypoints are mapped to its voxels through its affine.

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

    Returns
    -------
    pathlib.Path
        ``out_png``. The footer holds a colour bar of the keypoint index.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap, Normalize

    from ..keymorph.keypoints import read_keypoints

    rows, vols, clouds = [], [], []
    n_max = 1
    for image, table in ((moving, moving_keypoints), (fixed, fixed_keypoints)):
        vol = _load(image)
        pts, weights, index = read_keypoints(table)
        n_max = max(n_max, int(index.max()) + 1 if index.size else 1)
        panels = _panels(_foreground(vol.data), vol.zooms, 1, views, robust=True)
        rows.append([panels[view][0] for view in views])
        vols.append(vol)
        inv = np.linalg.inv(vol.affine)
        clouds.append((pts @ inv[:3, :3].T + inv[:3, 3], weights, index))
    layout = _mosaic(rows, title=title, row_labels=labels, footer_in=0.7)
    for vol, row, row_axes, (vox, weights, index) in zip(vols, rows, layout.axes, clouds):
        window = _window(vol.data)
        colours = keypoint_colours(index)
        wmean = float(np.mean(weights)) if weights.size else 1.0
        sizes = 18.0 * np.clip(weights / max(wmean, 1e-9), 0.4, 2.5)
        for k, (panel, ax) in enumerate(zip(row, row_axes)):
            _, h, v, _ = _VIEW_AXES[panel.view]
            _show_gray(ax, panel, vol.data, window)
            ax.scatter(vox[:, h] * panel.zooms[h], vox[:, v] * panel.zooms[v], s=sizes,
                       c=colours, edgecolors='black', linewidths=0.5, zorder=3)
            _annotate(ax, panel, vol.affine, k == 0)
    cax = _footer_axes(layout, 0.25, 0.5)
    cmap = ListedColormap(keypoint_colours(np.arange(n_max)))
    cbar = layout.fig.colorbar(ScalarMappable(norm=Normalize(-0.5, n_max - 0.5), cmap=cmap),
                               cax=cax, orientation='horizontal')
    cbar.ax.tick_params(colors=_FG, labelsize=8, length=3)
    cbar.outline.set_edgecolor(_FG)
    cbar.set_label(f'keypoint index ({len(clouds[0][2])} keypoints, all projected onto each '
                   'slice; same colour = same keypoint; marker size: weight)', color=_FG,
                   fontsize=9)
    return _save(layout.fig, out_png)
