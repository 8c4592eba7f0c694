"""Reportlets: PNG figures for the HTML QC reports, in the visual language of NiPreps.

Every ``plot_*`` function reads NIfTI files, writes one PNG and returns its path. Slice
figures have a black background, no axes, and mosaics of slices through the extent of the
brain (rows of axial, coronal and sagittal slices), about 1400 px wide at 100 dpi. Images
are reoriented to the closest canonical (RAS+) orientation on loading and displayed with
the aspect ratio of their voxel sizes, in neurological convention (left on the left of
axial and coronal slices, anterior on the right of sagittal slices). An overlay (mask,
labels) that is not on the grid of its background image is resampled onto it through the
affines (nearest neighbour).

Matplotlib is imported inside the functions (with the ``Agg`` backend) so that importing
this module stays light.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = [
    'EDGE_COLOR',
    'FOLDING_COLOR',
    'MASK_COLOR',
    'VIEWS',
    'keypoint_colours',
    'plot_group',
    'plot_jacobian',
    'plot_keypoints',
    'plot_labels',
    'plot_mask',
    'plot_registration',
    'plot_structure_dice',
    'plot_variants',
    'png_to_data_uri',
    'select_slices',
]

PathLike = str | os.PathLike

#: Slice orientations, in the order of the rows of the mosaics.
VIEWS: tuple[str, ...] = ('axial', 'coronal', 'sagittal')
#: Colour of the brain-mask contour (:func:`plot_mask`).
MASK_COLOR = '#ff3b30'
#: Colour of the target's edges (:func:`plot_registration`).
EDGE_COLOR = '#00ffff'
#: Colour of folding voxels, ``J <= 0`` (:func:`plot_jacobian`).
FOLDING_COLOR = '#ffff00'

# view -> (slicing axis, horizontal axis, vertical axis, letter of the slicing coordinate)
_VIEW_AXES: dict[str, tuple[int, int, int, str]] = {
    'sagittal': (0, 1, 2, 'x'),
    'coronal': (1, 0, 2, 'y'),
    'axial': (2, 0, 1, 'z'),
}
_DPI = 100
_WIDTH_IN = 14.0  # 1400 px
_GAP_IN = 0.03  # between panels
_MAX_ROW_IN = 3.2  # tallest row of panels
_MARGIN_MM = 8.0  # around the brain's bounding box
_BG = 'black'
_FG = '#e6e6e6'
_MAX_SAMPLES = 2_000_000  # values used for percentiles
_MAX_QUANT_ERROR = 48  # largest colour change (0-255) accepted from palette quantisation


# --------------------------------------------------------------------------------------------
# Loading and small numerical helpers
# --------------------------------------------------------------------------------------------
@dataclass
class _Volume:
    """A 3-D image in closest-canonical orientation."""

    data: np.ndarray
    affine: np.ndarray

    @property
    def zooms(self) -> tuple[float, float, float]:
        zooms = np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))
        return tuple(float(z) if z > 0 else 1.0 for z in zooms)  # type: ignore[return-value]


def _load(path: PathLike, dtype: Any = np.float32) -> _Volume:
    """Load a NIfTI file as a 3-D RAS+ volume (first volume of a 4-D image)."""
    import nibabel as nb

    img = nb.as_closest_canonical(nb.load(os.fspath(path)))
    data = np.asanyarray(img.dataobj)
    while data.ndim > 3:
        data = data[..., 0]
    if data.ndim < 3:
        data = data.reshape(data.shape + (1,) * (3 - data.ndim))
    data = np.asarray(data, dtype=np.float64 if dtype is np.int64 else dtype)
    data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    if dtype is np.int64:
        data = np.rint(data).astype(np.int64)
    return _Volume(np.ascontiguousarray(data), np.asarray(img.affine, dtype=np.float64))


def _to_grid(vol: _Volume, ref: _Volume, order: int = 0) -> np.ndarray:
    """``vol``'s data on ``ref``'s grid (identity in world coordinates)."""
    if vol.data.shape == ref.data.shape and np.allclose(vol.affine, ref.affine, atol=1e-3):
        return vol.data
    from scipy import ndimage as ndi

    vox2vox = np.linalg.inv(vol.affine) @ ref.affine
    src = vol.data.astype(np.float32) if order > 0 else vol.data
    out = ndi.affine_transform(src, vox2vox[:3, :3], offset=vox2vox[:3, 3],
                               output_shape=ref.data.shape, order=order, mode='constant',
                               cval=0)
    return out.astype(vol.data.dtype, copy=False)


def _sample(values: np.ndarray) -> np.ndarray:
    """A regular subsample of at most ``_MAX_SAMPLES`` values (fast percentiles)."""
    if values.size > _MAX_SAMPLES:
        values = values[:: int(np.ceil(values.size / _MAX_SAMPLES))]
    return values


def _window(data: np.ndarray, mask: np.ndarray | None = None,
            percentiles: tuple[float, float] = (0.5, 99.5)) -> tuple[float, float]:
    """Robust display window: percentiles within ``mask`` (default: the non-zero voxels)."""
    values = data[mask] if mask is not None else data[data != 0]
    if values.size == 0:
        values = data.ravel()
    lo, hi = np.percentile(_sample(values), percentiles)
    if not hi > lo:
        lo, hi = float(values.min()), float(values.max())
    if not hi > lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def _foreground(data: np.ndarray) -> np.ndarray:
    """Voxels brighter than 10 % of the robust maximum (or the non-zero voxels if empty)."""
    nonzero = data != 0
    if not nonzero.any():
        return np.ones(data.shape, dtype=bool)
    hi = np.percentile(_sample(np.abs(data[nonzero])), 99.0)
    fg = np.abs(data) > 0.1 * hi
    return fg if fg.any() else nonzero


def _extent(mask: np.ndarray, axis: int, robust: bool = False) -> tuple[int, int]:
    """First and last index of ``mask`` along ``axis`` (robust: 0.2-99.8 % of its voxels)."""
    other = tuple(i for i in range(3) if i != axis)
    counts = mask.sum(axis=other)
    nz = np.flatnonzero(counts)
    if nz.size == 0:
        return 0, mask.shape[axis] - 1
    if not robust:
        return int(nz[0]), int(nz[-1])
    cum = np.cumsum(counts) / counts.sum()
    lo = int(np.searchsorted(cum, 0.002))
    hi = int(np.searchsorted(cum, 0.998))
    return lo, min(hi, mask.shape[axis] - 1)


def _otsu3(values: np.ndarray, nbins: int = 128) -> tuple[float, float]:
    """Two thresholds that split ``values`` into three classes (multi-level Otsu)."""
    values = _sample(values)
    lo, hi = np.percentile(values, (0.5, 99.5))
    if not hi > lo:
        return float(lo), float(hi)
    hist, edges = np.histogram(np.clip(values, lo, hi), bins=nbins, range=(lo, hi))
    centres = 0.5 * (edges[:-1] + edges[1:])
    p = hist / hist.sum()
    w = np.cumsum(p)
    m = np.cumsum(p * centres)
    t1, t2 = np.meshgrid(np.arange(nbins - 2), np.arange(nbins - 2) + 1, indexing='ij')
    valid = t2 > t1
    t2 = np.minimum(t2, nbins - 2)
    w0, m0 = w[t1], m[t1]
    w1, m1 = w[t2] - w[t1], m[t2] - m[t1]
    w2, m2 = 1.0 - w[t2], m[-1] - m[t2]
    with np.errstate(divide='ignore', invalid='ignore'):
        score = m0**2 / w0 + m1**2 / w1 + m2**2 / w2
    score[~valid | ~np.isfinite(score)] = -np.inf
    i, j = np.unravel_index(np.argmax(score), score.shape)
    return float(edges[t1[i, j] + 1]), float(edges[t2[i, j] + 1])


# --------------------------------------------------------------------------------------------
# Slices and layout
# --------------------------------------------------------------------------------------------
def select_slices(mask: np.ndarray, n_slices: int = 7,
                  views: Sequence[str] = VIEWS, robust: bool = False) -> dict[str, list[int]]:
    """Indices of slices evenly spaced through the extent of a mask.

    Parameters
    ----------
    mask : numpy.ndarray
        3-D array in RAS+ orientation; its non-zero voxels define the extent (use the brain
        mask, or the non-zero voxels of an image).
    n_slices : int
        Number of slices per view. The first and last slices of the extent are skipped
        (they mostly show the edge of the mask), so the slices sit at ``1/(n+1)``,
        ``2/(n+1)``, ... of the extent.
    views : sequence of str
        Any of ``'axial'``, ``'coronal'``, ``'sagittal'``.
    robust : bool
        Ignore the 0.2 % outermost voxels along each axis (for noisy foregrounds).

    Returns
    -------
    dict
        View name -> sorted list of distinct voxel indices along the slicing axis.

    Examples
    --------
    >>> m = np.zeros((10, 12, 14), dtype=bool); m[2:8, 3:9, 4:12] = True
    >>> select_slices(m, 3)
    {'axial': [6, 8, 9], 'coronal': [4, 6, 7], 'sagittal': [3, 4, 6]}
    """
    mask = np.asarray(mask) != 0
    out: dict[str, list[int]] = {}
    for view in views:
        axis = _VIEW_AXES[view][0]
        lo, hi = _extent(mask, axis, robust=robust)
        idx = np.rint(np.linspace(lo, hi, n_slices + 2)[1:-1]).astype(int)
        out[view] = sorted({int(i) for i in np.clip(idx, 0, mask.shape[axis] - 1)})
    return out


@dataclass
class _Panel:
    """One slice of a mosaic: view, index and in-plane crop (in voxels)."""

    view: str
    index: int
    hcrop: tuple[int, int]  # [start, stop) along the horizontal axis
    vcrop: tuple[int, int]  # [start, stop) along the vertical axis
    zooms: tuple[float, float, float]

    @property
    def extent(self) -> tuple[float, float, float, float]:
        """(left, right, bottom, top) in mm, voxel centres at integer multiples of zooms."""
        _, h, v, _ = _VIEW_AXES[self.view]
        zh, zv = self.zooms[h], self.zooms[v]
        return ((self.hcrop[0] - 0.5) * zh, (self.hcrop[1] - 0.5) * zh,
                (self.vcrop[0] - 0.5) * zv, (self.vcrop[1] - 0.5) * zv)

    @property
    def ratio(self) -> float:
        """Width / height of the panel in mm."""
        left, right, bottom, top = self.extent
        return (right - left) / max(top - bottom, 1e-6)

    def take(self, data: np.ndarray) -> np.ndarray:
        """The 2-D slice of ``data`` as (vertical, horizontal), for ``origin='lower'``."""
        axis = _VIEW_AXES[self.view][0]
        plane = np.take(data, self.index, axis=axis)  # (horizontal, vertical)
        plane = plane[self.hcrop[0]:self.hcrop[1], self.vcrop[0]:self.vcrop[1]]
        return plane.T

    def slab(self, data: np.ndarray, half: int) -> np.ndarray:
        """Logical OR of ``data`` over ``index - half .. index + half`` (2-D, as ``take``)."""
        axis = _VIEW_AXES[self.view][0]
        lo, hi = max(self.index - half, 0), min(self.index + half + 1, data.shape[axis])
        sub = np.take(data, np.arange(lo, hi), axis=axis).any(axis=axis)
        return sub[self.hcrop[0]:self.hcrop[1], self.vcrop[0]:self.vcrop[1]].T


def _panels(extent_mask: np.ndarray, zooms: tuple[float, float, float], n_slices: int,
            views: Sequence[str], robust: bool = False,
            margin_mm: float = _MARGIN_MM) -> dict[str, list[_Panel]]:
    """Panels of each view: slices through the mask's extent, cropped to its bounding box."""
    shape = extent_mask.shape
    slices = select_slices(extent_mask, n_slices, views, robust=robust)
    bbox = []
    for axis in range(3):
        lo, hi = _extent(extent_mask, axis, robust=robust)
        pad = int(np.ceil(margin_mm / zooms[axis]))
        bbox.append((max(lo - pad, 0), min(hi + pad + 1, shape[axis])))
    out: dict[str, list[_Panel]] = {}
    for view in views:
        _, h, v, _ = _VIEW_AXES[view]
        out[view] = [_Panel(view, i, bbox[h], bbox[v], zooms) for i in slices[view]]
    return out


