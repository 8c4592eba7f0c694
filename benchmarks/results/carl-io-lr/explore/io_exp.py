import os, sys, copy, time, json; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch, numpy as np; torch.set_num_threads(1)
import torch.nn.functional as F
from harness import *
from keyprep.pipeline.carl.network import (normalise_intensity, _working_grid, _to_working, _to_input,
    label_fractions, symmetrise, compose, warp)
from keyprep.pipeline.carl.losses import pair_loss

def io_curve(model, case, mode='refine2', steps=20, lr=5e-4, lam=1.5, label_weight=1.0, every=5, sym=True, sigma=4.0, label_level=1):
    d = prepare(case); f, m = inputs(d); sp = d['spacing']
    cfg = model.cfg
    fn, mn = normalise_intensity(f), normalise_intensity(m)
    centre, res = _working_grid(fn, mn, sp, cfg)
    fw = _to_working(fn, centre, res, sp, cfg.shape, 'cpu').clamp(0, 1)
    mw = _to_working(mn, centre, res, sp, cfg.shape, 'cpu').clamp(0, 1)
    lf, lm, k = label_fractions(d['fl'], d['ml'], centre, res, sp, cfg.shape, 'cpu')
    M, Fx = torch.cat([mw, fw]), torch.cat([fw, mw])
    net = copy.deepcopy(model).float(); net.train()
    with torch.no_grad():
        st = net.steps(M, Fx)
    u1, u2 = st['u1'], st['u2']
    if mode == 'refine2':
        params = list(net.refine2.parameters())
    elif mode == 'refine':
        params = list(net.refine1.parameters()) + list(net.refine2.parameters())
    else:
        params = list(net.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    m1, f1 = F.avg_pool3d(M, 2), F.avg_pool3d(Fx, 2)
    def forward():
        if mode == 'refine2':
            psi2 = net.refine2(torch.cat([warp(M, 0, u1, 1), Fx], 1))
            return compose(u1, 1, psi2, 0)
        if mode == 'refine':
            psi1 = net.refine1(torch.cat([warp(m1, 1, u2, 2), f1], 1))
            uu1 = compose(u2, 2, psi1, 1)
            psi2 = net.refine2(torch.cat([warp(M, 0, uu1, 1), Fx], 1))
            return compose(uu1, 1, psi2, 0)
        return net(M, Fx)
    prompt = {'onehot_moving': torch.cat([lm, lf]), 'onehot_fixed': torch.cat([lf, lm]),
              'dice_weight': label_weight, 'label_level': label_level} if label_weight > 0 else {}
    gen = torch.Generator().manual_seed(0)
    curve = []; losses = []; parts = []
    def evaluate(i, t):
        with torch.no_grad():
            u = forward()
            a, b = (symmetrise(u[:1], u[1:]) if sym else (u[:1], u[1:]))
            disp = _to_input(a, centre, res, sp, f.shape)[0].numpy()
        J = None
        curve.append((i, round(score(d, disp), 2), round(t, 1)))
    t0 = time.time(); tio = 0
    evaluate(0, 0)
    for i in range(1, steps + 1):
        ts = time.time()
        u = forward()
        terms = pair_loss(M, Fx, u, phase='gradicon', lam=lam, sigma=sigma, squared=True, generator=gen, **prompt)
        opt.zero_grad(); terms['loss'].backward(); opt.step()
        tio += time.time() - ts
        losses.append(round(float(terms['loss']), 4)); parts.append((round(float(terms['sim']), 4), round(float(terms['reg']), 4), round(float(terms.get('dice', 0)), 4)))
        if i % every == 0:
            evaluate(i, tio)
    return curve, losses, parts[:1] + parts[-1:]

if __name__ == '__main__':
    cfgs = json.loads(sys.argv[1])
    cases = sys.argv[2].split(',') if len(sys.argv) > 2 else CASES
    model, _ = load_carl(None, 'cpu')
    for c in cases:
        for kw in cfgs:
            print(c[:20], kw, io_curve(model, c, **kw), flush=True)
