"""Plausibility checks of the label network's own output (never silently wrong).

A network applied at a wrong pose, or to an image it cannot read, still returns labels. These
checks, on the labels of the network grid (whose axes are the anatomy's RAS axes for the pose
that was used), catch that:

* ``brain_volume``: brain tissue (labels other than background and extra-cerebral CSF)
  between :data:`BRAIN_CM3` cm³;
* ``structures``: at least :data:`MIN_STRUCTURES` of the 32 structures present;
* ``connected``: at least 90 % of the brain in one connected component;
* ``left_right``: the left-hemisphere structures lie left (smaller x) of their right
  homologues, by at least 10 mm;
* ``superior_inferior``: the cerebral white matter and cortex lie at least 15 mm above the
  brain stem and the cerebellum;
* ``anterior_posterior``: the caudate and putamen lie at least 10 mm in front of the
  cerebellum;
* ``intensity_fit`` (with the network's input image): the fraction of the brain's intensity
  variance the labels explain, at least :data:`MIN_INTENSITY_FIT`. With the step-25000
  network it separates labels at the right pose from labels at a wrong one
  (`benchmarks/results/intensity_fit_eval.md`: the 24 held-out validation volumes, T1/T2/
  PD/FLAIR-like with and without skull, at their pose and with the header rotated by 90
  degrees about x or y), which the orientation checks alone do not: several labellings 90
  degrees off passed every other check with structure Dice 0.04. Measured: right pose
  0.239-0.605 (24 labellings), wrong pose 0.036-0.224 (48, of which 13 passed every other
  check); the bound 0.25 catches every wrong one and flags one right labelling (a FLAIR-like
  head with skull, 0.239), whose labels are kept: when no attempt passes, the one with the
  fewest failures and then the highest fit is returned. (With the step-7500
  network it was 0.15-0.17 at the right pose, too low to gate.) It counts as an orientation
  check: its failure starts the pose search;
* ``mask_agreement`` (with a reference brain mask, e.g. deepbet's): Dice of the label
  network's brain against it at least :data:`MIN_MASK_DICE`.

Thresholds are loose on purpose: they separate anatomy from garbage, not good from better.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .labels import LR_PAIRS

__all__ = ['LabelCheck', 'check_labels', 'intensity_fit', 'BRAIN_CM3', 'MIN_STRUCTURES', 'MIN_MASK_DICE',
           'MIN_INTENSITY_FIT']

BRAIN_CM3 = (500.0, 2500.0)
MIN_STRUCTURES = 26
MIN_MASK_DICE = 0.75
MIN_INTENSITY_FIT = 0.25
_NOT_BRAIN = (0, 24)
_CEREBRUM = (2, 3, 41, 42)
_INFERIOR = (16, 7, 8, 46, 47)
_ANTERIOR = (11, 12, 50, 51)
_POSTERIOR = (7, 8, 46, 47)


@dataclass
class LabelCheck:
    ok: bool
    failed: list[str] = field(default_factory=list)
    values: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {'ok': self.ok, 'failed': list(self.failed), 'values': dict(self.values)}


def _centroid(labels: np.ndarray, which, zooms) -> np.ndarray | None:
    sel = np.isin(labels, which)
    if not sel.any():
        return None
    return np.argwhere(sel).mean(0) * zooms


def intensity_fit(labels: np.ndarray, image: np.ndarray) -> float:
    """Fraction of the intensity variance inside the brain explained by the labels (R² of a
    one-way ANOVA over the brain structures): high where the labels follow the image's
    boundaries, whatever the contrast, low for labels placed at a wrong pose.

    >>> lab = np.repeat([2, 3], 50); img = np.repeat([1.0, 0.0], 50)
    >>> round(intensity_fit(lab, img), 3), round(intensity_fit(lab, img[::-1].copy() * 0 + np.tile([0.0, 1.0], 50)), 3)
    (1.0, 0.0)
    """
    sel = ~np.isin(labels, _NOT_BRAIN)
    if sel.sum() < 10:
        return 0.0
    lab, val = labels[sel].astype(np.int64), image[sel].astype(np.float64)
    total = val.var() * val.size
    if total <= 0:
        return 0.0
    _, inv = np.unique(lab, return_inverse=True)
    n = np.bincount(inv)
    means = np.bincount(inv, val) / n
    between = float((n * (means - val.mean()) ** 2).sum())
    return between / float(total)


def check_labels(labels: np.ndarray, zooms=(1.0, 1.0, 1.0), reference_mask: np.ndarray | None = None,
                 image: np.ndarray | None = None) -> LabelCheck:
    """Check labels (FreeSurfer numbering) on a grid whose axes point R, A, S (voxel sizes
    ``zooms`` mm); ``reference_mask`` and the network's input ``image`` on the same grid."""
    zooms = np.asarray(zooms, dtype=float)
    failed, values = [], {}
    if image is not None:
        fit = intensity_fit(labels, image)
        values['intensity_fit'] = round(fit, 3)
        if fit < MIN_INTENSITY_FIT:
            failed.append('intensity_fit')
    brain = ~np.isin(labels, _NOT_BRAIN)
    vol = float(brain.sum() * np.prod(zooms) / 1000.0)
    values['brain_cm3'] = round(vol, 1)
    if not BRAIN_CM3[0] <= vol <= BRAIN_CM3[1]:
        failed.append('brain_volume')
    present = len(set(np.unique(labels).tolist()) - {0})
    values['structures'] = present
    if present < MIN_STRUCTURES:
        failed.append('structures')
    if brain.any():
        comp, n = ndimage.label(brain)
        largest = float(np.bincount(comp.ravel())[1:].max()) / float(brain.sum()) if n else 0.0
    else:
        largest = 0.0
    values['largest_component'] = round(largest, 3)
    if largest < 0.9:
        failed.append('connected')
    # orientation: (check, value, structures that must lie further along ``axis``, the
    # others, axis of the RAS grid, minimum distance in mm)
    for name, key, ahead, behind, axis, min_mm in (
            ('left_right', 'right_minus_left_mm', list(LR_PAIRS.values()), list(LR_PAIRS), 0, 10.0),
            ('superior_inferior', 'cerebrum_above_mm', _CEREBRUM, _INFERIOR, 2, 15.0),
            ('anterior_posterior', 'striatum_anterior_mm', _ANTERIOR, _POSTERIOR, 1, 10.0)):
        a, b = _centroid(labels, ahead, zooms), _centroid(labels, behind, zooms)
        if a is None or b is None:
            failed.append(name)
            continue
        values[key] = round(float(a[axis] - b[axis]), 1)
        if a[axis] - b[axis] < min_mm:
            failed.append(name)
    if reference_mask is not None:
        ref = reference_mask > 0
        denom = int(ref.sum() + brain.sum())
        dice = 2.0 * float((ref & brain).sum()) / denom if denom else 0.0
        values['mask_dice'] = round(dice, 3)
        if dice < MIN_MASK_DICE:
            failed.append('mask_agreement')
    return LabelCheck(ok=not failed, failed=failed, values=values)
