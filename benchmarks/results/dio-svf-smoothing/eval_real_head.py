"""DIO on the real head of a finished ``keyprep-demo`` run, with solver settings overridden.

Reads the demo's work folder (the prepared Colin27 head and ICBM 2009a target, their label
network maps and tissue segmentations, keymorphAffine's transform), runs the ``dio`` engine
again exactly as the workflow does (same inputs, label prompting at its default), and scores
the result: tissue Dice (GM/WM/CSF from the intensity model: independent of the label
network, which prompting aligns) and structure Dice (label network, not independent), both
in %; the % of target-brain voxels with J <= 0, the smallest and largest J there and the
std of log J (keyprep's QC warns above 0.5); the round-trip error of the exported forward
and inverse fields in the target brain (mm).

    python eval_real_head.py WORK NAME '{"sigma_velocity": 0.5, "params": {...}}'

``WORK``: ``<demo out>/work``; the JSON sets fields of ``DEFAULT_SOLVER``
(:class:`keyprep.pipeline.dio.solver.SolverConfig`) and, under ``params``, engine
parameters. Prints one JSON line per variant.
"""
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import nibabel as nb
import numpy as np

import keyprep.pipeline.dio.register as R
from keyprep.pipeline.qc import dice_per_label
from keyprep.pipeline.registration import run_engine_variants
from keyprep.pipeline.transforms import apply_transforms, jacobian_map

work, name, over = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
W = work / 'keyprep_0_1_wf'
S = W / 'sub_01_wf'
T = W / 'target_wf' / 'prep_wf'
params = over.pop('params', {})
R.DEFAULT_SOLVER = replace(R.DEFAULT_SOLVER, **{k: tuple(v) if isinstance(v, list) else v
                                                for k, v in over.items()})
out = Path('/tmp/dio_real_head') / name
out.mkdir(parents=True, exist_ok=True)
t0 = time.time()
runs = run_engine_variants(
    'dio', T / 'bias_correct/n4_brain.nii.gz', S / 'anat_T1w_wf/bias_correct/n4_brain.nii.gz',
    out, fixed_mask=T / 'skull_strip/mask.nii.gz',
    moving_mask=S / 'anat_T1w_wf/skull_strip/mask.nii.gz',
    params={'representations': ['ffd', 'diffeo'], **params},
    contrasts={'fixed': 'T1w', 'moving': 'T1w'},
    init_transform=S / 'reg_T1w_keymorphAffine_wf/register/engine/xfm_fwd.txt',
    init_method='keymorphAffine',
    labels={'fixed': T / 'synthseg/synthseg.nii.gz',
            'moving': S / 'anat_T1w_wf/synthseg/synthseg.nii.gz'})
seconds = time.time() - t0
mask = np.asarray(nb.load(T / 'skull_strip/mask.nii.gz').dataobj) > 0
for r in runs:
    res = {}
    for key, src, ref in (('tissue', S / 'anat_T1w_wf/tissue_seg/dseg.nii.gz',
                           T / 'tissue_seg/dseg.nii.gz'),
                          ('struct', S / 'anat_T1w_wf/synthseg/synthseg.nii.gz',
                           T / 'synthseg/synthseg.nii.gz')):
        warped = apply_transforms(src, T / 'bias_correct/n4_brain.nii.gz', [str(r.fwd_xfm)],
                                  out / f'{r.method}_{key}.nii.gz', interpolation='genericLabel')
        d = dice_per_label(np.asarray(nb.load(ref).dataobj), np.asarray(nb.load(warped).dataobj))
        res[key] = round(100 * float(np.nanmean([v for k, v in d.items() if k])), 2)
    jac = np.asarray(jacobian_map(r.fwd_xfm, T / 'bias_correct/n4_brain.nii.gz',
                                  'deformable').dataobj)
    res['fold_pct'] = round(100 * float((jac[mask] <= 0).mean()), 4)
    res['jac_min'] = round(float(jac[mask].min()), 4)
    res['jac_max'] = round(float(jac[mask].max()), 2)
    pos = jac[mask][jac[mask] > 0]
    res['logjac_std'] = round(float(np.log(pos).std()), 4)  # keyprep's QC warns above 0.5
    res['inverse_consistency_mm'] = (r.inverse or {}).get('consistency')
    print(json.dumps({'name': name, 'method': r.method, **res, 'run_s': round(seconds, 1),
                      'variant_s': r.extras.get('variant_time_s'),
                      'iterations': r.extras.get('solver_iterations'), 'settings': sys.argv[3]}),
          flush=True)
