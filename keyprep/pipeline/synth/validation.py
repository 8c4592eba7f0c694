"""Held-out validation of the label network through the deployment path.

Training validation (``keyprep train synthseg``), ``benchmarks/eval_synthseg.py`` and the
tests all score the network with :func:`score_volumes`, which labels each held-out volume with
:meth:`LabelNetwork.predict <keyprep.pipeline.synth.labeller.LabelNetwork.predict>`, exactly
as a participant run does (same resampling to the network grid, same normalisation, same tiled
inference, same flip averaging, same pose handling, labels on the native 1 mm grid).

:func:`heldout_volumes` synthesises the fixed validation set: each held-out anatomy on a
1 mm grid, in T1-, T2-, PD- and FLAIR-like contrasts, with and without skull (3 maps give 24
volumes), with fixed seeds, so every evaluation of every checkpoint sees the same images.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import nibabel as nib
import numpy as np
import torch

from .generator import LabelMap, SynthConfig, Synthesizer, grid_affine
from .labels import OUTPUT_LABELS

__all__ = ['HeldOutVolume', 'heldout_volumes', 'structure_dice', 'score_volumes',
           'VALIDATION_CONTRASTS', 'VALIDATION_SHAPE']

VALIDATION_CONTRASTS: tuple[str, ...] = ('t1', 't2', 'pd', 'flair')
#: 1 mm grid of the held-out volumes (the whole head of a SynthSeg training map).
VALIDATION_SHAPE: tuple[int, int, int] = (176, 208, 176)
STRUCTURES = tuple(lab for lab in OUTPUT_LABELS if lab != 0)


@dataclass
class HeldOutVolume:
    name: str  # '<map>:<contrast>:<skull|stripped>'
    image: nib.Nifti1Image  # float32, 1 mm RAS grid
    truth: np.ndarray  # FreeSurfer numbering (int16)


def heldout_volumes(maps: Sequence[LabelMap], contrasts: Sequence[str] = VALIDATION_CONTRASTS,
                    skull: Sequence[bool] = (True, False), shape=VALIDATION_SHAPE, res_mm: float = 1.0,
                    seed: int = 20_000) -> list[HeldOutVolume]:
    """The fixed validation set (``len(maps) * len(contrasts) * len(skull)`` volumes)."""
    out = []
    lut = np.asarray(OUTPUT_LABELS, dtype=np.int16)
    aff = grid_affine(shape, res_mm)
    for ci, contrast in enumerate(contrasts):
        for with_skull in skull:
            cfg = replace(SynthConfig(shape=tuple(shape), res_mm=res_mm).evaluation(contrast),
                          skull_strip_prob=0.0 if with_skull else 1.0)
            synth = Synthesizer(list(maps), cfg)
            for i, m in enumerate(maps):
                s = synth.synthesize(i, torch.Generator().manual_seed(seed + 100 * ci + i))
                img = nib.Nifti1Image(s['image'].numpy().astype(np.float32), aff)
                out.append(HeldOutVolume(f'{m.name}:{contrast}:{"skull" if with_skull else "stripped"}',
                                         img, lut[s['labels'].numpy()]))
    return out


def structure_dice(pred: np.ndarray, truth: np.ndarray, labels: Sequence[int] = STRUCTURES
                   ) -> dict[int, float]:
    """Hard Dice per structure present in ``truth`` (FreeSurfer numbering).

    >>> a = np.array([0, 2, 2, 4]); b = np.array([0, 2, 4, 4])
    >>> structure_dice(a, b, labels=(2, 4, 7))
    {2: 0.6666666666666666, 4: 0.6666666666666666}
    """
    out = {}
    for lab in labels:
        t = truth == lab
        if not t.any():
            continue
        p = pred == lab
        out[int(lab)] = 2.0 * float((p & t).sum()) / float(p.sum() + t.sum())
    return out


def score_volumes(net, volumes: Sequence[HeldOutVolume], pose: str = 'auto', log=None) -> dict:
    """Label every volume with ``net.predict`` (the deployment path) and score it.

    Returns ``{'mean_dice': mean over volumes of the mean structure Dice, 'per_volume':
    {name: mean}, 'per_structure': {label: mean over volumes}, 'worst': [(name, dice)...],
    'per_volume_structure': {name: {label: dice}}}``.
    """
    per_volume, per_struct, detail = {}, {}, {}
    for v in volumes:
        pred = np.asarray(net.predict(v.image, pose=pose).labels.dataobj)
        d = structure_dice(pred, v.truth)
        detail[v.name] = d
        per_volume[v.name] = float(np.mean(list(d.values())))
        for k, val in d.items():
            per_struct.setdefault(k, []).append(val)
        if log:
            log(f'  {v.name}: {per_volume[v.name]:.3f}')
    worst = sorted(per_volume.items(), key=lambda kv: kv[1])[:3]
    return {'mean_dice': float(np.mean(list(per_volume.values()))), 'per_volume': per_volume,
            'per_structure': {k: float(np.mean(v)) for k, v in per_struct.items()}, 'worst': worst,
            'per_volume_structure': detail}
