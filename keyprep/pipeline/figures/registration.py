"""Reportlets of registration results: target edges over the moving image, before and after,
and several results of one engine side by side."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ._common import (
    EDGE_COLOR, _BG, _FG, _VIEW_AXES, PathLike, _annotate, _contour, _foreground, _load,
    _mosaic, _otsu3, _Panel, _panels, _save, _show_gray, _to_grid, _Volume, _window,
)

__all__ = ['plot_registration', 'plot_variants']


def _target_edges(tgt: _Volume, extent_mask: np.ndarray, row: list[_Panel]
                  ) -> tuple[float | None, list[tuple[np.ndarray | None, np.ndarray]]]:
    """Edges of the target, once per panel: the upper class boundary inside the brain (its
    level, and the lightly smoothed slice) and the smoothed outline of the brain (level 0.5)."""
    from scipy import ndimage as ndi

    level = _otsu3(tgt.data[extent_mask])[1] if extent_mask.any() else None
    outline = extent_mask.astype(np.float32)
    edges = []
    for panel in row:
        _, h, v, _ = _VIEW_AXES[panel.view]
        sigma = (0.8 / panel.zooms[v], 0.8 / panel.zooms[h])
        t2 = ndi.gaussian_filter(panel.take(tgt.data).astype(np.float32), sigma)
        e2 = panel.take(extent_mask)
        if level is not None and e2.any():
            t2 = np.where(ndi.binary_erosion(e2, iterations=1), t2, np.float32(level - 1.0))
        o2 = ndi.gaussian_filter(panel.take(outline), sigma)
        edges.append((t2 if level is not None and e2.any() else None, o2))
    return level, edges


def plot_registration(target: PathLike, moving_before: PathLike, warped: PathLike,
                      out_png: PathLike, target_mask: PathLike | None = None,
                      title: str | None = None, *, n_slices: int = 2,
                      views: Sequence[str] = ('sagittal', 'coronal', 'axial')) -> Path:
    """Moving image before and after registration, with the target's edges on top.

    Two rows, labelled ``before`` and ``after``, show the same slices (``n_slices`` per
    view, views side by side). The edges are contour lines of the (lightly smoothed)
    target: the boundary between its two brightest intensity classes inside the brain
    (three-class Otsu: the white-matter surface of a T1w, the CSF boundary of a T2w) and
    the outline of the brain (``target_mask``, or the target's foreground without it).

    Parameters
    ----------
    target : path-like
        Target (fixed) image; defines the grid and the edges.
    moving_before : path-like
        Moving image already on the target grid (resampled by identity in world
        coordinates); resampled here (linear) if it is not.
    warped : path-like
        Moving image after registration, on the target grid (likewise resampled if not).
    out_png : path-like
        Output PNG file.
    target_mask : path-like, optional
        Brain mask of the target: slices span its extent and its outline is drawn. Without
        it, the extent is that of the target's foreground.
    title : str, optional
        Text at the top left of the figure.
    n_slices : int
        Slices per view.
    views : sequence of str
        Views, left to right.

    Returns
    -------
    pathlib.Path
        ``out_png``.
    """
    tgt = _load(target)
    before = _to_grid(_load(moving_before), tgt, order=1)
    after = _to_grid(_load(warped), tgt, order=1)
    msk = _to_grid(_load(target_mask), tgt) > 0 if target_mask is not None else None
    has_mask = msk is not None and bool(msk.any())
    extent_mask = msk if has_mask else _foreground(tgt.data)
    panels = _panels(extent_mask, tgt.zooms, n_slices, views, robust=not has_mask)
    row = [p for v in views for p in panels[v]]
    layout = _mosaic([row, row], title=title, row_labels=('before', 'after'))

    level, edges = _target_edges(tgt, extent_mask, row)

    for data, row_axes in ((before, layout.axes[0]), (after, layout.axes[1])):
        inside = extent_mask & (data != 0)
        window = _window(data, inside if inside.sum() > 100 else None)
        for k, (panel, ax, (t2, o2)) in enumerate(zip(row, row_axes, edges)):
            _show_gray(ax, panel, data, window)
            for field, lev in ((t2, level), (o2, 0.5)):
                if field is not None and lev is not None:
                    _contour(ax, panel, field, lev, EDGE_COLOR, 0.7)
            first_of_view = k == 0 or row[k - 1].view != panel.view
            _annotate(ax, panel, tgt.affine, first_of_view)
    return _save(layout.fig, out_png)



def plot_variants(target: PathLike, warped: Sequence[PathLike], names: Sequence[str],
                  out_png: PathLike, target_mask: PathLike | None = None,
                  title: str | None = None, *, prefix: str = '',
                  views: Sequence[str] = ('sagittal', 'coronal', 'axial')) -> Path:
    """Several registrations of one image side by side, with the target's edges on top.

    One column per registration (e.g. the thin-plate splines of every lambda from one
    keypoint detection), one row per view (the middle slice of the target brain's extent);
    each panel shows the warped moving image on the target grid with the target's edges
    (as in :func:`plot_registration`). Columns are labelled with the names, without
    ``prefix`` where it leaves something.

    Parameters
    ----------
    target : path-like
        Target (fixed) image; defines the grid and the edges.
    warped : sequence of path-like
        Moving images after each registration (resampled onto the target grid if needed).
    names : sequence of str
        One name per warped image.
    out_png : path-like
        Output PNG file.
    target_mask : path-like, optional
        Brain mask of the target (extent and outline).
    title : str, optional
        Text at the top left of the figure.
    prefix : str
        Removed from the column labels (e.g. the engine's name).
    views : sequence of str
        Rows.

    Returns
    -------
    pathlib.Path
        ``out_png``.
    """
    from matplotlib import patheffects

    if len(warped) != len(names) or not names:
        raise ValueError('one name per warped image is needed')
    tgt = _load(target)
    msk = _to_grid(_load(target_mask), tgt) > 0 if target_mask is not None else None
    has_mask = msk is not None and bool(msk.any())
    extent_mask = msk if has_mask else _foreground(tgt.data)
    panels = _panels(extent_mask, tgt.zooms, 1, views, robust=not has_mask)
    per_view = [panels[v][0] for v in views]
    level, edges = _target_edges(tgt, extent_mask, per_view)
    rows = [[panel] * len(names) for panel in per_view]
    layout = _mosaic(rows, title=title, row_labels=list(views))
    labels = [n[len(prefix):] if prefix and n.startswith(prefix) and n != prefix else n
              for n in names]
    datas = [_to_grid(_load(w), tgt, order=1) for w in warped]
    windows = [_window(d, (extent_mask & (d != 0)) if (extent_mask & (d != 0)).sum() > 100
                       else None) for d in datas]
    for r, (panel, (t2, o2), row_axes) in enumerate(zip(per_view, edges, layout.axes)):
        for c, (ax, data, window) in enumerate(zip(row_axes, datas, windows)):
            _show_gray(ax, panel, data, window)
            for field, lev in ((t2, level), (o2, 0.5)):
                if field is not None and lev is not None:
                    _contour(ax, panel, field, lev, EDGE_COLOR, 0.7)
            if r == 0:
                ax.text(0.5, 0.97, labels[c], transform=ax.transAxes, fontsize=9,
                        ha='center', va='top', color=_FG, fontweight='bold',
                        path_effects=[patheffects.withStroke(linewidth=2.5, foreground=_BG)])
            _annotate(ax, panel, tgt.affine, c == 0)
    return _save(layout.fig, out_png)