@dataclass
class _Layout:
    """A figure and the axes of its panels, row by row."""

    fig: Any
    axes: list[list[Any]]
    footer: tuple[float, float, float, float] | None  # figure fraction rect of the footer
    height_px: int


def _setup_matplotlib() -> None:
    """Select the non-interactive ``Agg`` backend unless pyplot is already in use.

    The figures are drawn on :class:`matplotlib.figure.Figure` objects with an explicit Agg
    canvas, never through pyplot, so they do not depend on (or leak into) pyplot's state.
    """
    import sys

    import matplotlib

    if 'matplotlib.pyplot' not in sys.modules:
        matplotlib.use('Agg')


def _mosaic(rows: list[list[_Panel]], title: str | None = None,
            row_labels: Sequence[str] | None = None, footer_in: float = 0.0,
            background: str = _BG) -> _Layout:
    """A black figure with one axes per panel; each row fills the width of the figure."""
    _setup_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # work in whole pixels, so that identical panels render identically in every row
    width = round(_WIDTH_IN * _DPI)
    left = 34 if row_labels else 4
    right, bottom = 4, 4
    top = 32 if title else 4
    gap = max(round(_GAP_IN * _DPI), 1)
    footer_px = round(footer_in * _DPI)
    avail = width - left - right
    heights = []
    for row in rows:
        ratios = sum(p.ratio for p in row) or 1.0
        h = int((avail - gap * (len(row) - 1)) / ratios)
        heights.append(max(min(h, round(_MAX_ROW_IN * _DPI)), 1))
    height = top + sum(heights) + gap * (len(rows) - 1) + footer_px + bottom
    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, facecolor=background)
    FigureCanvasAgg(fig)
    axes: list[list[Any]] = []
    y = height - top
    for r, (row, h) in enumerate(zip(rows, heights)):
        y -= h
        widths = [max(round(h * p.ratio), 1) for p in row]
        x = left + (avail - sum(widths) - gap * (len(row) - 1)) // 2
        row_axes = []
        for panel, w in zip(row, widths):
            ax = fig.add_axes((x / width, y / height, w / width, h / height))
            ax.set_axis_off()
            ax.set_facecolor(background)
            left_mm, right_mm, bottom_mm, top_mm = panel.extent
            ax.set_xlim(left_mm, right_mm)
            ax.set_ylim(bottom_mm, top_mm)
            row_axes.append(ax)
            x += w + gap
        axes.append(row_axes)
        if row_labels and r < len(row_labels) and row_labels[r]:
            fig.text(0.5 * left / width, (y + h / 2) / height, row_labels[r],
                     rotation=90, ha='center', va='center', color=_FG, fontsize=11,
                     fontweight='bold')
        y -= gap
    if title:
        fig.text(4 / width, 1 - 16 / height, title, ha='left', va='center', color=_FG,
                 fontsize=11)
    footer = None
    if footer_px > 0:
        footer = (left / width, bottom / height, avail / width, footer_px / height)
    return _Layout(fig, axes, footer, height)


