"""CARL under translations (issue 12's sweep): held-out pairs synthesised at 2 mm (the
benchmark's images, 0 deg), the moving brain moved by 0-60 mm along a fixed random
direction, both placed on one large grid, registered by ``register_arrays`` (the engine's
call) without any prealignment. Dice: mean over 32 structures of the warped exact labels.
The working grid (96^3) always covers both brains, so its voxels grow with the shift
(``res_mm``): what changes with the shift is that resolution, not the attention.
Usage: python sweep.py WEIGHTS OUT.tsv"""
import sys
import time
from pathlib import Path

import numpy as np
import torch

from keyprep.pipeline import perturb as pt
from keyprep.pipeline.carl.network import load_carl, register_arrays
from keyprep.pipeline.carl.train import warp_labels

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'carl-1mm-diagnosis'))
from diagnose import image, mean_dice  # noqa: E402

CASES = [('training_seg_14', 't1', 'training_seg_15', 't1'),
         ('training_seg_16', 't1', 'training_seg_15', 't1'),
         ('training_seg_14', 't2', 'training_seg_15', 't1')]
SHIFTS_MM = (0, 10, 20, 30, 40, 50, 60)
PAD_MM = 70.0


def main(weights, out):
    torch.set_num_threads(1)
    model, meta = load_carl(weights, 'cpu')
    direction = np.random.default_rng(12).normal(size=3)
    direction /= np.linalg.norm(direction)
    rows = ['case\tshift_mm\tdice_none\tdice\tres_mm\tseconds']
    for mov, mc, fix, fc in CASES:
        f, fl, fa = image(fix, fc, 2.0)
        m, ml, ma = image(mov, mc, 2.0)
        pad = int(PAD_MM / 2.0)
        shape = tuple(d + 2 * pad for d in f.shape)
        big = fa.copy()
        big[:3, 3] -= pad * 2.0
        grid = pt.Grid(shape, big)
        fb = pt.resample(f, fa, grid, pt.KnownTransform(np.eye(4)), order=1)
        flb = pt.resample(fl, fa, grid, pt.KnownTransform(np.eye(4)), order=0)
        for shift in SHIFTS_MM:
            motion = np.eye(4)
            motion[:3, 3] = shift * direction  # the moving brain moved by +shift
            mb = pt.resample(m, ma, grid, pt.KnownTransform(motion), order=1)
            mlb = pt.resample(ml, ma, grid, pt.KnownTransform(motion), order=0)
            t0 = time.time()
            o = register_arrays(fb, mb, model, spacing_mm=(2.0,) * 3)
            warped = warp_labels(torch.as_tensor(mlb.astype(np.int64)),
                                 torch.as_tensor(o['disp_fwd']))
            rows.append(f'{mov[-2:]}{mc}->{fix[-2:]}{fc}\t{shift}\t{mean_dice(mlb, flb):.4f}\t'
                        f'{mean_dice(warped.numpy(), flb):.4f}\t'
                        f'{o["working_grid"]["res_mm"]:.2f}\t{time.time() - t0:.1f}')
            print(rows[-1], flush=True)
    Path(out).write_text('\n'.join(rows) + '\n')


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2])
