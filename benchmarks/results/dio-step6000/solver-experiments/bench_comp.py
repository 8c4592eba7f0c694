"""Experiment: a compositive diffeomorphic solver (greedy, FireANTs/ANTs-style) in place of
the SVF for 'diffeo'. Env: SG (sigma_grad), SW (warp smoothing after each composition), LR."""
import os, runpy, sys
from pathlib import Path
import torch
import keyprep.pipeline.dio.solver as S
import keyprep.pipeline.dio.register as R
from keyprep.pipeline.synth.generator import gaussian_blur, identity_grid

SG = float(os.environ.get('SG', 1.0)); SW = float(os.environ.get('SW', 0.0))
LR = float(os.environ.get('LR', 0.25))
_dense = S._dense_level

def dense(rep, f_fix, f_mov, init, iters, cfg):
    if rep != 'diffeo':
        return _dense(rep, f_fix, f_mov, init, iters, cfg)
    x = init.detach().clone()   # displacement u
    cfg2 = S.replace(cfg, lr=LR)
    stepper = S._Stepper(cfg2, x)
    n_vox = f_fix[0, 0].numel()
    base = identity_grid(f_fix.shape[2:], f_fix.device, f_fix.dtype)[None]
    losses = []
    for _ in range(iters):
        var = x.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = S.feature_loss(f_fix, S.sample(f_mov, base + var))
            (grad,) = torch.autograd.grad(loss, var)
        losses.append(float(loss.detach()) / n_vox)
        if S._stop(losses, cfg):
            break
        grad = gaussian_blur(grad, (SG,) * 3) if SG > 0 else grad
        delta = -stepper.direction(grad)
        with torch.no_grad():
            x = delta + S.sample(x, base + delta)   # phi <- phi o (id + delta)
            if SW > 0:
                x = gaussian_blur(x, (SW,) * 3)
    with torch.no_grad():
        final = float(S.feature_loss(f_fix, S.sample(f_mov, base + x))) / n_vox
    return S.LevelResult(x, len(losses), final, losses)

S._dense_level = dense
_to_input = R._to_input
def to_input(rep, result, work, res, spacing, shape_in):
    if rep == 'diffeo':
        e = _to_input('ffd', result, work, res, spacing, shape_in)
        print('inverse', e['inverse'], flush=True)
        return e
    return _to_input(rep, result, work, res, spacing, shape_in)
R._to_input = to_input
script = Path('/work/main/benchmarks') / os.environ.get('SCRIPT', 'run_registration_benchmark.py')
sys.argv = [str(script)] + sys.argv[1:]
runpy.run_path(str(script), run_name='__main__')
