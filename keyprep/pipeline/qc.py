"""Registration QC metrics: Dice per label, Jacobian statistics, pass/warn/fail status.

The Dice that sets the status is the mean *structure* Dice: the mean over the label
network's 32 structures (:data:`keyprep.pipeline.synth.labels.BRAIN_OUTPUT_LABELS`)
present in the target's labels. The tissue-class Dice (GM/WM/CSF) is reported beside it
(and sets the status only when no structure labels exist, e.g. for rows computed by code
that does not pass them).

Thresholds (documented in the README and in the QC tables' JSON sidecars):

* ``fail`` if the mean Dice is below its fail threshold (tissue classes: ``DICE_FAIL``
  0.40; the 32 structures: ``STRUCTURE_DICE_FAIL`` 0.30), or if more than ``NEG_FAIL``
  (1 %) of the brain has a non-positive Jacobian determinant (folding), or the minimum
  Jacobian of a linear transform is non-positive (a reflection);
* ``warn`` if the mean Dice is below its warn threshold (tissue: ``DICE_WARN`` 0.60;
  structures: ``STRUCTURE_DICE_WARN`` 0.45), or if any brain voxel folds,
  or if ``std(log J)`` exceeds ``LOGJAC_WARN`` (0.5, implausibly large volume changes);
* ``pass`` otherwise.

The structure thresholds are lower than the tissue ones because 32 small structures overlap
less than three large classes for the same alignment. They come from
``benchmarks/results/intersubject_benchmark.md`` (pairs of different held-out brains, exact
labels, 32 structures): unregistered pairs about 0.30 on the paper's 12 regions, failed
registrations (ANTs from a 90 or 180 degree start) 0.08-0.24, good affine registrations
0.52-0.59, deformable 0.61-0.69. Labels predicted by the network lower every value by a few
points, so a good affine registration sits above 0.45 and a failed one below 0.30.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    'DICE_FAIL',
    'DICE_WARN',
    'STRUCTURE_DICE_FAIL',
    'STRUCTURE_DICE_WARN',
    'dice_thresholds',
    'LOGJAC_WARN',
    'NEG_FAIL',
    'INVERSE_WARN_MM',
    'dice_per_label',
    'jacobian_stats',
    'qc_status',
]

DICE_FAIL = 0.40
DICE_WARN = 0.60
STRUCTURE_DICE_FAIL = 0.30
STRUCTURE_DICE_WARN = 0.45
NEG_FAIL = 0.01
LOGJAC_WARN = 0.5
#: Mean round-trip error (mm) of a deformable transform and its inverse above which the
#: inverse is flagged (ANTs SyN's own inverse: about 0.05-0.2 mm on brains).
INVERSE_WARN_MM = 0.5


def dice_per_label(reference: np.ndarray, test: np.ndarray,
                   labels: list[int] | None = None) -> dict[int, float]:
    """Dice coefficient ``2|A∩B| / (|A|+|B|)`` for each label.

    ``labels`` defaults to the non-zero labels of ``reference``. A label absent from both
    images gets NaN (undefined); absent from one only, 0.

    >>> a = np.array([0, 1, 1, 2, 2, 2]); b = np.array([0, 1, 2, 2, 2, 0])
    >>> {k: round(v, 3) for k, v in dice_per_label(a, b).items()}
    {1: 0.667, 2: 0.667}
    >>> dice_per_label(a, b, [3])
    {3: nan}
    """
    if reference.shape != test.shape:
        raise ValueError(f'label maps differ in shape: {reference.shape} vs {test.shape}')
    reference = np.asarray(reference).astype(np.int64, copy=False).ravel()
    test = np.asarray(test).astype(np.int64, copy=False).ravel()
    if labels is None:
        labels = [int(v) for v in np.unique(reference) if v != 0]
    n = int(max(reference.max(initial=0), test.max(initial=0), max(labels, default=0))) + 1
    inter = np.bincount(reference[reference == test], minlength=n)
    count_r = np.bincount(reference, minlength=n)
    count_t = np.bincount(test, minlength=n)
    out = {}
    for lab in labels:
        denom = count_r[lab] + count_t[lab] if lab < n else 0
        out[int(lab)] = float(2.0 * inter[lab] / denom) if denom else float('nan')
    return out


def jacobian_stats(jac: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """Summary of a Jacobian-determinant map inside a mask.

    ``jac_neg_frac`` is the fraction of voxels with ``J <= 0`` (folding);
    ``logjac_std`` is the standard deviation of ``log J`` over voxels with ``J > 0``.

    >>> j = np.array([0.5, 1.0, 2.0, -1.0])
    >>> s = jacobian_stats(j)
    >>> s['jac_min'], s['jac_max'], s['jac_neg_frac']
    (-1.0, 2.0, 0.25)
    >>> round(s['logjac_std'], 4)
    0.566
    """
    values = np.asarray(jac, dtype=np.float64)
    if mask is not None:
        values = values[np.asarray(mask, dtype=bool)]
    values = values.ravel()
    if values.size == 0:
        nan = float('nan')
        return {'jac_min': nan, 'jac_max': nan, 'jac_mean': nan, 'jac_neg_frac': nan,
                'logjac_std': nan}
    pos = values[values > 0]
    return {
        'jac_min': float(values.min()),
        'jac_max': float(values.max()),
        'jac_mean': float(values.mean()),
        'jac_neg_frac': float(np.mean(values <= 0)),
        'logjac_std': float(np.std(np.log(pos))) if pos.size else float('nan'),
    }


def dice_thresholds(label_set: str) -> tuple[float, float]:
    """``(fail, warn)`` thresholds of the mean Dice of ``label_set`` ('synthseg': the 32
    structures; anything else: tissue classes).

    >>> dice_thresholds('synthseg'), dice_thresholds('tissue')
    ((0.3, 0.45), (0.4, 0.6))
    """
    if label_set == 'synthseg':
        return STRUCTURE_DICE_FAIL, STRUCTURE_DICE_WARN
    return DICE_FAIL, DICE_WARN


def qc_status(dice_mean: float, jac: dict[str, float],
              what: str = 'mean Dice', thresholds: tuple[float, float] | None = None
              ) -> tuple[str, str]:
    """``(status, reason)`` from the documented thresholds (``what`` names the Dice in the
    reason; ``thresholds``: ``(fail, warn)`` for the Dice, default the tissue ones).

    >>> qc_status(0.8, {'jac_min': 0.5, 'jac_neg_frac': 0.0, 'logjac_std': 0.1})
    ('pass', '')
    >>> qc_status(0.5, {'jac_min': 0.5, 'jac_neg_frac': 0.0, 'logjac_std': 0.1})[0]
    'warn'
    >>> qc_status(0.8, {'jac_min': -0.2, 'jac_neg_frac': 0.05, 'logjac_std': 0.1})
    ('fail', 'non-positive Jacobian in 5.00% of the brain (> 1%)')
    """
    fails, warns = [], []
    dice_fail, dice_warn = thresholds or (DICE_FAIL, DICE_WARN)
    if not np.isfinite(dice_mean):
        fails.append('no label overlap could be measured')
    elif dice_mean < dice_fail:
        fails.append(f'{what} {dice_mean:.3f} < {dice_fail}')
    elif dice_mean < dice_warn:
        warns.append(f'{what} {dice_mean:.3f} < {dice_warn}')
    neg = jac.get('jac_neg_frac', float('nan'))
    if np.isfinite(neg) and neg > NEG_FAIL:
        fails.append(f'non-positive Jacobian in {neg:.2%} of the brain (> {NEG_FAIL:.0%})')
    elif np.isfinite(neg) and neg > 0:
        warns.append(f'non-positive Jacobian in {neg:.3%} of the brain')
    lstd = jac.get('logjac_std', float('nan'))
    if np.isfinite(lstd) and lstd > LOGJAC_WARN:
        warns.append(f'std(log J) {lstd:.2f} > {LOGJAC_WARN}')
    if fails:
        return 'fail', '; '.join(fails)
    if warns:
        return 'warn', '; '.join(warns)
    return 'pass', ''
