"""Engine-path check of a CARL training checkpoint on the 4 held-out 1 mm cases (harness)."""
import os, sys, json, shutil, tempfile; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch; torch.set_num_threads(1)
from harness import *
from keyprep.pipeline.carl.train import export_weights
ckpt = sys.argv[1]
tmp = Path(tempfile.mkdtemp())
shutil.copy(ckpt, tmp / 'ck.pt')
info = export_weights(tmp / 'ck.pt', tmp / 'carl.pt', recipe='cpu-deployed')
model, meta = load_carl(tmp / 'carl.pt', 'cpu')
res = {}
for p in (1, 2):
    ds = [run(model, c, io_steps=0, passes=p)['dice'] for c in CASES]
    res[p] = ds
print(json.dumps({'step': meta['step'], 'passes1': res[1], 'mean1': round(sum(res[1]) / 4, 2),
                  'passes2': res[2], 'mean2': round(sum(res[2]) / 4, 2)}), flush=True)
