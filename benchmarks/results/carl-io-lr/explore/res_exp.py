import os, sys; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch; torch.set_num_threads(1)
from dataclasses import replace
from harness import *
model, _ = load_carl(None, 'cpu'); model.float()
base = model.cfg
for shape, res in [((96,)*3, 2.0), ((112,)*3, 1.75), ((128,)*3, 1.5)]:
    model.cfg = replace(base, shape=shape, res_mm=res)
    for c in CASES[:1] + CASES[3:]:
        print(shape, res, run(model, c, io_steps=0), flush=True)
