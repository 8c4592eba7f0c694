"""jhu189 (``mricron-data``, 189 unnamed parcels): each parcel, pooled with its homologue,
becomes the Colin27 structure it overlaps most; gyral parcels split by depth.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage as ndi

from ...masks import fill_holes
from ..generator import LabelMap
from ..labels import GENERATION_TO_OUTPUT, OUTPUT_NAMES
from .colin27 import _colin27
from .common import (
    _LEFT_TO_RIGHT,
    _cached,
    _close,
    _image,
    _label_map,
    _mricron,
    _resample_labels,
    _side_from_x,
    _to_left,
    _to_output,
    _world,
)

__all__ = ['JHU_PURITY_FLAG', 'JHU_SUPERFICIAL', 'jhu189_label_map', 'jhu189_labels']


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
