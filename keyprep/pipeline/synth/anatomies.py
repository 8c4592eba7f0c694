"""Extra anatomies for the synthesis engine, from files that install offline.

SynthSeg's 16 training label maps are the main material of keyprep's synthesis engine, but
they are not on a user's machine. This module builds three more label maps, in the same
*generation* label space (:data:`~keyprep.pipeline.synth.labels.GENERATION_LABELS`), from
files that a user's machine does have:

* **Colin27** (Debian ``mricron-data``: ``ch2``, ``ch2bet``, ``aal``): AAL's cortical and
  deep grey-matter regions, a three-class tissue segmentation of the ch2 T1 inside the
  ch2bet brain (white matter, CSF, ventricles), geometric rules for the structures AAL
  lacks (brain stem, ventral DC, accumbens, 3rd/4th and inferior lateral ventricles), and
  extra-cerebral classes from a k-means clustering of the head around the brain.
* **jhu189** (``mricron-data``; 189 parcels, no name table): each parcel (pooled with its
  left/right homologue) becomes the output structure it overlaps most in the Colin27 map
  (both sit roughly in MNI space), with the purity of that overlap recorded; gyral parcels,
  which hold cortex and superficial white matter together, are split by depth.
* **ICBM 2009a** (``nilearn``: T1, GM and WM probability maps): tissue by maximum
  probability; deep structures, brain stem, cerebellum and ventricles from the Colin27 map
  resampled onto it (both are MNI-like): an approximation.

Every map is honest about what it is: the tables written by :func:`write_mapping_tables`
(committed under ``keyprep/data/synthseg_mapping/``) say which source label became which
generation and output label, with voxel counts and purities, and ``docs/synthseg_labels.md``
lists the heuristics, the per-label volume ratios to the SynthSeg maps, and the weaknesses.

Building Colin27 runs ANTs Atropos (about 30 s at 1 mm); built maps are cached under
``$KEYPREP_CACHE/anatomies`` (default ``$XDG_CACHE_HOME/keyprep/anatomies`` or
``~/.cache/keyprep/anatomies``) with a version key, never inside the package.

Coordinates: all three sources are roughly in MNI space; left is world x < 0 (RAS).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from ..masks import fill_holes, largest_component, largest_component_filled
from ..targets import MRICRON_DIR, mricron_file
from .generator import LabelMap, label_map_from_array
from .labels import GENERATION_LABELS, GENERATION_TO_OUTPUT, LR_PAIRS, OUTPUT_LABELS, OUTPUT_NAMES

__all__ = [
    'ANATOMY_VERSION',
    'HEAD_CLUSTER_LABELS',
    'MAPPING_DIR',
    'MRICRON_DIR',
    'cache_dir',
    'colin27_ground_truth',
    'colin27_label_map',
    'colin27_labels',
    'extra_label_maps',
    'icbm_label_map',
    'icbm_labels',
    'jhu189_label_map',
    'jhu189_labels',
    'label_volumes',
    'mapping_table',
    'read_volume_table',
    'synthseg_mean_volumes',
    'write_mapping_tables',
]

#: Bump when a heuristic changes: the cache key includes it.
ANATOMY_VERSION = '1'

#: Where Debian's ``mricron-data`` installs Colin27, AAL and jhu189.

#: Committed mapping tables and the SynthSeg reference volumes.
MAPPING_DIR = Path(__file__).resolve().parents[2] / 'data' / 'synthseg_mapping'

_LEFT_TO_RIGHT = dict(LR_PAIRS)
_RIGHT_TO_LEFT = {r: l for l, r in LR_PAIRS.items()}

#: AAL deep grey-matter regions -> FreeSurfer label (AAL index: label).
_AAL_DEEP = {
    37: 17, 38: 53,  # Hippocampus
    41: 18, 42: 54,  # Amygdala
    71: 11, 72: 50,  # Caudate
    73: 12, 74: 51,  # Putamen
    75: 13, 76: 52,  # Pallidum
    77: 10, 78: 49,  # Thalamus
}
_CEREBELLUM_AAL = tuple(range(91, 117))


def _aal_target(index: int, name: str) -> int:
    """Nominal FreeSurfer label of an AAL region (before tissue rules)."""
    if index in _AAL_DEEP:
        return _AAL_DEEP[index]
    if name.startswith(('Cerebelum', 'Vermis')):
        return 47 if name.endswith('_R') else 8  # vermis: side per voxel
    return 3 if name.endswith('_L') else 42


def _aal_names() -> dict[int, str]:
    names = {}
    for line in (_mricron('aal.nii.txt')).read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            names[int(parts[0])] = parts[1]
    return names


#: Extra-cerebral generation labels given to the k-means head clusters of Colin27, darkest
#: cluster first. They are ordered by SynthSeg's T1 prior mean of each class (``prior_means_t1``:
#: 515 ~30, 514 ~48, 509 ~70, 507 ~94, 511 ~114 on SynthSeg's 0-255 scale); what tissue
#: (bone, muscle, fat, skin) each cluster really is, is not claimed.
HEAD_CLUSTER_LABELS: tuple[int, ...] = (515, 514, 509, 507, 511)

#: Approximate MNI centre (|x|, y, z in mm) and radius of the nucleus accumbens used to carve
#: it out of AAL's caudate and putamen.
ACCUMBENS_MNI = (9.5, 12.0, -7.0)
ACCUMBENS_RADIUS = 6.0
ACCUMBENS_RULE = 'aal caudate/putamen near the accumbens centre -> accumbens'


# ---------------------------------------------------------------------------- files and cache
def _mricron(name: str) -> Path:
    return mricron_file(name)


def _icbm(which: str) -> Path:
    from ..targets import template_file

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
        from ..io import atomic_write_bytes

        atomic_write_bytes(path, buf.getvalue())
    except OSError:  # a read-only home still gets the map, just not cached
        pass
    return out


# ---------------------------------------------------------------------------- small helpers
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
    from ..perturb import Grid, resample

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


# ---------------------------------------------------------------------------- Colin27
def _colin27_tissue(ch2: np.ndarray, affine: np.ndarray, brain: np.ndarray) -> np.ndarray:
    from ..anatomy import tissue_segmentation

    return tissue_segmentation(ch2, affine, brain).astype(np.int8)  # 1 GM, 2 WM, 3 CSF


def _build_colin27() -> dict:
    import nibabel as nib

    img = nib.load(str(_mricron('ch2.nii.gz')))
    if nib.aff2axcodes(img.affine) != ('R', 'A', 'S'):
        img = nib.as_closest_canonical(img)
    affine = img.affine
    ch2 = np.asarray(img.dataobj, dtype=np.float32)
    bet = np.asarray(nib.as_closest_canonical(nib.load(str(_mricron('ch2bet.nii.gz')))).dataobj) > 0
    aal = np.rint(np.asarray(nib.as_closest_canonical(nib.load(str(_mricron('aal.nii.gz')))).dataobj)
                  ).astype(np.int16)
    names = _aal_names()
    X, Y, Z = _world(ch2.shape, affine)
    info: dict = {}

    # brain mask: ch2bet, closed (its strip cuts into the interhemispheric fissure) and filled
    brain = _close(bet, 2)
    brain = largest_component_filled(brain | bet, fill_first=True)
    # the brain rules run on the brain's bounding box (+ 8 mm), the head rules on the full grid
    full = {'ch2': ch2, 'aal': aal, 'brain': brain, 'shape': ch2.shape}
    bb = _bbox(brain, 8)
    ch2, aal, brain = ch2[bb], aal[bb], brain[bb]
    X, Y, Z = X[bb[0]], Y[:, bb[1]], Z[:, :, bb[2]]
    caff = affine.copy()
    caff[:3, 3] = affine[:3, :3] @ np.array([b.start for b in bb], float) + affine[:3, 3]
    tissue = _colin27_tissue(ch2, caff, brain)
    tissue[~brain] = 0
    means = {k: float(ch2[tissue == k].mean()) for k in (1, 2, 3)}
    info['tissue_means'] = means
    gm, wm, csf = tissue == 1, tissue == 2, tissue == 3

    # hemisphere side: nearest AAL hemispheric region (follows Colin's own fissure, whose
    # median x is about +0.5 mm); vermis and every non-AAL voxel inherit it
    hemi = np.zeros(aal.shape, np.int8)
    for idx, name in names.items():
        if name.endswith('_L'):
            hemi[aal == idx] = -1
        elif name.endswith('_R'):
            hemi[aal == idx] = 1
    _, nearest = ndi.distance_transform_edt(hemi == 0, return_indices=True)
    side = hemi[tuple(nearest)]
    del nearest
    info['side_differs_from_x_sign_in_brain'] = float(
        np.mean((side[brain] < 0) != (np.broadcast_to(X, brain.shape)[brain] < 0)))

    gen = np.zeros(aal.shape, np.int16)
    done = np.zeros(aal.shape, bool)

    def put(mask, labels, why):
        m = mask & ~done
        gen[m] = labels[m] if isinstance(labels, np.ndarray) else labels
        done[m] = True
        info.setdefault('rules', {})[why] = int(m.sum())

    depth = ndi.distance_transform_edt(brain)  # mm to the outside of the brain mask

    # --- cerebellum region: AAL cerebellum + vermis, closed and filled (takes in the WM core)
    cb_aal = np.isin(aal, _CEREBELLUM_AAL)
    cereb = fill_holes(_close(cb_aal, 3)) & brain
    cereb |= cb_aal & brain

    # --- brain stem: non-AAL tissue below the diencephalon, medial, between the cerebellum
    # and the cerebral peduncles; the connected part around the pons
    free = brain & (aal == 0) & ~cereb & ~csf
    width = np.where(Z > -20, 12.0, 15.0)
    stem_box = free & (np.abs(X) <= width) & (Z <= -8) & (Y >= -48) & (Y <= -5)
    stem = _component_at(stem_box, caff, (0.0, -25.0, -30.0))
    stem = fill_holes(stem)
    info['brainstem_seed'] = [0.0, -25.0, -30.0]

    # --- ventricles: CSF components that reach >= 15 mm deep, grown (6-connected) through
    # CSF that is >= 3 mm deep and >= 3 mm away from any AAL cortical region (which keeps the
    # interhemispheric fissure and the sulci out); cerebellar CSF is handled below
    aal_ctx = (aal > 0) & ~np.isin(aal, tuple(_AAL_DEEP) + _CEREBELLUM_AAL)
    near_ctx = _dilate(aal_ctx, 3)
    reach = csf & ~cereb & ~near_ctx & (depth >= 3)
    lab, _ = ndi.label(reach, structure=ndi.generate_binary_structure(3, 1))
    keep = np.unique(lab[reach & (depth >= 15)])
    vent = np.isin(lab, keep[keep > 0])
    # 3rd ventricle: midline slit between the thalami, below their top
    thal = np.isin(aal, (77, 78))
    tz = np.broadcast_to(Z, aal.shape)[thal]
    ty = np.broadcast_to(Y, aal.shape)[thal]
    z_top, y_lo, y_hi = float(np.percentile(tz, 75)), float(ty.min()), float(ty.max())
    x_mid = _midline_x(hemi, X)
    third = csf & (np.abs(X - x_mid) <= 2) & (Z <= z_top) & (Z >= -14) & (Y >= y_lo) \
        & (Y <= y_hi + 8)
    info['third_ventricle_box'] = {'x': [x_mid - 2, x_mid + 2], 'z': [-14, z_top],
                                   'y': [y_lo, y_hi + 8]}
    # inferior lateral ventricle: CSF within 3 mm of AAL hippocampus/amygdala, below z = -4 and
    # lateral (|x| >= 18), that is ventricle or enclosed by those regions
    mtl = np.isin(aal, (37, 38, 41, 42))
    inflat = csf & ~third & (Z <= -4) & (np.abs(X) >= 18) & _dilate(mtl, 3) & (vent | mtl)
    # 4th ventricle: CSF >= 3 mm deep, within 6 mm of the brain stem's back, inside the
    # closed cerebellum + brain stem, near the midline
    hull = fill_holes(_close(stem | cereb, 4))
    near_stem = _dilate(stem, 6)
    fourth = csf & hull & near_stem & (depth >= 3) & (np.abs(X - x_mid) <= 10) & (Z <= -15) \
        & (Z >= -55) & (Y >= -60) & (Y <= -25)
    fourth = _component_at_largest(fourth)
    info['midline_x'] = float(x_mid)

    put(third, 14, 'csf: 3rd ventricle box')
    put(fourth, 15, 'csf: 4th ventricle (between brain stem and cerebellum)')
    put(inflat, _sided(side, 5), 'csf: inferior lateral ventricle (near hippocampus/amygdala)')
    put(vent, _sided(side, 4), 'csf: lateral ventricle (deep CSF component)')

    # --- deep grey matter from AAL (any tissue, since AAL was drawn on this very brain;
    # CSF inside them was given to the ventricles above or becomes CSF below)
    for idx, lab_fs in _AAL_DEEP.items():
        put((aal == idx) & ~csf & brain, lab_fs, f'aal: {names[idx]}')

    # accumbens: not in AAL; AAL caudate/putamen voxels within 6 mm of (+-9.5, 12, -7) mm, about
    # where the nucleus accumbens sits in MNI space (e.g. the Harvard-Oxford subcortical atlas)
    acc_centre = np.sqrt((np.abs(X) - ACCUMBENS_MNI[0]) ** 2 + (Y - ACCUMBENS_MNI[1]) ** 2
                         + (Z - ACCUMBENS_MNI[2]) ** 2) <= ACCUMBENS_RADIUS
    striatum = np.isin(gen, (11, 12, 50, 51)) & acc_centre
    gen[striatum] = _sided(side, 26)[striatum]
    info.setdefault('rules', {})[ACCUMBENS_RULE] = int(striatum.sum())

    # --- cerebellum by tissue
    put(cereb & wm, _sided(side, 7), 'cerebellum region: WM -> cerebellar WM')
    put(cereb & gm, _sided(side, 8), 'cerebellum region: GM -> cerebellar cortex')
    # --- brain stem (any tissue)
    put(stem & ~csf, 16, 'brain stem heuristic')
    # --- ventral DC: free tissue below the thalamus, medial, above the brain stem
    vdc = brain & ~csf & (aal == 0) & (np.abs(X) <= 20) & (Y >= -32) & (Y <= 2) & (Z >= -20) \
        & (Z <= -2)
    put(vdc, _sided(side, 28), 'ventral DC box')
    # --- tissue left over whose nearest AAL region is cerebellar (peduncles, cerebellar
    # cortex outside AAL) -> cerebellum
    _, nearest = ndi.distance_transform_edt(aal == 0, return_indices=True)
    near_cb = np.isin(aal[tuple(nearest)], _CEREBELLUM_AAL)
    del nearest
    put(near_cb & wm, _sided(side, 7), 'WM nearest to AAL cerebellum -> cerebellar WM')
    put(near_cb & gm, _sided(side, 8), 'GM nearest to AAL cerebellum -> cerebellar cortex')
    # --- cerebrum by tissue
    put(gm, _sided(side, 3), 'GM -> cerebral cortex')
    put(wm, _sided(side, 2), 'WM -> cerebral WM')
    put(csf, 24, 'remaining CSF in the brain -> CSF')

    # --- back to the full grid
    gen_b, done_b = gen, done
    ch2, aal, brain = full['ch2'], full['aal'], full['brain']
    gen = np.zeros(full['shape'], np.int16)
    done = np.zeros(full['shape'], bool)
    gen[bb], done[bb] = gen_b, done_b

    # --- extra-cerebral CSF shell: dark voxels within 2 mm outside the brain mask
    dark = (means[3] + means[1]) / 2
    smooth = ndi.gaussian_filter(ch2, 1.0)
    shell = _dilate(brain, 2) & ~brain & ~done & (ch2 <= dark)
    gen[shell] = 24
    done[shell] = True
    info['rules']['dark shell <= 2 mm outside the brain -> CSF'] = int(shell.sum())

    # --- head: ch2 above background, slice-filled; k-means in 5 intensity classes
    bg = _background_threshold(ch2)
    head = _open(ch2 > bg, 1)
    head = largest_component(head)
    head = _close(head, 3)
    head = fill_holes(head, axial=True)  # per axial slice: nose, ear canals, sinuses stay head
    head |= brain | shell
    extra = head & ~done
    centres = _kmeans_hist(smooth[extra], len(HEAD_CLUSTER_LABELS))
    cl = np.argmin(np.abs(smooth[extra][:, None] - centres[None, :]), axis=1)
    gen_extra = np.asarray(HEAD_CLUSTER_LABELS, np.int16)[cl]
    gen[extra] = gen_extra
    done[extra] = True
    info['head_background_threshold'] = float(bg)
    info['head_cluster_centres'] = [float(c) for c in centres]
    info['rules']['head k-means'] = int(extra.sum())

    table = _colin27_table(aal, names, gen, brain, info)
    return {'labels': gen, 'affine': affine, 'table': table, 'info': info}


def _midline_x(hemi: np.ndarray, X: np.ndarray) -> float:
    """World x of the boundary between AAL's left and right regions (median over rows)."""
    xs = np.broadcast_to(X, hemi.shape)
    left = np.where(hemi < 0, xs, -np.inf).max(axis=0)
    right = np.where(hemi > 0, xs, np.inf).min(axis=0)
    ok = np.isfinite(left) & np.isfinite(right)
    return float(np.median((left[ok] + right[ok]) / 2)) if ok.any() else 0.0


