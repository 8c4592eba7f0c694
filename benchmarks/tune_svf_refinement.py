#!/usr/bin/env python
"""Sweep of keymorphTPS's deformable refinement (grid, steps, Adam rate) on held-out pairs.

Reads the images and label maps that ``benchmarks/run_intersubject_benchmark.py`` wrote into
its work folder (``<work>/intersubject/res-2_seed-0/subjects/<subject>_<contrast>/``), runs
keymorphTPS (lambda 1, ``--keymorph-refine deformable``) with the true label maps as the
keypoints' source, and prints per setting the mean structure Dice of the refined result
(structures over 20 voxels, nearest-neighbour warped labels) and the median refinement and
whole-run times (one thread). How the defaults of ``keyprep.pipeline.engines.keymorph``
(``DEFAULT_SVF_REFINE_*``) were chosen:

    python benchmarks/tune_svf_refinement.py --work-dir /tmp/prof/work \
        --setting 4:40:0.25 4:20:0.5 3:20:0.5 4:10:0.75
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from pathlib import Path

import nibabel as nb
import numpy as np

from keyprep.pipeline.benchmark import mean_structure_dice

#: (fixed subject, moving subject_contrast); every fixed image is T1-like
PAIRS = [('seg15', 'seg14_t1'), ('seg15', 'seg16_t1'), ('seg16', 'seg14_t1'),
         ('seg15', 'seg14_t2'), ('seg15', 'seg16_t2'), ('seg16', 'seg14_t2')]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--work-dir', type=Path, required=True,
                    help='work folder of run_intersubject_benchmark.py (2 mm, seed 0)')
    ap.add_argument('--setting', nargs='+', default=['4:20:0.5'], metavar='RES:STEPS:LR',
                    help='refinement grid (mm), steps and Adam rate (mm)')
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    import keyprep.pipeline.keymorph.refine as R
    from keyprep.pipeline.registration import run_engine_variants
    from keyprep.pipeline.transforms import apply_transforms

    subjects = args.work_dir / 'intersubject' / 'res-2_seed-0' / 'subjects'
    missing = [p for f, m in PAIRS for p in (subjects / f'{f}_t1', subjects / m)
               if not (p / 'image.nii.gz').exists()]
    if missing:
        raise SystemExit(f'tune_svf_refinement: missing {missing[0]}: run '
                         'run_intersubject_benchmark.py with this --work-dir first')
    refine_svf = R.refine_svf
    print('setting\tdice_refined\tdice_unrefined\trefine_s_median\trun_s_median')
    for setting in args.setting:
        res, steps, lr = setting.split(':')
        R.refine_svf = functools.partial(refine_svf, lr=float(lr))  # the engine's rate
        refined, plain, t_ref, t_run = [], [], [], []
        with tempfile.TemporaryDirectory() as tmp:
            for i, (fx, mv) in enumerate(PAIRS):
                fdir, mdir = subjects / f'{fx}_t1', subjects / mv
                labels = {'fixed': str(fdir / 'labels.nii.gz'),
                          'moving': str(mdir / 'labels.nii.gz')}
                runs = run_engine_variants(
                    'keymorphTPS', fdir / 'image.nii.gz', mdir / 'image.nii.gz',
                    Path(tmp) / str(i), labels=labels,
                    params={'lambdas': [1.0], 'refine': 'deformable',
                            'refine_steps': int(steps), 'refine_resolution_mm': float(res)},
                    contrasts={'fixed': 'T1w', 'moving': 'T2w' if mv.endswith('t2') else 'T1w'})
                truth = np.asarray(nb.load(labels['fixed']).dataobj)
                for run, out in zip(runs, (plain, refined)):
                    w = apply_transforms(labels['moving'], fdir / 'image.nii.gz', [run.fwd_xfm],
                                         Path(tmp) / f'{i}_{run.method}.nii.gz',
                                         interpolation='nearestNeighbor')
                    out.append(mean_structure_dice(truth, np.asarray(nb.load(str(w)).dataobj)))
                t_ref.append(runs[1].extras['refine_time_s'])
                t_run.append(runs[1].runtime_s)
        print(f'{setting}\t{np.mean(refined):.4f}\t{np.mean(plain):.4f}\t'
              f'{np.median(t_ref):.2f}\t{np.median(t_run):.2f}', flush=True)
    R.refine_svf = refine_svf
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
