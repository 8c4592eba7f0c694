"""Shared by the anatomy builders: source files, the cache, voxel-grid geometry,
morphology by distance transforms, left/right and label-space helpers, images and label maps.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from ...targets import mricron_file
from ..generator import LabelMap, label_map_from_array
from ..labels import GENERATION_LABELS, GENERATION_TO_OUTPUT, LR_PAIRS

__all__ = ['ANATOMY_VERSION', 'MAPPING_DIR', 'cache_dir']


#: Bump when a heuristic changes: the cache key includes it.
ANATOMY_VERSION = '1'


#: Committed mapping tables and the SynthSeg reference volumes.
MAPPING_DIR = Path(__file__).resolve().parents[3] / 'data' / 'synthseg_mapping'


_LEFT_TO_RIGHT = dict(LR_PAIRS)


_RIGHT_TO_LEFT = {r: l for l, r in LR_PAIRS.items()}


def _mricron(name: str) -> Path:
    return mricron_file(name)


def _icbm(which: str) -> Path:
    from ...targets import template_file

    return template_file('MNI152NLin2009aSym', which)


def cache_dir() -> Path:
    """User cache folder of built anatomies (``$KEYPREP_CACHE/anatomies`` first)."""
    root = os.environ.get('KEYPREP_CACHE')
    if root:
        base = Path(root)
    else:
        base = Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'keyprep'
    return base / 'anatomies'


def _source_key(name: str, paths: Sequence[Path]) -> str:
    h = hashlib.sha1(f'{name}:{ANATOMY_VERSION}'.encode())
    for p in paths:
        h.update(f'{p.name}:{p.stat().st_size}'.encode())
    return f'{name}-v{ANATOMY_VERSION}-{h.hexdigest()[:10]}'


def _cached(name: str, paths: Sequence[Path], build) -> dict:
    """Load ``name`` from the cache or build it (``build() -> dict`` of arrays and JSON)."""
    key = _source_key(name, paths)
    path = cache_dir() / f'{key}.npz'
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                return {'labels': z['labels'], 'affine': z['affine'],
                        'table': json.loads(str(z['table'])), 'info': json.loads(str(z['info']))}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            path.unlink(missing_ok=True)  # a broken cache entry is rebuilt
    out = build()
    buf = io.BytesIO()
    np.savez_compressed(buf, labels=out['labels'].astype(np.int16), affine=out['affine'],
                        table=json.dumps(out['table']), info=json.dumps(out.get('info', {})))
    try:
        from ...io import atomic_write_bytes

        atomic_write_bytes(path, buf.getvalue())
    except OSError:  # a read-only home still gets the map, just not cached
        pass
    return out


def _world(shape, affine) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World x, y, z (mm) of every voxel of an axis-aligned grid, as broadcastable arrays."""
    out = []
    for a in range(3):
        axis = np.arange(shape[a], dtype=np.float32)
        col = np.argmax(np.abs(affine[:3, a]))
        if np.count_nonzero(np.abs(affine[:3, :3]) > 1e-6) != 3:
            raise ValueError('expected an axis-aligned grid')
        vals = affine[col, a] * axis + affine[col, 3]
        shp = [1, 1, 1]
        shp[a] = -1
        out.append((col, vals.reshape(shp)))
    out.sort(key=lambda t: t[0])
    return tuple(v for _, v in out)


def _bbox(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    """Slices of the bounding box of ``mask`` grown by ``margin`` voxels (None if empty)."""
    out = []
    for ax in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != ax)
        idx = np.nonzero(mask.any(axis=other))[0]
        if len(idx) == 0:
            return None
        out.append(slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + margin + 1, mask.shape[ax])))
    return tuple(out)


def _dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    """Dilation by a Euclidean ball (an EDT on the mask's bounding box: faster than a
    structuring element)."""
    if radius <= 0:
        return mask.copy()
    out = np.zeros(mask.shape, bool)
    bb = _bbox(mask, int(np.ceil(radius)) + 1)
    if bb is not None:
        out[bb] = ndi.distance_transform_edt(~mask[bb]) <= radius
    return out