def _annotate(ax: Any, panel: _Panel, affine: np.ndarray, first: bool) -> None:
    """World coordinate of the slice (nilearn style) and L/R on the first panel."""
    from matplotlib import patheffects

    axis, _, _, letter = _VIEW_AXES[panel.view]
    vox = np.zeros(4)
    vox[3] = 1.0
    vox[axis] = panel.index
    coord = float((affine @ vox)[axis])
    style = {'transform': ax.transAxes, 'color': _FG,
             'path_effects': [patheffects.withStroke(linewidth=2, foreground=_BG)]}
    ax.text(0.03, 0.03, f'{letter}={coord:.0f}', fontsize=7, ha='left', va='bottom', **style)
    if first and panel.view in ('axial', 'coronal'):
        ax.text(0.03, 0.97, 'L', fontsize=8, ha='left', va='top', **style)
        ax.text(0.97, 0.97, 'R', fontsize=8, ha='right', va='top', **style)


def _show_gray(ax: Any, panel: _Panel, data: np.ndarray, window: tuple[float, float]) -> None:
    ax.imshow(panel.take(data), cmap='gray', vmin=window[0], vmax=window[1],
              extent=panel.extent, origin='lower', aspect='auto', interpolation='antialiased')


def _contour(ax: Any, panel: _Panel, field: np.ndarray, level: float, colour: str,
             width: float) -> None:
    """Contour line of a 2-D field at one level (nothing if the level is not crossed)."""
    if min(field.shape) < 2 or not field.min() < level < field.max():
        return
    ax.contour(field, levels=[level], colors=[colour], linewidths=width, extent=panel.extent,
               origin='lower', antialiased=True)


