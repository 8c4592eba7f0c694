"""Reportlets of one anatomical image: brain-mask contour and label overlays."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._common import (
    MASK_COLOR, VIEWS, _FG, PathLike, _annotate, _contour, _foreground, _load, _mosaic,
    _panels, _save, _show_gray, _to_grid, _window,
)

__all__ = ['plot_labels', 'plot_mask']


def plot_mask(image: PathLike, mask: PathLike, out_png: PathLike, title: str | None = None,
              *, n_slices: int = 7) -> Path:
    """Image in gray with the contour of a brain mask.

    Parameters
    ----------
    image : path-like
        Anatomical image (NIfTI).
    mask : path-like
        Brain mask (NIfTI, non-zero = brain); resampled onto ``image``'s grid if needed.
    out_png : path-like
        Output PNG file (parent folders are created).
    title : str, optional
        Text at the top left of the figure.
    n_slices : int
        Slices per row (three rows: axial, coronal, sagittal).

    Returns
    -------
    pathlib.Path
        ``out_png``.
    """
    img = _load(image)
    msk = _to_grid(_load(mask), img) > 0
    extent_mask = msk if msk.any() else _foreground(img.data)
    panels = _panels(extent_mask, img.zooms, n_slices, VIEWS, robust=not msk.any())
    window = _window(img.data)
    layout = _mosaic([panels[v] for v in VIEWS], title=title)
    mask_f = msk.astype(np.float32)
    for row_panels, row_axes in zip(panels.values(), layout.axes):
        for k, (panel, ax) in enumerate(zip(row_panels, row_axes)):
            _show_gray(ax, panel, img.data, window)
            _contour(ax, panel, panel.take(mask_f), 0.5, MASK_COLOR, 1.0)
            _annotate(ax, panel, img.affine, k == 0)
    return _save(layout.fig, out_png)


def _label_colours(labels: np.ndarray,
                   lut: dict[int, tuple[str, ...]] | None) -> tuple[np.ndarray, list[str]]:
    """RGB colours (n, 3) and names of ``labels`` (sorted, non-zero)."""
    from matplotlib import colormaps
    from matplotlib.colors import hsv_to_rgb, to_rgb

    n = len(labels)
    rgb = np.zeros((n, 3))
    names = []
    if n <= 20:
        base = colormaps['tab20' if n > 10 else 'tab10']
        default = [base(i % base.N)[:3] for i in range(n)]
    else:  # golden-ratio hues: deterministic and distinct for neighbouring labels
        hues = (np.arange(n) * 0.618033988749895) % 1.0
        sat = 0.55 + 0.35 * ((np.arange(n) * 7) % 3) / 2
        default = list(hsv_to_rgb(np.stack([hues, sat, np.full(n, 0.95)], axis=1)))
    for i, lab in enumerate(labels):
        entry = (lut or {}).get(int(lab))
        if entry:
            # (name, colour) or (name, abbreviation, colour): the colour is the last item
            rgb[i] = to_rgb(entry[-1])
            names.append(str(entry[0]))
        else:
            rgb[i] = default[i]
            names.append(f'label {int(lab)}')
    return rgb, names


def plot_labels(image: PathLike, labels: PathLike, out_png: PathLike,
                lut: dict[int, tuple[str, str]] | None = None, title: str | None = None,
                *, n_slices: int = 7, alpha: float = 0.5) -> Path:
    """Image in gray with a label map as a semi-transparent colour overlay.

    Parameters
    ----------
    image : path-like
        Anatomical image (NIfTI).
    labels : path-like
        Integer label map (NIfTI, 0 = background); resampled onto ``image``'s grid
        (nearest neighbour) if needed.
    out_png : path-like
        Output PNG file.
    lut : dict, optional
        Label index -> ``(name, '#rrggbb')``; ``(name, abbreviation, '#rrggbb')`` is also
        accepted (the colour is the last item). Labels missing from the LUT, or all labels
        without one, get deterministic colours (tab10/tab20, golden-ratio hues beyond 20).
    title : str, optional
        Text at the top left of the figure.
    n_slices : int
        Slices per row (three rows: axial, coronal, sagittal).
    alpha : float
        Opacity of the label colours.

    Returns
    -------
    pathlib.Path
        ``out_png``. A legend is drawn below the slices when there are at most 12 labels.
    """
    from matplotlib.patches import Patch

    img = _load(image)
    lab = _to_grid(_load(labels, dtype=np.int64), img, order=0)
    present = np.unique(lab[lab != 0])
    rgb, names = _label_colours(present, lut)
    if present.size:
        extent_mask, robust = lab != 0, False
    else:
        extent_mask, robust = _foreground(img.data), True
    panels = _panels(extent_mask, img.zooms, n_slices, VIEWS, robust=robust)
    legend = 0 < present.size <= 12
    layout = _mosaic([panels[v] for v in VIEWS], title=title, footer_in=0.4 if legend else 0)
    window = _window(img.data)
    for row_panels, row_axes in zip(panels.values(), layout.axes):
        for k, (panel, ax) in enumerate(zip(row_panels, row_axes)):
            _show_gray(ax, panel, img.data, window)
            l2 = panel.take(lab)
            inside = l2 != 0
            if inside.any():
                rgba = np.zeros(l2.shape + (4,), dtype=np.float32)
                idx = np.searchsorted(present, l2[inside])
                rgba[inside, :3] = rgb[idx]
                rgba[inside, 3] = alpha
                ax.imshow(rgba, extent=panel.extent, origin='lower', aspect='auto',
                          interpolation='nearest')
            _annotate(ax, panel, img.affine, k == 0)
    if legend:
        handles = [Patch(facecolor=c, edgecolor='none', label=nm) for c, nm in zip(rgb, names)]
        fl, fb, fw, fh = layout.footer  # type: ignore[misc]
        layout.fig.legend(handles=handles, loc='center', ncol=min(len(handles), 6),
                          bbox_to_anchor=(fl + fw / 2, fb + fh / 2), frameon=False,
                          labelcolor=_FG, fontsize=9, handlelength=1.2, columnspacing=1.5)
    return _save(layout.fig, out_png)
