"""carlIO on the T2->T1 cases at 1 mm (the engine path, ``s1`` of ``diagnose.py``) with the
paper's LNCC and with the squared LNCC the network was trained with, 5 IO steps.
Usage: python io_similarity.py WEIGHTS OUT.tsv"""
import sys
import time
from pathlib import Path

import numpy as np
import torch

from diagnose import CASES, image, mean_dice, on_grid
from keyprep.pipeline.carl.network import load_carl, register_arrays
from keyprep.pipeline.carl.train import warp_labels


def main(weights, out, steps=5):
    torch.set_num_threads(1)
    model, _ = load_carl(weights, 'cpu')
    rows = ['case\tio_steps\tio_similarity\tdice\tseconds']
    for mov, mc, fix, fc in CASES:
        if mc == fc:
            continue
        f, fl, fa = image(fix, fc, 1.0)
        m, ml, ma = image(mov, mc, 1.0)
        m, ml = on_grid(m, ma, f.shape, fa, 1), on_grid(ml, ma, f.shape, fa, 0)
        for n, sim in ((0, '-'), (steps, 'lncc'), (steps, 'lncc2')):
            t0 = time.time()
            o = register_arrays(f, m, model, spacing_mm=(1.0,) * 3, io_steps=n,
                                io_similarity=sim if n else 'lncc')
            warped = warp_labels(torch.as_tensor(ml.astype(np.int64)),
                                 torch.as_tensor(o['disp_fwd']))
            rows.append(f'{mov[-2:]}{mc}->{fix[-2:]}{fc}\t{n}\t{sim}\t'
                        f'{mean_dice(warped.numpy(), fl):.4f}\t{time.time() - t0:.1f}')
            print(rows[-1], flush=True)
    Path(out).write_text('\n'.join(rows) + '\n')


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2])
