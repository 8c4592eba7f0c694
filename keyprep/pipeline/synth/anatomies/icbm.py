"""ICBM 2009a (``nilearn``): tissue by maximum probability, deep structures, brain stem,
cerebellum and ventricles from the Colin27 map resampled onto it.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage as ndi

from ...masks import largest_component_filled
from ..generator import LabelMap
from ..labels import GENERATION_TO_OUTPUT, OUTPUT_NAMES
from .colin27 import _colin27
from .common import (
    _LEFT_TO_RIGHT,
    _cached,
    _icbm,
    _image,
    _label_map,
    _mricron,
    _resample_labels,
    _side_from_x,
    _sided,
    _to_left,
    _to_output,
    _world,
)

__all__ = ['icbm_label_map', 'icbm_labels']


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