def _save(fig: Any, out_png: PathLike) -> Path:
    """Write the figure as an optimised PNG.

    The image is stored with a 256-colour palette (octree quantisation: about a third of
    the size of an RGB PNG, with errors of a few grey levels), unless quantisation would
    change some pixel by more than ``_MAX_QUANT_ERROR`` (then it is stored as RGB).
    """
    from PIL import Image

    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=_DPI, facecolor=fig.get_facecolor())
    fig.clear()
    buf.seek(0)
    with Image.open(buf) as img:
        rgb = img.convert('RGB')
    pal = rgb.quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    error = np.abs(np.asarray(pal.convert('RGB'), dtype=np.int16)
                   - np.asarray(rgb, dtype=np.int16)).max()
    (pal if error <= _MAX_QUANT_ERROR else rgb).save(out, format='PNG', optimize=True)
    return out


def _footer_axes(layout: _Layout, x0: float, width: float) -> Any:
    """Axes in the footer strip, from ``x0`` to ``x0 + width`` (fractions of the footer)."""
    fl, fb, fw, fh = layout.footer  # type: ignore[misc]
    return layout.fig.add_axes((fl + x0 * fw, fb + 0.55 * fh, width * fw, 0.25 * fh))


# --------------------------------------------------------------------------------------------
# Reportlets
# --------------------------------------------------------------------------------------------
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
        ``out_png``.
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

    from .keymorph.keypoints import read_keypoints

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


