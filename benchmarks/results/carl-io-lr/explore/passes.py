import os, sys, json; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch; torch.set_num_threads(1)
from harness import *
model, _ = load_carl(None, 'cpu')
cfgs = json.loads(sys.argv[1])
for c in CASES:
    for kw in cfgs:
        r = run(model, c, **kw); print(json.dumps(kw), r, flush=True)
