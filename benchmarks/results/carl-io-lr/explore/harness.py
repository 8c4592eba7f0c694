"""Fast CARL experiments on the carl engine's inputs, without the engine's file I/O.

The 4 held-out 1 mm cases of the CARL benchmarks (seg14/seg16 -> seg15, T1 -> T1 and T2 -> T1),
read from a work folder of ``benchmarks/run_intersubject_benchmark.py`` in which an engine
that starts from keymorphAffine (``dio`` here) has run (``KP_BENCH_WORK``, its
``intersubject/res-1_seed-0``): its images, label-network labels and exact labels, and the
keymorphAffine transform. The moving image and labels are resampled through that affine (as
the engine's ``arrays``), the images are contrast-transferred across contrasts (``auto``),
``register_arrays`` runs as the engine calls it, and the exact labels warped by the forward
field (nearest neighbour, on the fixed grid) are scored like the benchmark (mean Dice over
32 structures, %). Numbers differ from the benchmark's by up to about a point (one
resampling instead of the benchmark's composed one; another run's affine): use it to compare
settings, and the benchmark for reported numbers."""
import sys, json, time, os
from pathlib import Path
import numpy as np, nibabel as nb, torch
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from run_intersubject_benchmark import region_dice
from keyprep.pipeline.transforms import apply_transforms
from keyprep.pipeline.contrast import apply_contrast_transfer
from keyprep.pipeline.carl.network import register_arrays, load_carl, warp
from keyprep.pipeline.carl import network as cn

W = Path(os.environ.get('KP_BENCH_WORK', '/tmp/dioA/work/intersubject/res-1_seed-0'))
C = Path(os.environ.get('KP_HARNESS_CACHE', '/tmp/cx/cache')); C.mkdir(exist_ok=True, parents=True)
CASES = ['seg14-to-seg15_t1-t1_rot000', 'seg16-to-seg15_t1-t1_rot000',
         'seg14-to-seg15_t2-t1_rot000', 'seg16-to-seg15_t2-t1_rot000']

def arr(p):
    img = nb.load(str(p)); return np.asanyarray(img.dataobj).reshape(img.shape[:3])

def prepare(case):
    out = C / f'{case}.npz'
    if out.exists():
        return dict(np.load(out))
    mv, fx = case.split('_')[0].split('-to-')
    cm, cf = case.split('_')[1].split('-')
    sm, sf = W / 'subjects' / f'{mv}_{cm}', W / 'subjects' / f'{fx}_{cf}'
    xfm = W / 'runs' / case / 'dio' / 'init_keymorphAffine' / 'xfm_fwd.txt'
    fixed = sf / 'image.nii.gz'
    tmp = C / case; tmp.mkdir(exist_ok=True)
    def pre(p, name, interp):
        return arr(apply_transforms(p, fixed, [xfm], tmp / name, interpolation=interp))
    f = arr(fixed).astype(np.float32) * (arr(sf / 'brainmask.nii.gz') > 0)
    m = pre(sm / 'image.nii.gz', 'm.nii.gz', 'linear').astype(np.float32) * (pre(sm / 'brainmask.nii.gz', 'mm.nii.gz', 'nearestNeighbor') > 0)
    d = dict(f=f, m=m, fl=np.rint(arr(sf / 'image_netlabels.nii.gz')).astype(np.int32),
             ml=np.rint(pre(sm / 'image_netlabels.nii.gz', 'ml.nii.gz', 'nearestNeighbor')).astype(np.int32),
             fx=arr(sf / 'labels.nii.gz').astype(np.int32),
             mx=np.rint(pre(sm / 'labels.nii.gz', 'mx.nii.gz', 'nearestNeighbor')).astype(np.int32),
             spacing=np.array(nb.load(str(fixed)).header.get_zooms()[:3], float),
             cross=np.array(cm != cf))
    np.savez_compressed(out, **d)
    return d

def inputs(d):
    f, m = d['f'], d['m']
    return apply_contrast_transfer(f, m, d['fl'], d['ml'], 'both' if bool(d['cross']) else 'off')

def warp_labels(lab, disp):
    t = torch.from_numpy(lab.astype(np.float32))[None, None]
    u = torch.from_numpy(disp)[None]
    return warp_nn(t, u)[0, 0].round().numpy().astype(np.int32)

def warp_nn(img, u):
    from keyprep.pipeline.carl.network import cell_centres
    import torch.nn.functional as F
    shape = img.shape[2:]
    pts = cell_centres(shape, 0) + u
    # normalised coords for grid_sample (align_corners=True on voxel indices)
    g = torch.stack([pts[:, 2] / (shape[2] - 1), pts[:, 1] / (shape[1] - 1), pts[:, 0] / (shape[0] - 1)], -1) * 2 - 1
    return F.grid_sample(img, g, mode='nearest', padding_mode='zeros', align_corners=True)

def score(d, disp):
    w = warp_labels(d['mx'], disp)
    reg = region_dice(d['fx'], w)
    s = [v for (k, _), v in reg.items() if k == 'structure']
    return 100 * float(np.nanmean(s))

def run(model, case, **kw):
    d = prepare(case)
    f, m = inputs(d)
    t0 = time.time()
    out = register_arrays(f, m, model, spacing_mm=d['spacing'], io_similarity='lncc2',
                          labels=(d['fl'], d['ml']), symmetric=kw.pop('symmetric', True), **kw)
    dt = time.time() - t0
    from keyprep.pipeline.carl.losses import jacobian_determinant
    J = jacobian_determinant(torch.from_numpy(out['disp_fwd'])[None])[0].numpy()
    br = d['fx'] > 0
    return {'case': case, 'dice': round(score(d, out['disp_fwd']), 2), 'time': round(dt, 1),
            'fold%': round(100 * float((J[br] <= 0).mean()), 4), 'stdlogJ': round(float(np.log(np.clip(J[br], 1e-3, None)).std()), 3),
            'io': [round(x, 4) for x in out['io_losses'][:1] + out['io_losses'][-1:]]}
