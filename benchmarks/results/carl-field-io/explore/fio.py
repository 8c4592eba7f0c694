import os, sys, json
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'carl-io-lr', 'explore'))
os.environ.setdefault('KP_BENCH_WORK', '/tmp/hw/work/intersubject/res-1_seed-0')
os.environ.setdefault('KP_HARNESS_CACHE', '/tmp/fx/cache')
import torch; torch.set_num_threads(1)
import harness as H
src = H.prepare.__code__
# the work folder has the carl engine's affine, not dio's
H.W = H.Path(os.environ['KP_BENCH_WORK'])
_orig = H.prepare
def prepare(case):
    link = H.W / 'runs' / case / 'dio'
    if not link.exists():
        link.symlink_to(H.W / 'runs' / case / 'carl')
    return _orig(case)
H.prepare = prepare
model, _ = H.load_carl(None, 'cpu')
cfgs = json.loads(sys.argv[1])
cases = sys.argv[2].split(',') if len(sys.argv) > 2 else H.CASES
for c in cases:
    for kw in cfgs:
        r = H.run(model, c, **dict(kw)); print(json.dumps(kw), r, flush=True)
