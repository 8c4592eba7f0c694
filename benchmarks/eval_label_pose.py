#!/usr/bin/env python
"""The labeller's self-check and pose handling on held-out anatomies, as a user meets them.

    python benchmarks/eval_label_pose.py [--weights PATH] [--label-maps DIR] [--out DIR]

Each held-out SynthSeg map (training_seg_14-16: anatomy never seen in training) is
synthesised T1-like with the skull on, on SynthSeg's native grid (256^3, 1 mm, LIA), then
rotated in its header only (0, 90 deg about x, 180 deg about z, 90 deg about y). Each image
is labelled exactly as a participant run labels it: conformed to the closest RAS voxel order,
then ``LabelNetwork.predict(pose='auto')`` with deepbet's brain mask of the conformed image
as the self-check's reference. Recorded per image:
mean structure Dice against the exact labels, whether the self-check passed, which pose
was used after how many labellings, the failed checks of each attempt, and the time.

Writes ``<out>/label_pose_eval.tsv`` and ``label_pose_eval.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from keyprep.pipeline.synth.generator import load_label_map
from keyprep.pipeline.synth.labeller import LabelNetwork, default_weights
from keyprep.pipeline.synth.train import HELD_OUT
from keyprep.pipeline.synth.validation import heldout_volumes, structure_dice

ROTATIONS = (('x', 0.0), ('x', 90.0), ('z', 180.0), ('y', 90.0))


def rotation(axis: str, deg: float) -> np.ndarray:
    """4x4 rotation about a world axis through the origin."""
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    i, j = {'x': (1, 2), 'y': (2, 0), 'z': (0, 1)}[axis]
    out = np.eye(4)
    out[i, i] = out[j, j] = c
    out[i, j], out[j, i] = -s, s
    return out


def to_lia(image: nib.Nifti1Image, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reorient a RAS volume's array to LIA (SynthSeg's native storage order)."""
    xfm = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt('RAS'),
                                          nib.orientations.axcodes2ornt('LIA'))
    data = nib.orientations.apply_orientation(image.get_fdata(dtype=np.float32), xfm)
    lab = nib.orientations.apply_orientation(truth, xfm)
    aff = image.affine @ nib.orientations.inv_ornt_aff(xfm, image.shape)
    return data, lab, aff


def main(argv=None) -> int:
    from keyprep.pipeline.anatomy import deepbet_mask
    from keyprep.pipeline.io import conform

    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--weights', type=Path, default=default_weights())
    ap.add_argument('--label-maps', type=Path,
                    default=Path(__file__).resolve().parents[2] / 'shared/data/synthseg/training_label_maps')
    ap.add_argument('--out', type=Path, default=Path(__file__).parent / 'results')
    ap.add_argument('--threads', type=int, default=2)
    opts = ap.parse_args(argv)
    torch.set_num_threads(opts.threads)
    import pandas as pd

    net = LabelNetwork(opts.weights)
    maps = [load_label_map(opts.label_maps / f'{n}.nii.gz') for n in HELD_OUT]
    vols = heldout_volumes(maps, contrasts=('t1',), skull=(True,), shape=(256, 256, 256))
    rows = []
    for vol in vols:
        data, truth, aff = to_lia(vol.image, vol.truth)
        for axis, deg in ROTATIONS:
            # as a participant run: conformed (closest RAS voxel order), deepbet, labels
            raw = nib.Nifti1Image(data, rotation(axis, deg) @ aff)
            img = conform(raw)
            truth_c = np.asarray(conform(nib.Nifti1Image(truth, raw.affine), np.int16).dataobj)
            mask = nib.Nifti1Image(deepbet_mask(img).astype(np.uint8), img.affine)
            t0 = time.perf_counter()
            res = net.predict(img, reference_mask=mask)
            wall = time.perf_counter() - t0
            dice = float(np.mean(list(structure_dice(np.asarray(res.labels.dataobj), truth_c).values())))
            attempts = res.check['attempts']
            rows.append({'subject': vol.name.split(':')[0], 'header_rotation': f'{deg:g} deg about {axis}',
                         'structure_dice': round(dice, 4), 'check_ok': res.check['ok'],
                         'pose_used': res.check['pose'], 'labellings': len(attempts),
                         'attempts': '; '.join(f"{a['pose']}:{'ok' if a['ok'] else ','.join(a['failed'])}"
                                               for a in attempts),
                         'wall_s': round(wall, 1)})
            print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    opts.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(opts.out / 'label_pose_eval.tsv', sep='\t', index=False)
    lines = ['# Label network: self-check and pose on held-out heads (256^3 LIA, 1 mm, skull on)', '',
             f'Weights `{opts.weights.name}` (step {net.step}, sha256 `{net.sha256[:16]}...`); '
             f'{opts.threads} threads; `python benchmarks/eval_label_pose.py`.', '',
             '| subject | header rotation | structure Dice | self-check | pose used | labellings | '
             'attempts | wall (s) |', '|---|---|---|---|---|---|---|---|']
    for r in rows:
        lines.append(f"| {r['subject']} | {r['header_rotation']} | {r['structure_dice']:.3f} | "
                     f"{'ok' if r['check_ok'] else 'FAILED'} | {r['pose_used']} | {r['labellings']} | "
                     f"{r['attempts']} | {r['wall_s']} |")
    lines += ['', f"Mean structure Dice {df['structure_dice'].mean():.3f} (min {df['structure_dice'].min():.3f}); "
              f"self-check passed on {int(df['check_ok'].sum())} of {len(df)}."]
    (opts.out / 'label_pose_eval.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    return 0


if __name__ == '__main__':
    sys.exit(main())
