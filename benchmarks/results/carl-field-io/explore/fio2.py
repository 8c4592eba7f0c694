# field IO on the original (not contrast-transferred) images
import os, sys, json
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fio.py')).read().split('model, _ =')[0])
import numpy as np
_orig_run = H.run
def run(model, case, **kw):
    d = H.prepare(case)
    orig = kw.pop('orig', False)
    if orig:
        kw['field_images'] = (d['f'], d['m'])
    return _orig_run(model, case, **kw)
model, _ = H.load_carl(None, 'cpu')
cfgs = json.loads(sys.argv[1])
for c in sys.argv[2].split(','):
    for kw in cfgs:
        print(json.dumps(kw), run(model, c, **dict(kw)), flush=True)
