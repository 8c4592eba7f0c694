import sys, time, numpy as np, torch
torch.set_num_threads(1)
exec(open(__import__('os').path.join(__import__('os').path.dirname(__import__('os').path.abspath(__file__)), 'field_io.py')).read().split("evalu(unet[:1]")[0])
from keyprep.pipeline.carl.network import refine_field
for sched in ([(2, 20, 0.1)], [(2, 30, 0.1)], [(2, 20, 0.1), (1, 10, 0.05)], [(2, 20, 0.1), (1, 10, 0.1)]):
    t0 = time.time(); u = unet
    for lev, st, lr in sched:
        u, _ = refine_field(u, m, f, st, lr=lr, level=lev, similarity='lncc2')
    evalu(u[:1], str(sched), t0)
