"""How much AAL Dice the exact transform of the `field` pair keeps when its displacement is
only represented at 2 mm or smoothed (the caps a 2 mm, smoothed warp puts on any solver)."""
import sys, json
from pathlib import Path
import numpy as np, nibabel as nib
from scipy.ndimage import gaussian_filter, zoom
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from keyprep.pipeline.benchmark import warp_labels, load_array
from keyprep.pipeline.qc import dice_per_label

import os
W = Path(os.environ.get('WORK', '/tmp/dioeval/regwork')) / 'res-1_seed-0'  # the benchmark's --work-dir
truth = W / 'pairs/field/truth_fwd.nii.gz'
img = nib.load(str(truth))
d = np.asarray(img.dataobj, np.float32)  # (X, Y, Z, 1, 3), mm
ref = load_array(W / 'fixed/colin27_aal.nii.gz').astype(np.int64)
out = Path(os.environ.get('OUT', '/tmp/oracle'))
out.mkdir(parents=True, exist_ok=True)

def score(field, name):
    f = out / f'{name}.nii.gz'
    nib.save(nib.Nifti1Image(field.astype(np.float32), img.affine, img.header), str(f))
    warped = warp_labels(W / 'pairs/field/moving_aal.nii.gz', W / 'fixed/colin27_brain.nii.gz', f,
                         out / f'{name}_warped.nii.gz')
    dice = dice_per_label(ref, warped)
    v = float(np.nanmean(list(dice.values())))
    print(json.dumps({'variant': name, 'dice_aal': round(v, 4)}), flush=True)

(None if len(sys.argv) > 1 else score(d, "exact"))
for s in tuple(float(a) for a in sys.argv[1:]) or (1.0, 2.0, 3.0, 4.0):
    score(np.stack([gaussian_filter(d[..., 0, c], s) for c in range(3)], -1)[..., None, :], f'smooth{s:g}mm')
# 2 mm grid: block mean then trilinear back
sm = []
for c in range(3):
    x = d[..., 0, c]
    small = zoom(x, 0.5, order=1)
    big = zoom(small, np.array(x.shape) / np.array(small.shape), order=1)
    sm.append(big[:x.shape[0], :x.shape[1], :x.shape[2]])
score(np.stack(sm, -1)[..., None, :], 'grid2mm')
