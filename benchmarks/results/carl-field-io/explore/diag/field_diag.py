"""Diagnosis of CARL on the real FSL field (Colin27 at 2 mm against a copy warped by it): `python field_diag.py [WEIGHTS|-]` (recovered fraction of the field), `python loss_diag.py` (the loss at zero, half truth, truth and the network), `python field_io.py LR STEPS LAMBDA` (field-space IO from the network at level 1). Run from the repository root with the venv."""
"""How much of the real FSL field does CARL recover? Colin27 at 2 mm vs a copy warped by the field."""
import sys, time, numpy as np, nibabel as nb, torch
torch.set_num_threads(1)
from keyprep.pipeline import perturb as pt
from keyprep.pipeline.carl.network import register_arrays, load_carl
from keyprep.pipeline.targets import mricron_file
weights = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] != '-' else None
scale = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
brain = nb.load(str(mricron_file('ch2bet.nii.gz'))); aal = nb.load(str(mricron_file('aal.nii.gz')))
center = pt.center_of_mass(brain)
field = pt.load_fsl_displacement_field().recentred(center)
if scale != 1.0:
    field = field.scaled(scale)
aff = np.diag([2.0, 2.0, 2.0, 1.0]); aff[:3, 3] = center - 2.0 * 47.5
grid = pt.Grid((96, 96, 96), aff)
ident = pt.KnownTransform()
fixed = pt.resample(np.asanyarray(brain.dataobj), brain.affine, grid, ident)
faal = pt.resample(np.asanyarray(aal.dataobj).astype(np.int32), aal.affine, grid, ident, order=0)
xfm = pt.KnownTransform(np.eye(4), field)
moving = pt.resample(np.asanyarray(brain.dataobj), brain.affine, grid, xfm)
maal = pt.resample(np.asanyarray(aal.dataobj).astype(np.int32), aal.affine, grid, xfm, order=0)
pts = pt.grid_points(grid)
dtrue = (field.inverse_map(pts) - pts).reshape(grid.shape + (3,)) / 2.0  # voxels
mask = fixed > 0.1 * fixed.max()
def dice(a, b):
    ls = [l for l in np.unique(b) if l > 0]
    return np.mean([2 * ((a == l) & (b == l)).sum() / ((a == l).sum() + (b == l).sum()) for l in ls])
from scipy import ndimage as ndi
def warp_lab(lab, d):
    idx = np.indices(lab.shape).astype(float) + d
    return ndi.map_coordinates(lab, idx, order=0)
model, meta = load_carl(weights)
print('weights step', meta.get('step'), 'scale', scale)
print('identity: AAL dice %.3f  |d_true| mean in brain %.2f vox, p95 %.2f' % (
    dice(maal, faal), np.linalg.norm(dtrue[mask], axis=-1).mean(), np.percentile(np.linalg.norm(dtrue[mask], axis=-1), 95)))
print('truth warp dice %.3f' % dice(warp_lab(maal, np.moveaxis(dtrue, -1, 0)), faal))
for passes in (1,):
  for io, lr in ((10, 1e-4), (10, 5e-4), (10, 2e-3)):
    t = time.time()
    out = register_arrays(fixed, moving, model, spacing_mm=(2, 2, 2), symmetric=True, passes=passes, io_steps=io, io_train='refine', io_similarity='lncc2', io_lr=lr)
    d = np.moveaxis(out['disp_fwd'], 0, -1)
    err = np.linalg.norm(d[mask] - dtrue[mask], axis=-1)
    slope = (d[mask] * dtrue[mask]).sum() / (dtrue[mask] ** 2).sum()
    corr = np.corrcoef(d[mask].ravel(), dtrue[mask].ravel())[0, 1]
    print(f'io {io} lr {lr}: AAL dice {dice(warp_lab(maal, out["disp_fwd"]), faal):.3f} '
          f'EPE {err.mean():.2f} vox  slope {slope:.2f} corr {corr:.2f}  {time.time()-t:.0f}s')
