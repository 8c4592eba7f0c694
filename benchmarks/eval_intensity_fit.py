#!/usr/bin/env python
"""Does the label network's ``intensity_fit`` separate labels at the right pose from labels at
a wrong one? Measured on the 24 held-out validation volumes (training_seg_14-16 x T1/T2/PD/
FLAIR-like x with/without skull, 1 mm): each volume labelled with ``pose='header'`` as it is
(the right pose) and with its header rotated by 90 degrees about x and about y (the network
then labels it in a wrong pose), with the exact brain as reference mask.

    python benchmarks/eval_intensity_fit.py [--out benchmarks/results]

Writes ``intensity_fit_eval.tsv`` (one row per labelling: volume, pose, intensity_fit,
structure Dice, the self-check's failed checks) and ``intensity_fit_eval.md``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from keyprep.pipeline.masks import largest_component_filled
from keyprep.pipeline.synth.generator import load_label_map
from keyprep.pipeline.synth.labeller import LabelNetwork
from keyprep.pipeline.synth.train import HELD_OUT
from keyprep.pipeline.synth.validation import heldout_volumes, structure_dice


def rotated(img: nib.Nifti1Image, axis: str, deg: float) -> nib.Nifti1Image:
    """The same voxels with the header rotated about a world axis through the origin (the
    synthetic grid's centre)."""
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    i, j = {'x': (1, 2), 'y': (2, 0), 'z': (0, 1)}[axis]
    rot = np.eye(4)
    rot[i, i], rot[i, j], rot[j, i], rot[j, j] = c, -s, s, c
    return nib.Nifti1Image(np.asanyarray(img.dataobj), rot @ img.affine)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--label-maps', type=Path,
                    default=Path('../shared/data/synthseg/training_label_maps'))
    ap.add_argument('--out', type=Path, default=Path('benchmarks/results'))
    ap.add_argument('--threads', type=int, default=1)
    opts = ap.parse_args(argv)
    torch.set_num_threads(opts.threads)
    maps = [load_label_map(opts.label_maps / f'{name}.nii.gz') for name in HELD_OUT]
    net = LabelNetwork.cached(None, 'cpu')
    rows = []
    t0 = time.time()
    for vol in heldout_volumes(maps):
        truth = np.asarray(vol.truth)
        ref = nib.Nifti1Image(largest_component_filled(truth > 0).astype(np.uint8),
                              vol.image.affine)
        for pose, img in (('right', vol.image), ('wrong-90x', rotated(vol.image, 'x', 90)),
                          ('wrong-90y', rotated(vol.image, 'y', 90))):
            mask = nib.Nifti1Image(np.asanyarray(ref.dataobj), img.affine)
            res = net.predict(img, flip_tta=False, pose='header', reference_mask=mask)
            dice = structure_dice(np.asarray(res.labels.dataobj), truth)
            rows.append({'volume': vol.name, 'pose': pose,
                         'intensity_fit': res.check['values'].get('intensity_fit'),
                         'structure_dice': round(float(np.mean(list(dice.values()))), 4),
                         'failed': ','.join(res.check['failed']) or '-'})
            print(f'{vol.name:40s} {pose:10s} fit {rows[-1]["intensity_fit"]} dice '
                  f'{rows[-1]["structure_dice"]} failed {rows[-1]["failed"]} '
                  f'({time.time() - t0:.0f} s)', flush=True)
    import pandas as pd

    df = pd.DataFrame(rows)
    opts.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(opts.out / 'intensity_fit_eval.tsv', sep='\t', index=False)
    right, wrong = df[df.pose == 'right'], df[df.pose != 'right']
    lines = ['# intensity_fit: right pose against wrong pose', '',
             f'Generated on {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())} by '
             f'`python {shlex.join(sys.argv)}` ({time.time() - t0:.0f} s).', '',
             f'* Right pose ({len(right)} labellings): intensity_fit {right.intensity_fit.min():.3f}'
             f'-{right.intensity_fit.max():.3f} (median {right.intensity_fit.median():.3f}), '
             f'structure Dice median {right.structure_dice.median():.3f}',
             f'* Wrong pose ({len(wrong)} labellings): intensity_fit {wrong.intensity_fit.min():.3f}'
             f'-{wrong.intensity_fit.max():.3f} (median {wrong.intensity_fit.median():.3f}), '
             f'structure Dice median {wrong.structure_dice.median():.3f}', '',
             '| volume | pose | intensity_fit | structure Dice | failed checks |',
             '|---|---|---|---|---|']
    lines += [f'| {r.volume} | {r.pose} | {r.intensity_fit} | {r.structure_dice} | {r.failed} |'
              for r in df.itertuples()]
    (opts.out / 'intensity_fit_eval.md').write_text('\n'.join(lines) + '\n')
    print(f'wrote {opts.out / "intensity_fit_eval.md"}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
