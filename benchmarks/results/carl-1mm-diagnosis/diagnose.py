"""Why does CARL collapse on T2->T1 at 1 mm (issue 12)?  Same anatomies and contrasts,
synthesised at 1 mm and at 2 mm (the benchmark's images: ``synthesise``, 0 deg), registered
by ``register_arrays`` (the engine's call, without the affine: the grids are centred on the
brain centres), scored by the mean Dice over 32 structures of the warped exact labels.

Conditions:
  s2     synthesised at 2 mm, registered at 2 mm (as the training sees it)
  s1     synthesised at 1 mm, registered at 1 mm (the engine path: anti-aliased to 2 mm)
  s1b    the 1 mm images box-averaged to 2 mm outside register_arrays, registered at 2 mm
Usage: python diagnose.py WEIGHTS OUT.tsv
"""
import sys
import time
from pathlib import Path

import nibabel as nb
import numpy as np
import torch

from keyprep.pipeline import perturb as pt
from keyprep.pipeline.carl.network import load_carl, register_arrays
from keyprep.pipeline.carl.train import warp_labels
from keyprep.pipeline.masks import largest_component_filled
from keyprep.pipeline.synth.benchmark_images import brain_label_map, crc32, synthesise
from keyprep.pipeline.synth.labels import OUTPUT_LABELS
from keyprep.pipeline.synth.train import dice_per_class

MAPS = Path(__file__).resolve().parents[4] / 'shared/data/synthseg/training_label_maps'
CASES = [('training_seg_14', 't1', 'training_seg_15', 't1'),
         ('training_seg_16', 't1', 'training_seg_15', 't1'),
         ('training_seg_14', 't2', 'training_seg_15', 't1'),
         ('training_seg_16', 't2', 'training_seg_15', 't1')]


def image(subject, contrast, res, cache={}):
    key = (subject, contrast, res)
    if key not in cache:
        lm = brain_label_map(MAPS / f'{subject}.nii.gz')
        img, lab = synthesise(lm, contrast, res, crc32(f'0:{subject}:{contrast}'))
        lab_a = np.asanyarray(lab.dataobj)
        mask = largest_component_filled(lab_a > 0)
        cache[key] = (np.asanyarray(img.dataobj).astype(np.float32) * mask, lab_a, img.affine)
    return cache[key]


def on_grid(arr, affine, ref_shape, ref_affine, order):
    grid = pt.Grid(tuple(ref_shape), ref_affine)
    return pt.resample(arr, affine, grid, pt.KnownTransform(np.eye(4)), order=order)


def box2(x):
    s = [d // 2 * 2 for d in x.shape]
    x = x[:s[0], :s[1], :s[2]]
    return x.reshape(s[0] // 2, 2, s[1] // 2, 2, s[2] // 2, 2).mean((1, 3, 5))


LUT = np.zeros(256, dtype=np.int64)
LUT[np.asarray(OUTPUT_LABELS)] = np.arange(len(OUTPUT_LABELS))


def mean_dice(pred, target):
    p, t = LUT[np.asarray(pred).astype(np.int64)], LUT[np.asarray(target).astype(np.int64)]
    d = dice_per_class(torch.as_tensor(p), torch.as_tensor(t), len(OUTPUT_LABELS))
    return float(np.nanmean(d[1:]))


def main(weights, out):
    model, meta = load_carl(weights, 'cpu')
    rows = ['case\tcondition\tdice_none\tdice\tseconds']
    for mov, mc, fix, fc in CASES:
        name = f'{mov[-2:]}{mc}->{fix[-2:]}{fc}'
        for cond in ('s2', 's1', 's1b'):
            res = 2.0 if cond == 's2' else 1.0
            f, fl, fa = image(fix, fc, res)
            m, ml, ma = image(mov, mc, res)
            m = on_grid(m, ma, f.shape, fa, 1)
            ml = on_grid(ml, ma, f.shape, fa, 0)
            spacing = res
            if cond in ('s1b', 's1n'):
                f, m, fl, ml = box2(f), box2(m), fl[::2, ::2, ::2], ml[::2, ::2, ::2]
                fl = fl[tuple(slice(0, d) for d in f.shape)]
                ml = ml[tuple(slice(0, d) for d in m.shape)]
                spacing = 2.0
            t0 = time.time()
            o = register_arrays(f, m, model, spacing_mm=(spacing,) * 3)
            warped = warp_labels(torch.as_tensor(ml.astype(np.int64)),
                                 torch.as_tensor(o['disp_fwd']))
            d = mean_dice(warped.numpy(), fl)
            d0 = mean_dice(ml, fl)
            rows.append(f'{name}\t{cond}\t{d0:.4f}\t{d:.4f}\t{time.time() - t0:.1f}')
            print(rows[-1], flush=True)
    Path(out).write_text('\n'.join(rows) + '\n')


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2])
