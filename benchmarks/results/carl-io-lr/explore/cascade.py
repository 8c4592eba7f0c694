import os, sys; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch, time; torch.set_num_threads(1)
from harness import *
from keyprep.pipeline.carl.network import (normalise_intensity, _working_grid, _to_working, _to_input,
    symmetrise, compose, warp)
model, _ = load_carl(None, 'cpu'); model.float().eval()
cases = sys.argv[1].split(',') if len(sys.argv) > 1 else CASES
for case in cases:
    d = prepare(case); f, m = inputs(d); sp = d['spacing']; cfg = model.cfg
    fn, mn = normalise_intensity(f), normalise_intensity(m)
    centre, res = _working_grid(fn, mn, sp, cfg)
    fw = _to_working(fn, centre, res, sp, cfg.shape, 'cpu').clamp(0, 1)
    mw = _to_working(mn, centre, res, sp, cfg.shape, 'cpu').clamp(0, 1)
    t0 = time.time()
    with torch.no_grad():
        U, Ui = torch.zeros(1, 3, *cfg.shape), torch.zeros(1, 3, *cfg.shape)
        out = []
        for p in range(4):
            mcur = warp(mw, 0, U, 0) if p else mw
            u = model(torch.cat([mcur, fw]), torch.cat([fw, mcur]))
            a, b = symmetrise(u[:1], u[1:])
            U, Ui = compose(U, 0, a, 0), compose(b, 0, Ui, 0)
            disp = _to_input(U, centre, res, sp, f.shape)[0].numpy()
            out.append((p + 1, round(score(d, disp), 2), round(time.time() - t0, 1)))
    print(case, out, flush=True)
