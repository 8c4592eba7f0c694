"""Benchmark hook: env-controlled DIO solver/model variations (experiment only)."""
import os, runpy, sys, json
from dataclasses import replace
from pathlib import Path
import keyprep.pipeline.dio.register as R
kw = {}
for env, key, typ in [('SV', 'sigma_velocity', float), ('SG', 'sigma_grad', float), ('LR', 'lr', float),
                      ('PAT', 'patience', int), ('TOL', 'tol', float), ('CH', 'channels', int)]:
    if env in os.environ:
        kw[key] = typ(os.environ[env])
if 'ITERS' in os.environ:
    kw['iterations'] = tuple(int(i) for i in os.environ['ITERS'].split(','))
R.DEFAULT_SOLVER = replace(R.DEFAULT_SOLVER, **kw)
print('HOOK solver', R.DEFAULT_SOLVER, flush=True)
import keyprep.pipeline.dio.solver as S
if 'EPS' in os.environ:
    EPS = float(os.environ['EPS'])
    def direction(self, grad):
        cfg = self.cfg
        self.t += 1
        b1, b2 = cfg.betas
        self.m.mul_(b1).add_(grad, alpha=1 - b1)
        self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        mhat = self.m / (1 - b1 ** self.t)
        vhat = self.v / (1 - b2 ** self.t)
        scale = float(vhat.max().sqrt()) * EPS + 1e-30
        d = mhat / (vhat.sqrt() + scale)
        norm = S.max_vector_norm(d)
        return d / norm.clamp_min(1e-30) * cfg.lr
    S._Stepper.direction = direction
if os.environ.get('LOSS') in ('lncc', 'hybrid'):
    import torch, torch.nn.functional as F
    WIN = int(os.environ.get('WIN', 5))
    def lncc_loss(fixed, warped):
        k = WIN; pad = k // 2
        def box(x):
            return F.avg_pool3d(x, k, stride=1, padding=pad, count_include_pad=False)
        mf, mw = box(fixed), box(warped)
        cov = box(fixed * warped) - mf * mw
        vf = (box(fixed * fixed) - mf * mf).clamp_min(0)
        vw = (box(warped * warped) - mw * mw).clamp_min(0)
        cc = cov * cov / (vf * vw + 1e-5)
        return -cc.mean(1).sum()
    if os.environ['LOSS'] == 'lncc':
        S.feature_loss = lncc_loss
    else:
        MU = float(os.environ.get('MU', 1))
        def hybrid(fixed, warped):
            ff, fw = fixed[:, 1:], warped[:, 1:]
            e = float(ff.reshape(ff.shape[1], -1).var(1).mean()) + 1e-12
            mse = (fw - ff).square().mean(1).sum() / e
            return mse + MU * lncc_loss(fixed[:, :1], warped[:, :1])
        S.feature_loss = hybrid
orig = R.register_arrays
def wrapped(fixed, moving, model=None, **k):
    if os.environ.get('MODEL') == 'intensity':
        def model(x):
            return R.intensity_features(x)
        model.scales = (4, 2, 1)
        if 'RES' in os.environ:
            model.res_mm = float(os.environ['RES'])
    if os.environ.get('MODEL') == 'hybrid':
        net = R.load_dio(None, 'cpu')
        import torch
        def model(x):
            return [torch.cat([i, f], 1) for i, f in zip(R.intensity_features(x), net(x))]
        model.scales = net.config.scales
        model.res_mm = net.config.res_mm
        model.divisor = net.config.divisor
        k['iterations'] = net.config.iterations
    if 'ITERS' in os.environ:
        k['iterations'] = R.DEFAULT_SOLVER.iterations
    if 'PC' in os.environ:
        k['prompt_channels'] = int(os.environ['PC'])
    if os.environ.get('DUMP'):
        import numpy as np
        lab = k.get('labels')
        np.savez_compressed(os.environ['DUMP'], fixed=fixed, moving=moving,
                            lf=lab[0] if lab else 0, lm=lab[1] if lab else 0,
                            spacing=k.get('spacing_mm') or (1, 1, 1))
    out = orig(fixed, moving, model, **k)
    print('HOOK timings', out['timings'], {r: out[r].get('iterations') for r in ('diffeo', 'ffd') if r in out}, flush=True)
    return out
R.register_arrays = wrapped
_orig_resolve = R._resolve_model
def _resolve(m, dev):
    out = _orig_resolve(m, dev)
    if getattr(m, 'divisor', None):
        out = out[:3] + (m.divisor,) + out[4:]
    return out
R._resolve_model = _resolve
script = Path('/work/main/benchmarks') / os.environ.get('SCRIPT', 'run_registration_benchmark.py')
sys.argv = [str(script)] + sys.argv[1:]
runpy.run_path(str(script), run_name='__main__')