def plot_group(summary: PathLike | pd.DataFrame, out_png: PathLike, metric: str,
               by: str = 'method', title: str | None = None,
               *, pair_by: str = 'participant_id') -> Path:
    """Strip and box plot of one metric per group (engine) for the group report.

    Parameters
    ----------
    summary : path-like or pandas.DataFrame
        Table with one row per run (a TSV file, or a DataFrame) holding the columns ``by``
        and ``metric``.
    out_png : path-like
        Output PNG file (white background).
    metric : str
        Column to plot (e.g. ``'dice_mean'``, ``'runtime_s'``). Values that are not
        numbers are dropped. Metrics whose name starts with ``'runtime'`` use a log axis
        (non-positive values dropped).
    by : str
        Column that defines the groups (x axis, sorted).
    title : str, optional
        Title of the plot (default: the metric's name).
    pair_by : str
        When this column exists and identifies at most one row per group, the points of
        the same value (participant) are joined by faint lines across groups (up to 40).

    Returns
    -------
    pathlib.Path
        ``out_png``. With no usable value, a figure that says so is written.

    Raises
    ------
    ValueError
        If the table lacks the ``by`` or ``metric`` column.
    """
    import pandas as pd

    _setup_matplotlib()
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(summary, pd.DataFrame):
        df = summary.copy()
    else:
        df = pd.read_csv(summary, sep='\t')
    for col in (by, metric):
        if col not in df.columns:
            raise ValueError(f'column {col!r} not in the summary table '
                             f'(columns: {", ".join(map(str, df.columns))})')
    df = df.assign(_value=pd.to_numeric(df[metric], errors='coerce'))
    df = df[np.isfinite(df['_value'])]
    log = metric.startswith('runtime')
    if log:
        df = df[df['_value'] > 0]
    df = df.assign(_group=df[by].astype(str))
    groups = sorted(df['_group'].unique())

    width = float(np.clip(3.0 + 1.1 * len(groups), 6.0, 14.0))
    fig = Figure(figsize=(width, 4.2), dpi=_DPI, facecolor='white')
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.1, 0.2, 0.86, 0.68))
    ax.set_title(title or metric, fontsize=11, loc='left')
    if not groups:
        ax.set_axis_off()
        ax.text(0.5, 0.5, f'no values of {metric!r}', ha='center', va='center',
                transform=ax.transAxes, fontsize=11, color='0.4')
        return _save(fig, out_png)

    colours = colormaps['tab10']
    values = [df.loc[df['_group'] == g, '_value'].to_numpy() for g in groups]
    positions = np.arange(len(groups))
    rng = np.random.default_rng(0)
    jitter = {}
    for i, vals in enumerate(values):
        jitter[i] = rng.uniform(-0.12, 0.12, size=vals.size) if vals.size > 1 else np.zeros(1)

    # paired lines (same participant across groups)
    if pair_by in df.columns and df[pair_by].nunique() <= 40:
        per_group = df.groupby('_group')[pair_by]
        if all(s.is_unique for _, s in per_group):
            xpos = {}
            for i, g in enumerate(groups):
                sub = df[df['_group'] == g]
                for x, key, val in zip(i + jitter[i], sub[pair_by], sub['_value']):
                    xpos.setdefault(key, []).append((x, val))
            for pts in xpos.values():
                if len(pts) > 1:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, color='0.6', alpha=0.35, linewidth=0.7, zorder=1)

    ax.boxplot(values, positions=positions, widths=0.5, showfliers=False, patch_artist=True,
               boxprops={'facecolor': 'none', 'edgecolor': '0.3'},
               medianprops={'color': 'black', 'linewidth': 1.5},
               whiskerprops={'color': '0.3'}, capprops={'color': '0.3'}, zorder=2)
    for i, vals in enumerate(values):
        ax.scatter(i + jitter[i][: vals.size], vals, s=22, color=colours(i % 10),
                   edgecolors='white', linewidths=0.5, alpha=0.9, zorder=3)
    ax.set_xticks(positions)
    ax.set_xticklabels([f'{g}\n(n={v.size})' for g, v in zip(groups, values)], fontsize=9)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    if log:
        from matplotlib.ticker import FuncFormatter

        ax.set_yscale('log')
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f'{v:g}'))
    ax.set_ylabel(metric + (' (log scale)' if log else ''), fontsize=9)
    ax.grid(axis='y', color='0.9', linewidth=0.8, zorder=0)
    ax.set_axisbelow(True)
    for side in ('top', 'right'):
        ax.spines[side].set_visible(False)
    return _save(fig, out_png)