def _component_at(mask: np.ndarray, affine: np.ndarray, point_mm) -> np.ndarray:
    """The connected component of ``mask`` nearest to a world point."""
    lab, n = ndi.label(mask)
    if n == 0:
        return mask
    ijk = np.rint(np.linalg.inv(affine) @ np.r_[point_mm, 1.0])[:3].astype(int)
    ijk = np.clip(ijk, 0, np.array(mask.shape) - 1)
    if lab[tuple(ijk)] > 0:
        return lab == lab[tuple(ijk)]
    _, idx = ndi.distance_transform_edt(lab == 0, return_indices=True)
    return lab == lab[tuple(idx[:, ijk[0], ijk[1], ijk[2]])]


def _component_at_largest(mask: np.ndarray) -> np.ndarray:
    return largest_component(mask) if mask.any() else mask


def _background_threshold(img: np.ndarray) -> float:
    """Threshold between the air and the head of an MR image.

    ch2 is already masked (air is exactly 0 and the darkest head voxels are 7-15), so an image
    whose air is mostly exact zeros is cut at 0.5; otherwise Otsu's threshold on the histogram.
    """
    if np.mean(img == 0) > 0.2:
        return 0.5
    v = np.clip(np.rint(img), 0, None).astype(np.int64).ravel()
    hist = np.bincount(v).astype(float)
    hist /= hist.sum()
    grid = np.arange(len(hist))
    w0 = np.cumsum(hist)
    m0 = np.cumsum(hist * grid)
    mt = m0[-1]
    with np.errstate(divide='ignore', invalid='ignore'):
        between = (mt * w0 - m0) ** 2 / (w0 * (1 - w0))
    between[~np.isfinite(between)] = 0
    return float(np.argmax(between[: len(hist) // 2]) + 0.5)


def _colin27_table(aal, names, gen, brain, info) -> list[dict]:
    rows = []
    # joint histogram AAL region x generation label in one pass
    inside = aal > 0
    joint = np.bincount(aal[inside].astype(np.int64) * 1024 + gen[inside].astype(np.int64),
                        minlength=(int(aal.max()) + 1) * 1024).reshape(-1, 1024)
    for idx in sorted(names):
        hist = joint[idx] if idx < joint.shape[0] else np.zeros(1024, np.int64)
        n = int(hist.sum())
        nominal = _aal_target(idx, names[idx])
        vals = np.nonzero(hist)[0]
        cnt = hist[vals]
        vermis = names[idx].startswith('Vermis')
        if vermis:
            targets = (8, 47)
        elif nominal in (11, 12, 50, 51):
            targets = (nominal, 26 if nominal in (11, 12) else 58)
        else:
            targets = (nominal,)
        kept = int(sum(hist[t] for t in targets))
        order = np.argsort(-cnt)
        others = [f'{int(vals[i])}:{cnt[i] / max(n, 1):.0%}' for i in order
                  if int(vals[i]) not in targets][:4]
        notes = []
        if vermis:
            notes.append('side of each voxel from the nearest AAL hemisphere region')
        if len(targets) == 2 and not vermis:
            notes.append(f'{int(hist[targets[1]])} voxels near the accumbens centre -> {targets[1]}')
        if others:
            notes.append('tissue rules win inside the region; other labels: ' + ', '.join(others))
        gen_lab = '8|47' if vermis else str(nominal)
        out_lab = '8|47' if vermis else str(GENERATION_TO_OUTPUT[nominal])
        out_name = ('Left-Cerebellum-Cortex / Right-Cerebellum-Cortex' if vermis
                    else OUTPUT_NAMES[GENERATION_TO_OUTPUT[nominal]])
        rows.append({'source': 'AAL', 'source_label': idx, 'source_name': names[idx],
                     'generation_label': gen_lab, 'output_label': out_lab, 'output_name': out_name,
                     'voxels': n, 'purity': round(kept / max(n, 1), 3), 'notes': '; '.join(notes)})
    rules = info.get('rules', {})
    derived = [
        ('ch2 tissue', 'WM', 'WM -> cerebral WM', '2|41', 'cerebral WM by hemisphere side'),
        ('ch2 tissue', 'GM', 'GM -> cerebral cortex', '3|42',
         'GM outside AAL deep regions, cerebellum, brain stem and ventral DC'),
        ('ch2 tissue', 'CSF', 'remaining CSF in the brain -> CSF', '24', 'sulcal and cisternal CSF'),
        ('ch2 tissue', 'CSF', 'csf: lateral ventricle (deep CSF component)', '4|43',
         ('CSF components reaching >= 15 mm deep, grown through CSF >= 3 mm deep and >= 3 mm '
         'from AAL cortex')),
        ('ch2 tissue', 'CSF', 'csf: inferior lateral ventricle (near hippocampus/amygdala)', '5|44',
         'ventricle or MTL-enclosed CSF within 3 mm of AAL hippocampus/amygdala, z <= -4, |x| >= 18'),
        ('ch2 tissue', 'CSF', 'csf: 3rd ventricle box', '14',
         ('CSF within 2 mm of the midline, y within the thalami (+8 mm ahead), '
         '-14 mm <= z <= 75th percentile of thalamus z')),
        ('ch2 tissue', 'CSF', 'csf: 4th ventricle (between brain stem and cerebellum)', '15',
         ('CSF >= 3 mm deep within 6 mm of the brain stem inside the closed brain stem + '
         'cerebellum, |x - midline| <= 10, -55 <= z <= -15, -60 <= y <= -25; largest component')),
        ('ch2 tissue', 'WM', 'cerebellum region: WM -> cerebellar WM', '7|46',
         'WM inside the closed AAL cerebellum + vermis'),
        ('ch2 tissue', 'GM', 'cerebellum region: GM -> cerebellar cortex', '8|47',
         'GM inside the closed AAL cerebellum + vermis (incl. non-AAL GM there)'),
        ('ch2 tissue', 'WM', 'WM nearest to AAL cerebellum -> cerebellar WM', '7|46',
         'left-over WM whose nearest AAL region is cerebellar (peduncles)'),
        ('ch2 tissue', 'GM', 'GM nearest to AAL cerebellum -> cerebellar cortex', '8|47',
         'left-over GM whose nearest AAL region is cerebellar'),
        ('geometry', 'brain stem', 'brain stem heuristic', '16',
         ('non-AAL non-CSF tissue, |x| <= 12 (z > -20) or 15 (below), z <= -8, -48 <= y <= -5, '
         'outside the cerebellum, connected to the pons at (0, -25, -30)')),
        ('geometry', 'ventral DC', 'ventral DC box', '28|60',
         'non-AAL non-CSF tissue left over in |x| <= 20, -32 <= y <= 2, -20 <= z <= -2'),
        ('geometry', 'accumbens', ACCUMBENS_RULE, '26|58',
         'AAL caudate/putamen voxels within 6 mm of (+-9.5, 12, -7) mm'),
        ('ch2 intensity', 'dark shell', 'dark shell <= 2 mm outside the brain -> CSF', '24',
         'voxels <= 2 mm outside the brain mask darker than the CSF/GM midpoint'),
    ]
    for src, slab, rule, g, note in derived:
        outs = '|'.join(str(GENERATION_TO_OUTPUT[int(v)]) for v in g.split('|'))
        rows.append({'source': src, 'source_label': slab, 'source_name': rule, 'generation_label': g,
                     'output_label': outs,
                     'output_name': ' / '.join(OUTPUT_NAMES[GENERATION_TO_OUTPUT[int(v)]]
                                               for v in g.split('|')),
                     'voxels': int(rules.get(rule, 0)), 'purity': '', 'notes': note})
    for i, (lab, centre) in enumerate(zip(HEAD_CLUSTER_LABELS, info['head_cluster_centres'])):
        rows.append({'source': 'ch2 head k-means', 'source_label': f'cluster{i + 1}',
                     'source_name': f'intensity centre {centre:.0f}', 'generation_label': lab,
                     'output_label': 0, 'output_name': OUTPUT_NAMES[0],
                     'voxels': int((gen == lab).sum()), 'purity': '',
                     'notes': 'extra-cerebral class; label chosen by rank of SynthSeg T1 prior means'})
    rows.append({'source': 'ch2', 'source_label': 'air', 'source_name': 'outside the head',
                 'generation_label': 0, 'output_label': 0, 'output_name': OUTPUT_NAMES[0],
                 'voxels': int((gen == 0).sum()), 'purity': '', 'notes': 'ch2 == 0'})
    return rows


@functools.lru_cache(maxsize=1)
def _colin27() -> dict:
    paths = [_mricron(n) for n in ('ch2.nii.gz', 'ch2bet.nii.gz', 'aal.nii.gz', 'aal.nii.txt')]
    return _cached('colin27', paths, _build_colin27)


def _image(labels: np.ndarray, affine: np.ndarray, kind: str):
    import nibabel as nib

    if kind not in ('generation', 'output'):
        raise ValueError(f"kind must be 'generation' or 'output', not {kind!r}")
    data = labels if kind == 'generation' else _to_output(labels)
    img = nib.Nifti1Image(np.asarray(data, np.int16), affine)
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
    return img


def colin27_labels(kind: str = 'generation'):
    """Colin27 label map on the ch2 grid (181x217x181, 1 mm, RAS) as a nibabel image."""
    d = _colin27()
    return _image(d['labels'], d['affine'], kind)


def colin27_ground_truth(reference=None):
    """Colin27 in output labels (FreeSurfer numbering), the truth for the real ch2 head.

    On the ch2 grid, or resampled (nearest neighbour, world coordinates) onto ``reference``
    (a nibabel image or path) when given.
    """
    img = colin27_labels('output')
    if reference is None:
        return img
    import nibabel as nib

    ref = nib.load(str(reference)) if isinstance(reference, (str, Path)) else reference
    data = _resample_labels(np.asarray(img.dataobj), img.affine, ref.shape[:3], ref.affine)
    return _image_out(data, ref.affine)


def _image_out(data, affine):
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(data, np.int16), affine)
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
    return img


def _label_map(labels: np.ndarray, affine: np.ndarray, name: str, margin: int = 4) -> LabelMap:
    return label_map_from_array(labels, affine, name, margin=margin)


def colin27_label_map() -> LabelMap:
    """Colin27 as a :class:`LabelMap` for the :class:`Synthesizer`."""
    d = _colin27()
    return _label_map(d['labels'], d['affine'], 'colin27')


# ---------------------------------------------------------------------------- jhu189
#: Parcels whose majority label covers less than this fraction of their voxels are flagged.
JHU_PURITY_FLAG = 0.5
#: A parcel with at least this fraction of its voxels within 2 mm of the outside of the JHU
#: brain is superficial (a gyral parcel); deep white-matter parcels never reach it.
JHU_SUPERFICIAL = 0.05


def _jhu_pairs(centroids: dict[int, np.ndarray], sizes: dict[int, int]) -> dict[int, int]:
    """Left/right homologous parcels: mutual nearest neighbours after mirroring x (< 8 mm apart,
    sizes within a factor 2)."""
    ids = sorted(centroids)
    cen = np.array([centroids[i] for i in ids])
    mir = cen * np.array([-1.0, 1.0, 1.0])
    dist = np.linalg.norm(mir[:, None, :] - cen[None, :, :], axis=2)
    size = np.array([sizes[i] for i in ids], float)
    ratio = size[:, None] / size[None, :]
    dist[(ratio < 0.5) | (ratio > 2)] = np.inf  # homologues have similar sizes
    np.fill_diagonal(dist, np.inf)
    best = dist.argmin(axis=1)
    return {ids[a]: ids[b] for a, b in enumerate(best) if best[b] == a and dist[a, b] < 8}


def _build_jhu189() -> dict:
    """Each jhu189 parcel -> the output structure it overlaps most in the Colin27 map.

    Rules, in order, on the parcel's overlap pooled with its left/right homologue (labels
    folded to the left side):

    1. *gyral parcel*: superficial (>= 5 % of voxels within 2 mm of the outside of the JHU
       brain or of the midline plane), majority cortex/WM/CSF/background of the cerebrum (or
       of the cerebellum) and >= 25 % Colin27 cortex (cerebellar cortex). JHU's gyral parcels
       hold a gyrus's cortex with its superficial white matter (their overlap with Colin27
       is about 45 % cortex, 40 % WM), so each is split: its
       outermost voxels (depth from the brain's outside and the midline plane) become cerebral
       cortex, the rest cerebral WM, with the cortex share equal to the pair's Colin27
       cortex / (cortex + WM) overlap (the cerebellar hemispheres likewise, into cerebellar
       cortex and WM). JHU has no sulci, so this cortex is a smooth layer;
    2. majority outside Colin27's brain (background) -> the majority brain structure;
       (unlabelled JHU voxels enclosed by the brain after a 3 mm closing become CSF 24.)
    3. otherwise the majority structure; when it covers less than 50 % of the pair's voxels
       the row is flagged ``LOW PURITY``.

    The table's ``purity`` is the fraction of the row's voxels that carry the same label
    (side included) in the resampled Colin27 map.

    Side: the member of a pair whose voxels lie mostly at x < 0 gets the left label; unpaired
    lateral parcels go by their majority of x, or are split at x = 0 when 20-80 % of their
    voxels lie on each side.
    """
    import nibabel as nib

    img = nib.as_closest_canonical(nib.load(str(_mricron('jhu189.nii.gz'))))
    jhu = np.rint(np.asarray(img.dataobj)).astype(np.int16)
    affine = img.affine
    colin = _colin27()
    ref_sided = _to_output(_resample_labels(colin['labels'], colin['affine'], jhu.shape, affine))
    ref = _to_left(ref_sided)
    X, Y, Z = _world(jhu.shape, affine)
    xb = np.broadcast_to(X, jhu.shape)
    # depth: distance to the outside of the JHU brain or to the midline plane
    depth = np.maximum(ndi.distance_transform_edt((jhu > 0) & (xb < 0)),
                       ndi.distance_transform_edt((jhu > 0) & (xb > 0)))
    outside = (jhu > 0) & (depth <= 2)
    parcels = sorted(int(v) for v in np.unique(jhu) if v > 0)
    objects = ndi.find_objects(jhu.astype(np.int64))
    comp, cen, size, left_frac, superficial = {}, {}, {}, {}, {}
    for p in parcels:
        sl = objects[p - 1]
        region = jhu[sl] == p
        labs, cnt = np.unique(ref[sl][region], return_counts=True)
        comp[p] = dict(zip(labs.tolist(), cnt.tolist()))
        size[p] = int(region.sum())
        pts = [np.broadcast_to(a, jhu.shape)[sl][region] for a in (X, Y, Z)]
        cen[p] = np.array([float(v.mean()) for v in pts])
        left_frac[p] = float(np.mean(pts[0] < 0))
        superficial[p] = float(np.mean(outside[sl][region]))
    pairs = _jhu_pairs(cen, size)
    gen = np.zeros(jhu.shape, np.int16)
    rows = []
    for p in parcels:
        q = pairs.get(p)
        pooled = dict(comp[p])
        if q is not None:
            for k, v in comp[q].items():
                pooled[k] = pooled.get(k, 0) + v
        total = sum(pooled.values())
        frac = {k: v / total for k, v in pooled.items()}
        best = max(frac, key=frac.get)
        note = [f'pooled with parcel {q}'] if q is not None else []
        region_sl = objects[p - 1]
        region = jhu[region_sl] == p
        pair_ctx = next(((c, w) for c, w in ((3, 2), (8, 7))
                         if best in (0, 24, c, w) and frac.get(c, 0) >= 0.25), None)
        if superficial[p] >= JHU_SUPERFICIAL and pair_ctx is not None:
            c_lab, w_lab = pair_ctx
            share = frac.get(c_lab, 0) / max(frac.get(c_lab, 0) + frac.get(w_lab, 0), 1e-6)
            d = depth[region_sl][region]
            cut = np.quantile(d, share)
            outer = d <= cut
            labs_p = np.where(outer, c_lab, w_lab).astype(np.int16)
            sided = labs_p if left_frac[p] >= 0.5 else np.where(
                outer, _LEFT_TO_RIGHT[c_lab], _LEFT_TO_RIGHT[w_lab]).astype(np.int16)
            block = gen[region_sl]
            block[region] = sided
            got = ref_sided[region_sl][region]
            for part, lab in (('outer part', int(sided[outer][0]) if outer.any() else None),
                              ('inner part', int(sided[~outer][0]) if (~outer).any() else None)):
                if lab is None:
                    continue
                m = sided == lab
                rows.append(_jhu_row(p, lab, int(m.sum()), float(np.mean(got[m] == lab)), '; '.join(
                    note + [(f'gyral parcel ({frac.get(c_lab, 0):.0%} {OUTPUT_NAMES[c_lab][5:]}, '
                            f'{frac.get(w_lab, 0):.0%} {OUTPUT_NAMES[w_lab][5:]} in '
                            f'Colin27): {part} (depth <= {cut:.1f} mm is cortex, '
                            f'{share:.0%} of the parcel)')])))
            continue
        if best == 0:
            brain = {k: v for k, v in frac.items() if k != 0}
            new = max(brain, key=brain.get) if brain else 24
            note.append(f'majority outside the Colin27 brain ({frac[0]:.0%}) -> {OUTPUT_NAMES[new]}')
            best = new
        pooled_purity = frac.get(best, 0.0)
        if pooled_purity < JHU_PURITY_FLAG:
            note.insert(0, f'LOW PURITY (< {JHU_PURITY_FLAG:.0%})')
        if q is not None:
            note.append(f'pair purity {pooled_purity:.0%}')
        if best in _LEFT_TO_RIGHT:
            if q is not None and (left_frac[p] >= 0.5) != (left_frac[q] >= 0.5):
                lab = best if left_frac[p] >= 0.5 else _LEFT_TO_RIGHT[best]
                note.append(f'{left_frac[p]:.0%} of voxels at x<0')
            elif 0.2 < left_frac[p] < 0.8:
                side = _side_from_x(xb[region_sl], np.broadcast_to(Y, jhu.shape)[region_sl],
                                    np.broadcast_to(Z, jhu.shape)[region_sl])
                labs_vox = np.where(side < 0, best, _LEFT_TO_RIGHT[best]).astype(np.int16)
                gen[region_sl][region] = labs_vox[region]
                got = ref_sided[region_sl][region]
                for part, lab in (('left part', best), ('right part', _LEFT_TO_RIGHT[best])):
                    m = labs_vox[region] == lab
                    why = (f'across the midline ({left_frac[p]:.0%} at x<0): split at x = 0, '
                           f'{part}')
                    purity = float(np.mean(got[m] == lab)) if m.any() else 0.0
                    rows.append(_jhu_row(p, lab, int(m.sum()), purity, '; '.join(note + [why])))
                continue
            else:
                lab = best if left_frac[p] >= 0.5 else _LEFT_TO_RIGHT[best]
                note.append(f'{left_frac[p]:.0%} of voxels at x<0')
        else:
            lab = best
        gen[region_sl][region] = lab
        purity = float(np.mean(ref_sided[region_sl][region] == lab))
        rows.append(_jhu_row(p, lab, size[p], purity, '; '.join(note)))
    # JHU leaves cisterns and fissures unlabelled: background enclosed by the brain -> CSF
    closed = fill_holes(_close(jhu > 0, 3))
    holes = closed & (jhu == 0)
    gen[holes] = 24
    rows.append({'source': 'jhu189', 'source_label': 0, 'source_name': 'unlabelled, enclosed',
                 'generation_label': 24, 'output_label': 24, 'output_name': OUTPUT_NAMES[24],
                 'voxels': int(holes.sum()),
                 'purity': round(float(np.mean(ref_sided[holes] == 24)), 3) if holes.any() else '',
                 'notes': 'background inside the brain after a 3 mm closing and hole filling '
                          '(cisterns, fissures)'})
    rows.append({'source': 'jhu189', 'source_label': 0, 'source_name': 'unlabelled, outside',
                 'generation_label': 0, 'output_label': 0, 'output_name': OUTPUT_NAMES[0],
                 'voxels': int(((jhu == 0) & ~holes).sum()), 'purity': '',
                 'notes': 'no extra-cerebral classes in jhu189'})
    info = {'pairs': {str(k): v for k, v in pairs.items()},
            'bbox_world_mm': [[float(c) for c in (affine @ np.r_[ijk, 1.0])[:3]]
                              for ijk in (np.argwhere(jhu > 0).min(0), np.argwhere(jhu > 0).max(0))]}
    return {'labels': gen, 'affine': affine, 'table': rows, 'info': info}


def _jhu_row(p, lab, n, purity, note):
    return {'source': 'jhu189', 'source_label': p, 'source_name': f'parcel {p}',
            'generation_label': lab, 'output_label': GENERATION_TO_OUTPUT[lab],
            'output_name': OUTPUT_NAMES[GENERATION_TO_OUTPUT[lab]], 'voxels': n,
            'purity': round(purity, 3), 'notes': note}


@functools.lru_cache(maxsize=1)
def _jhu189() -> dict:
    paths = [_mricron(n) for n in ('jhu189.nii.gz', 'ch2.nii.gz', 'ch2bet.nii.gz', 'aal.nii.gz')]
    return _cached('jhu189', paths, _build_jhu189)


def jhu189_labels(kind: str = 'generation'):
    """jhu189 mapped onto the label set, on its own grid reoriented to RAS."""
    d = _jhu189()
    return _image(d['labels'], d['affine'], kind)


def jhu189_label_map() -> LabelMap:
    """jhu189 as a :class:`LabelMap` for the :class:`Synthesizer`."""
    d = _jhu189()
    return _label_map(d['labels'], d['affine'], 'jhu189')


# ---------------------------------------------------------------------------- ICBM 2009a
def _build_icbm() -> dict:
    import nibabel as nib

    t1i = nib.as_closest_canonical(nib.load(str(_icbm('T1w'))))
    affine = t1i.affine
    t1 = np.asarray(t1i.dataobj, np.float32)
    gmp = np.asarray(nib.as_closest_canonical(nib.load(str(_icbm('GM')))).dataobj, np.float32)
    wmp = np.asarray(nib.as_closest_canonical(nib.load(str(_icbm('WM')))).dataobj, np.float32)
    scale = max(float(gmp.max()), float(wmp.max()), 1.0)
    gmp, wmp = gmp / scale, wmp / scale
    brain = largest_component_filled(t1 > 0, fill_first=True)
    csf = brain & (gmp + wmp < 0.5)
    gm = brain & ~csf & (gmp >= wmp)
    wm = brain & ~csf & (wmp > gmp)
    X, Y, Z = _world(t1.shape, affine)
    side = _side_from_x(np.broadcast_to(X, t1.shape), np.broadcast_to(Y, t1.shape),
                        np.broadcast_to(Z, t1.shape))

    colin = _colin27()
    ref = _to_output(_resample_labels(colin['labels'], colin['affine'], t1.shape, affine))
    # nearest Colin structure (not CSF/ventricle/background) for every ICBM voxel
    struct = ~np.isin(ref, (0, 24, 4, 5, 14, 15, 43, 44))
    _, idx = ndi.distance_transform_edt(~struct, return_indices=True)
    near_l = _to_left(ref[tuple(idx)])
    del idx
    ref_l = _to_left(ref)

    gen = np.zeros(t1.shape, np.int16)
    rows: list[dict] = []

    def put(mask, left_label, source, rule, sided=True):
        m = mask & (gen == 0)
        lateral = sided and left_label in _LEFT_TO_RIGHT
        gen[m] = _sided(side, left_label)[m] if lateral else left_label
        labs = [left_label, _LEFT_TO_RIGHT[left_label]] if lateral else [left_label]
        rows.append({'source': 'icbm2009a', 'source_label': source, 'source_name': rule,
                     'generation_label': '|'.join(map(str, labs)),
                     'output_label': '|'.join(str(GENERATION_TO_OUTPUT[v]) for v in labs),
                     'output_name': ' / '.join(OUTPUT_NAMES[GENERATION_TO_OUTPUT[v]] for v in labs),
                     'voxels': int(m.sum()),
                     'purity': round(float(np.mean(ref[m] == gen[m])), 3) if m.any() else '',
                     'notes': 'side by x sign' if lateral else ''})

    tissue = gm | wm
    # ventricles: ICBM CSF within 4 mm of a Colin27 ventricle takes the nearest one; other CSF -> 24
    vref = np.isin(ref_l, (4, 5, 14, 15))
    dist, idx = ndi.distance_transform_edt(~vref, return_indices=True)
    near_v = ref_l[tuple(idx)]
    del idx
    for v in (14, 15, 5, 4):
        put(csf & (dist <= 4) & (near_v == v), v, 'CSF',
            f'CSF within 4 mm of the Colin27 {OUTPUT_NAMES[v]}')
    put(csf, 24, 'CSF', 'other CSF')
    # deep grey matter: only where Colin's own voxel has the structure
    for v in (10, 11, 12, 13, 17, 18, 26, 28):
        put(tissue & (ref_l == v), v, 'GM/WM', f'GM or WM where Colin27 has {OUTPUT_NAMES[v]}')
    put(tissue & (near_l == 16), 16, 'GM/WM', 'GM or WM nearest to the Colin27 brain stem')
    put(wm & np.isin(near_l, (7, 8)), 7, 'WM', 'WM nearest to the Colin27 cerebellum')
    put(gm & np.isin(near_l, (7, 8)), 8, 'GM', 'GM nearest to the Colin27 cerebellum')
    put(gm, 3, 'GM', 'other GM')
    put(wm, 2, 'WM', 'other WM')
    rows.append({'source': 'icbm2009a', 'source_label': 'background',
                 'source_name': 'outside the T1 brain', 'generation_label': '0', 'output_label': '0',
                 'output_name': OUTPUT_NAMES[0], 'voxels': int((gen == 0).sum()), 'purity': '',
                 'notes': 'the template is brain-extracted: no extra-cerebral classes'})
    # purity here: the fraction of the row's voxels with the same label in Colin27 (resampled)
    info = {'tissue': {'CSF': 'GM+WM probability < 0.5 inside the T1 brain (T1 > 0)',
                       'GM': 'GM probability >= WM probability, GM+WM >= 0.5',
                       'WM': 'WM probability > GM probability, GM+WM >= 0.5'}}
    return {'labels': gen, 'affine': affine, 'table': rows, 'info': info}


def _to_left(a: np.ndarray) -> np.ndarray:
    lut = np.arange(max(GENERATION_LABELS) + 1, dtype=np.int16)
    for l, r in LR_PAIRS.items():
        lut[r] = l
    return lut[a.astype(np.int64)]


@functools.lru_cache(maxsize=1)
def _icbm2009a() -> dict:
    paths = [_icbm(w) for w in ('T1w', 'GM', 'WM')] + [
        _mricron(n) for n in ('ch2.nii.gz', 'ch2bet.nii.gz', 'aal.nii.gz')]
    return _cached('icbm2009a', paths, _build_icbm)


def icbm_labels(kind: str = 'generation'):
    """ICBM 2009a (nonlinear symmetric) mapped onto the label set, on its own grid."""
    d = _icbm2009a()
    return _image(d['labels'], d['affine'], kind)


def icbm_label_map() -> LabelMap:
    """ICBM 2009a as a :class:`LabelMap` for the :class:`Synthesizer`."""
    d = _icbm2009a()
    return _label_map(d['labels'], d['affine'], 'icbm2009a')


def extra_label_maps() -> list[LabelMap]:
    """The three extra anatomies, in a fixed order (Colin27, jhu189, ICBM 2009a)."""
    return [colin27_label_map(), jhu189_label_map(), icbm_label_map()]


# ---------------------------------------------------------------------------- tables and volumes
_TABLE_COLUMNS = ('source', 'source_label', 'source_name', 'generation_label', 'output_label',
                  'output_name', 'voxels', 'purity', 'notes')
_ANATOMIES = {'colin27': ('colin27_aal.tsv', _colin27), 'jhu189': ('jhu189.tsv', _jhu189),
              'icbm2009a': ('icbm.tsv', _icbm2009a)}


def mapping_table(name: str) -> list[dict]:
    """Rows (source label -> generation/output label, voxels, purity, notes) of one anatomy."""
    if name not in _ANATOMIES:
        raise ValueError(f'unknown anatomy {name!r}; known: {", ".join(_ANATOMIES)}')
    return [dict(r) for r in _ANATOMIES[name][1]()['table']]


def _tsv(rows: list[dict], columns: Sequence[str]) -> str:
    lines = ['\t'.join(columns)]
    for r in rows:
        lines.append('\t'.join(str(r.get(c, '')).replace('\t', ' ') for c in columns))
    return '\n'.join(lines) + '\n'


def label_volumes(labels: np.ndarray, affine: np.ndarray) -> dict[int, float]:
    """Volume (mm^3) of every output label of a generation-label (or output-label) array."""
    out = _to_output(labels)
    vox = abs(float(np.linalg.det(np.asarray(affine)[:3, :3])))
    counts = np.bincount(out.ravel().astype(np.int64), minlength=max(OUTPUT_LABELS) + 1)
    return {lab: float(counts[lab] * vox) for lab in OUTPUT_LABELS}


def synthseg_mean_volumes(folder: str | Path) -> dict[int, tuple[float, float]]:
    """Mean and SD of every output label's volume (mm^3) over SynthSeg's training label maps."""
    import nibabel as nib

    vols = []
    for path in sorted(Path(folder).glob('*.nii*')):
        img = nib.load(str(path))
        data = np.rint(np.asarray(img.dataobj)).astype(np.int64)
        vols.append(label_volumes(data, img.affine))
    if not vols:
        raise FileNotFoundError(f'no label maps in {folder}')
    return {lab: (float(np.mean([v[lab] for v in vols])), float(np.std([v[lab] for v in vols])))
            for lab in OUTPUT_LABELS}


def read_volume_table(path: str | Path | None = None) -> dict[int, dict[str, str]]:
    """The committed ``synthseg_volumes.tsv`` (or ``path``) as {output label: row}."""
    path = Path(path) if path else MAPPING_DIR / 'synthseg_volumes.tsv'
    lines = path.read_text().splitlines()
    head = lines[0].split('\t')
    rows = [dict(zip(head, line.split('\t'))) for line in lines[1:] if line.strip()]
    return {int(r['output_label']): r for r in rows}


def write_mapping_tables(outdir: str | Path = MAPPING_DIR, synthseg_dir: str | Path | None = None
                         ) -> list[Path]:
    """Write the mapping tables (``colin27_aal.tsv``, ``jhu189.tsv``, ``icbm.tsv``) and
    ``volumes.tsv`` (each anatomy's output-label volumes and their ratio to the SynthSeg mean).

    ``synthseg_dir`` (SynthSeg's training label maps) recomputes ``synthseg_volumes.tsv``;
    without it the committed one is used.
    """
    from ..io import atomic_write_text

    outdir = Path(outdir)
    written = []
    for name, (fname, getter) in _ANATOMIES.items():
        written.append(atomic_write_text(outdir / fname, _tsv(getter()['table'], _TABLE_COLUMNS)))
    ref_path = outdir / 'synthseg_volumes.tsv'
    if synthseg_dir is not None:
        ref = synthseg_mean_volumes(synthseg_dir)
        n = len(list(Path(synthseg_dir).glob('*.nii*')))
        rows = [{'output_label': lab, 'output_name': OUTPUT_NAMES[lab], 'mean_mm3': f'{m:.0f}',
                 'sd_mm3': f'{s:.0f}', 'n_maps': n} for lab, (m, s) in ref.items()]
        written.append(atomic_write_text(ref_path, _tsv(rows, ('output_label', 'output_name',
                                                                'mean_mm3', 'sd_mm3', 'n_maps'))))
    ref_rows = read_volume_table(ref_path if ref_path.exists() else None)
    vols = {name: label_volumes(getter()['labels'], getter()['affine'])
            for name, (_, getter) in _ANATOMIES.items()}
    rows = []
    for lab in OUTPUT_LABELS:
        mean = float(ref_rows[lab]['mean_mm3'])
        row = {'output_label': lab, 'output_name': OUTPUT_NAMES[lab], 'synthseg_mean_mm3': f'{mean:.0f}'}
        for name in _ANATOMIES:
            row[f'{name}_mm3'] = f'{vols[name][lab]:.0f}'
            # background depends on the grid, not the anatomy: no ratio
            row[f'{name}_ratio'] = f'{vols[name][lab] / mean:.2f}' if mean > 0 and lab else ''
        rows.append(row)
    cols = ['output_label', 'output_name', 'synthseg_mean_mm3'] + [
        f'{n}_{k}' for n in _ANATOMIES for k in ('mm3', 'ratio')]
    written.append(atomic_write_text(outdir / 'volumes.tsv', _tsv(rows, cols)))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m keyprep.pipeline.synth.anatomies``: build (or load) the anatomies, write tables."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument('--outdir', default=str(MAPPING_DIR))
    ap.add_argument('--synthseg', default=None,
                    help="SynthSeg's training label maps, to recompute the reference volumes")
    args = ap.parse_args(argv)
    for path in write_mapping_tables(args.outdir, args.synthseg):
        print(path)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
