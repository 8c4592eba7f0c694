"""Colin27 (``ch2``, ``ch2bet``, AAL from Debian's ``mricron-data``) in the generation label
space: AAL regions, a tissue segmentation, geometric rules, k-means head classes.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from ...masks import fill_holes, largest_component, largest_component_filled
from ..generator import LabelMap
from ..labels import GENERATION_TO_OUTPUT, OUTPUT_NAMES
from .common import (
    _bbox,
    _cached,
    _close,
    _dilate,
    _image,
    _image_out,
    _kmeans_hist,
    _label_map,
    _mricron,
    _open,
    _resample_labels,
    _sided,
    _world,
)

__all__ = [
    'ACCUMBENS_MNI', 'ACCUMBENS_RADIUS', 'ACCUMBENS_RULE', 'HEAD_CLUSTER_LABELS',
    'colin27_ground_truth', 'colin27_label_map', 'colin27_labels',
]


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


def _colin27_tissue(ch2: np.ndarray, affine: np.ndarray, brain: np.ndarray) -> np.ndarray:
    from ...anatomy import tissue_segmentation

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


def colin27_label_map() -> LabelMap:
    """Colin27 as a :class:`LabelMap` for the :class:`Synthesizer`."""
    d = _colin27()
    return _label_map(d['labels'], d['affine'], 'colin27')
