"""Reportlet of a Jacobian-determinant map."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._common import (
    _BG, _DPI, _FG, _VIEW_AXES, FOLDING_COLOR, VIEWS, PathLike, _annotate, _footer_axes,
    _foreground, _load, _mosaic, _panels, _save, _setup_matplotlib, _show_gray, _to_grid,
    _window,
)

__all__ = ['linear_jacobian_text', 'plot_jacobian']

#: Largest relative spread of J inside the mask for which the map counts as one constant.
CONSTANT_RTOL = 1e-5


def linear_jacobian_text(det: float) -> str:
    """What the one Jacobian determinant of a linear transform means, in words."""
    if abs(det - 1.0) < 5e-4:
        what = ('volumes are kept: a rigid motion (rotation and translation), or scalings '
                'that cancel')
    else:
        change = abs(det - 1.0) * 100
        what = (f'every region of the target corresponds to a region {change:.1f} % '
                f'{"larger" if det > 1 else "smaller"} in the image (the image\'s brain is '
                f'{"larger" if det > 1 else "smaller"} than the target\'s by that much, in '
                'volume)')
    return (f'Jacobian determinant J = {det:.4f} everywhere: the transform is linear, so it '
            f'scales every volume by the same factor and no map is drawn; {what}.')


def plot_jacobian(jacobian: PathLike, out_png: PathLike, mask: PathLike | None = None,
                  background: PathLike | None = None, title: str | None = None,
                  *, n_slices: int = 7) -> Path:
    """Log2 of a Jacobian determinant map, with folding voxels highlighted.

    ``log2 J`` is shown with a diverging colour map (``RdBu_r``) centred at 0 (no volume
    change) and clipped at +-1 (halving and doubling of volume); the colour bar is
    labelled in values of J. Voxels with ``J <= 0`` (folding) are drawn in
    :data:`FOLDING_COLOR`; so that isolated folds are not missed between the displayed
    slices, the folding voxels of the whole slab that a slice represents (half the distance
    to its neighbours on each side) are projected onto it and drawn at least 3 px wide.

    Parameters
    ----------
    jacobian : path-like
        Jacobian determinant map (NIfTI).
    out_png : path-like
        Output PNG file.
    mask : path-like, optional
        Brain mask: the map is shown (and folding counted) inside it only; resampled onto
        the Jacobian's grid if needed.
    background : path-like, optional
        Anatomical image shown in gray under a semi-transparent map.
    title : str, optional
        Text at the top left of the figure.
    n_slices : int
        Slices per row (three rows: axial, coronal, sagittal).

    Returns
    -------
    pathlib.Path
        ``out_png``. When J is one constant inside the mask (a linear transform: relative
        spread at most :data:`CONSTANT_RTOL`), a mosaic would be of one colour: a short
        figure states the determinant and its meaning instead
        (:func:`linear_jacobian_text`).
    """
    from matplotlib.colors import ListedColormap, Normalize
    from matplotlib.cm import ScalarMappable
    from matplotlib.patches import Patch

    jac = _load(jacobian)
    j = jac.data
    msk = _to_grid(_load(mask), jac) > 0 if mask is not None else None
    bg = _to_grid(_load(background), jac, order=1) if background is not None else None
    if msk is not None and msk.any():
        region, robust = msk, False
    elif bg is not None:
        region, robust = _foreground(bg), True
    else:
        region, robust = np.ones(j.shape, dtype=bool), False
    panels = _panels(region, jac.zooms, n_slices, VIEWS, robust=robust)
    layout = _mosaic([panels[v] for v in VIEWS], title=title, footer_in=0.8)

    valid = region if msk is not None and msk.any() else np.ones(j.shape, dtype=bool)
    values = j[valid]
    if values.size and np.ptp(values) <= CONSTANT_RTOL * max(1.0, float(np.abs(values).max())):
        return _plot_constant(float(np.mean(values)), out_png, title)
    folding = valid & (j <= 0)
    with np.errstate(divide='ignore', invalid='ignore'):
        logj = np.where(j > 0, np.log2(np.where(j > 0, j, 1.0)), 0.0).astype(np.float32)
    norm = Normalize(vmin=-1.0, vmax=1.0)
    cmap = 'RdBu_r'
    fold_cmap = ListedColormap([FOLDING_COLOR])
    window = _window(bg) if bg is not None else None
    for view, row_axes in zip(VIEWS, layout.axes):
        row_panels = panels[view]
        idx = [p.index for p in row_panels]
        spacing = int(np.max(np.diff(idx))) if len(idx) > 1 else 1
        half = max(spacing // 2, 0)
        for k, (panel, ax) in enumerate(zip(row_panels, row_axes)):
            if bg is not None:
                _show_gray(ax, panel, bg, window)  # type: ignore[arg-type]
            show = panel.take(valid) & ~panel.take(folding)
            ax.imshow(np.ma.masked_where(~show, panel.take(logj)), cmap=cmap, norm=norm,
                      extent=panel.extent, origin='lower', aspect='auto',
                      interpolation='nearest', alpha=0.8 if bg is not None else 1.0)
            f2 = panel.slab(folding, half)
            if f2.any():
                ax.imshow(np.ma.masked_where(~f2, f2.astype(np.float32)), cmap=fold_cmap,
                          vmin=0, vmax=1, extent=panel.extent, origin='lower', aspect='auto',
                          interpolation='nearest')
                # markers keep single voxels visible after downsampling
                rows_, cols_ = np.nonzero(f2)
                if rows_.size <= 5000:
                    left, _, bottom, _ = panel.extent
                    _, h, v, _ = _VIEW_AXES[view]
                    xs = left + (cols_ + 0.5) * panel.zooms[h]
                    ys = bottom + (rows_ + 0.5) * panel.zooms[v]
                    ax.scatter(xs, ys, s=6, marker='s', c=FOLDING_COLOR, linewidths=0)
            _annotate(ax, panel, jac.affine, k == 0)

    # colour bar (J on a log2 axis) and folding legend in the footer
    cax = _footer_axes(layout, 0.3, 0.4)
    cbar = layout.fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax,
                               orientation='horizontal', extend='both')
    ticks = [-1.0, -0.5, 0.0, 0.5, 1.0]
    cbar.set_ticks(ticks)
    cbar.set_ticklabels(['0.5', '0.71', '1', '1.41', '2'])
    cbar.ax.tick_params(colors=_FG, labelsize=8, length=3)
    cbar.outline.set_edgecolor(_FG)
    cbar.set_label('Jacobian determinant J (log scale; <1 shrinks, >1 expands)', color=_FG,
                   fontsize=9)
    n_fold, n_valid = int(folding.sum()), int(valid.sum())
    frac = n_fold / n_valid if n_valid else 0.0
    label = f'folding (J \u2264 0): {n_fold} voxel{"" if n_fold == 1 else "s"} ({frac:.3%})'
    fl, fb, fw, fh = layout.footer  # type: ignore[misc]
    layout.fig.legend(handles=[Patch(facecolor=FOLDING_COLOR, edgecolor='none', label=label)],
                      loc='center left', bbox_to_anchor=(fl + 0.74 * fw, fb + 0.67 * fh),
                      frameon=False, labelcolor=_FG, fontsize=9, handlelength=1.2)
    return _save(layout.fig, out_png)


def _plot_constant(det: float, out_png: PathLike, title: str | None) -> Path:
    """A one-line figure: the determinant of a linear transform, in words."""
    import textwrap

    _setup_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lines = textwrap.wrap(linear_jacobian_text(det), 150)
    height = 0.3 * (len(lines) + (1 if title else 0)) + 0.25
    fig = Figure(figsize=(14.0, height), dpi=_DPI, facecolor=_BG)
    FigureCanvasAgg(fig)
    text = ([title] if title else []) + lines
    fig.text(0.01, 1 - 0.12 / height, '\n'.join(text), ha='left', va='top', color=_FG,
             fontsize=11, linespacing=1.5)
    return _save(fig, out_png)
