"""Shared machinery of the reportlets: loading, slice selection, mosaic layout, saving.

Every figure module builds on these helpers; nothing here draws a reportlet by itself.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

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