def plot_structure_dice(long: PathLike | pd.DataFrame, out_png: PathLike,
                        title: str | None = None, *, label_set: str = 'synthseg',
                        by: str = 'method') -> Path:
    """Dice per structure (rows) for each engine (colours): a dot plot for the reports.

    Parameters
    ----------
    long : path-like or pandas.DataFrame
        Rows of the long QC table (``label_set``, ``label_name``, ``dice`` and ``by``
        columns), e.g. those of one image; rows of other label sets are ignored.
    out_png : path-like
        Output PNG file (white background).
    title : str, optional
        Title of the plot.
    label_set : str
        Which label set to plot.
    by : str
        Column whose values get one colour each (the engine).

    Returns
    -------
    pathlib.Path
        ``out_png``. The legend gives each engine's mean Dice (over the structures present
        in the target when the table has ``target_cm3``, as ``dice_mean`` in the QC
        summary). With no usable value, a figure that says so is written.
    """
    import pandas as pd

    _setup_matplotlib()
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    df = long.copy() if isinstance(long, pd.DataFrame) else pd.read_csv(long, sep='\t')
    for col in ('label_name', 'dice', by):
        if col not in df.columns:
            raise ValueError(f'column {col!r} not in the table')
    if 'label_set' in df.columns:
        df = df[df['label_set'] == label_set]
    df = df.assign(_dice=pd.to_numeric(df['dice'], errors='coerce'))
    order = list(dict.fromkeys(df.sort_values('label_index')['label_name']
                               if 'label_index' in df.columns else df['label_name']))
    groups = sorted(df[by].astype(str).unique())
    height = float(np.clip(0.9 + 0.2 * len(order), 2.5, 9.0))
    fig = Figure(figsize=(9.0, height), dpi=_DPI, facecolor='white')
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.3, 0.55 / height, 0.5, 1 - 1.0 / height))
    ax.set_title(title or f'Dice per structure ({label_set})', fontsize=10, loc='left')
    if not order or not np.isfinite(df['_dice']).any():
        ax.set_axis_off()
        ax.text(0.5, 0.5, 'no Dice values', ha='center', va='center', transform=ax.transAxes,
                fontsize=11, color='0.4')
        return _save(fig, out_png)
    colours = colormaps['tab10']
    ypos = {name: i for i, name in enumerate(order)}
    offsets = np.linspace(-0.25, 0.25, len(groups)) if len(groups) > 1 else [0.0]
    for k, (g, dy) in enumerate(zip(groups, offsets)):
        sub = df[df[by].astype(str) == g]
        ys = np.array([ypos[n] for n in sub['label_name']], dtype=float) + dy
        avg = sub['_dice']
        if 'target_cm3' in sub.columns:  # as the QC tables: structures present in the target
            avg = avg[pd.to_numeric(sub['target_cm3'], errors='coerce') > 0]
        mean = np.nanmean(avg) if np.isfinite(avg).any() else float('nan')
        ax.scatter(sub['_dice'], ys, s=18, color=colours(k % 10), edgecolors='none',
                   label=f'{g} (mean {mean:.2f})', zorder=3)
    ax.set_yticks(range(len(order)))
    ax.set_yticklabels(order, fontsize=7)
    ax.set_ylim(len(order) - 0.5, -0.5)
    ax.set_xlim(0, 1)
    ax.set_xlabel('Dice', fontsize=9)
    ax.tick_params(axis='x', labelsize=8)
    ax.grid(axis='x', color='0.9', linewidth=0.8, zorder=0)
    ax.set_axisbelow(True)
    for side in ('top', 'right'):
        ax.spines[side].set_visible(False)
    ax.legend(loc='upper left', bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    return _save(fig, out_png)


def png_to_data_uri(path: PathLike) -> str:
    """A ``data:image/png;base64,...`` URI of a PNG file, for self-contained HTML.

    Parameters
    ----------
    path : path-like
        PNG file.

    Returns
    -------
    str
        The data URI.
    """
    payload = base64.b64encode(Path(path).read_bytes()).decode('ascii')
    return f'data:image/png;base64,{payload}'