def _erode(mask: np.ndarray, radius: float) -> np.ndarray:
    """Erosion by a Euclidean ball; the array's outside does not erode."""
    if radius <= 0:
        return mask.copy()
    out = np.zeros(mask.shape, bool)
    bb = _bbox(mask, 1)
    if bb is not None:
        out[bb] = ndi.distance_transform_edt(mask[bb]) > radius
    return out


def _close(mask: np.ndarray, radius: float) -> np.ndarray:
    return _erode(_dilate(mask, radius), radius)


def _open(mask: np.ndarray, radius: float) -> np.ndarray:
    return _dilate(_erode(mask, radius), radius)


def _sided(side: np.ndarray, left_label: int) -> np.ndarray:
    """Left label where ``side < 0``, its right homologue elsewhere."""
    return np.where(side < 0, left_label, _LEFT_TO_RIGHT[left_label]).astype(np.int16)


def _kmeans_hist(values: np.ndarray, k: int, iters: int = 100) -> np.ndarray:
    """1-D k-means of (non-negative, integer-valued) intensities on their histogram.

    Deterministic: centres start at the (i + 0.5)/k quantiles. Returns the sorted centres.
    """
    v = np.clip(np.rint(values), 0, None).astype(np.int64)
    hist = np.bincount(v).astype(float)
    grid = np.arange(len(hist), dtype=float)
    cdf = np.cumsum(hist) / hist.sum()
    centres = np.array([grid[np.searchsorted(cdf, (i + 0.5) / k)] for i in range(k)], float)
    for _ in range(iters):
        assign = np.argmin(np.abs(grid[:, None] - centres[None, :]), axis=1)
        new = np.array([np.average(grid[assign == c], weights=hist[assign == c])
                        if hist[assign == c].sum() > 0 else centres[c] for c in range(k)])
        if np.allclose(new, centres):
            break
        centres = new
    return np.sort(centres)


def _resample_labels(data: np.ndarray, affine: np.ndarray, shape, target_affine) -> np.ndarray:
    """Nearest-neighbour resampling of a label array onto another grid (outside -> 0)."""
    from ...perturb import Grid, resample

    return resample(data, affine, Grid(tuple(int(n) for n in shape), np.asarray(target_affine, float)),
                    order=0)


def _to_output(gen: np.ndarray) -> np.ndarray:
    lut = np.zeros(max(GENERATION_LABELS) + 1, dtype=np.int16)
    for g, o in GENERATION_TO_OUTPUT.items():
        lut[g] = o
    return lut[gen.astype(np.int64)]


def _side_from_x(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """-1 left (x < 0), +1 right (x > 0); the x = 0 plane alternates in a checkerboard."""
    side = np.sign(x).astype(np.int8)
    mid = side == 0
    if mid.any():
        parity = ((np.rint(y) + np.rint(z)).astype(np.int64) % 2) * 2 - 1
        side = np.where(mid, parity.astype(np.int8), side)
    return side


def _image(labels: np.ndarray, affine: np.ndarray, kind: str):
    """A label array as an int16 NIfTI image, in generation or output labels."""
    if kind not in ('generation', 'output'):
        raise ValueError(f"kind must be 'generation' or 'output', not {kind!r}")
    return _image_out(labels if kind == 'generation' else _to_output(labels), affine)


def _image_out(data, affine):
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(data, np.int16), affine)
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
    return img


def _label_map(labels: np.ndarray, affine: np.ndarray, name: str, margin: int = 4) -> LabelMap:
    return label_map_from_array(labels, affine, name, margin=margin)


def _to_left(a: np.ndarray) -> np.ndarray:
    lut = np.arange(max(GENERATION_LABELS) + 1, dtype=np.int16)
    for l, r in LR_PAIRS.items():
        lut[r] = l
    return lut[a.astype(np.int64)]
