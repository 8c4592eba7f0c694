#!/usr/bin/env python
"""Sweep of DIO's inner solver (iterations per level, gradient, integration) on held-out pairs.

Reads the images, label maps and keymorphAffine transforms that
``benchmarks/run_intersubject_benchmark.py`` wrote into its work folder (2 mm, seed 0, 0 deg,
run with ``--methods keymorphAffine ...``), pre-aligns each moving image, its true labels
with keymorphAffine (as the engine does), registers each pair through
``register_arrays`` (features recomputed per call; their median time is printed once), and
prints per solver setting and representation the mean structure Dice (structures
over 20 voxels, nearest-neighbour warped true labels), the % of voxels with J <= 0 and the
median solve time (one thread; the iterations per level are the first case's). Settings are ``name=json`` with :class:`SolverConfig` fields
and ``label_weight`` (label prompting with the label network's labels of both images,
``image_netlabels.nii.gz``, the moving one pre-aligned too)::

    python benchmarks/tune_dio_solver.py --work-dir /tmp/prof/work --weights /tmp/dio.pt \
        --setting 'old={}' 'no-full={"iterations": [200, 100, 0]}'
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import nibabel as nb
import numpy as np

from keyprep.pipeline.benchmark import mean_structure_dice

#: (fixed, moving) cases at 0 deg: moving subject_contrast onto a T1-like fixed subject
CASES = [('seg15', 'seg14_t1'), ('seg15', 'seg14_t2'), ('seg15', 'seg16_t1'),
         ('seg15', 'seg16_t2'), ('seg14', 'seg15_t1'), ('seg14', 'seg15_t2')]


def load_case(root: Path, fx: str, mv: str, tmp: Path):
    from keyprep.pipeline.transforms import apply_transforms

    subj, contrast = mv.rsplit('_', 1)
    case = f'{subj}-to-{fx}_{contrast}-t1_rot000'
    xfm = root / 'runs' / case / 'keymorphAffine' / 'keymorphAffine_fwd.txt'
    fdir, mdir = root / 'subjects' / f'{fx}_t1', root / 'subjects' / mv
    if not xfm.exists():
        raise SystemExit(f'tune_dio_solver: missing {xfm}: run run_intersubject_benchmark.py '
                         'with keymorphAffine and this --work-dir first')
    fimg = fdir / 'image.nii.gz'
    img = apply_transforms(mdir / 'image.nii.gz', fimg, [xfm], tmp / f'{case}_img.nii.gz')
    lab = apply_transforms(mdir / 'labels.nii.gz', fimg, [xfm], tmp / f'{case}_lab.nii.gz',
                           interpolation='nearestNeighbor')
    net = apply_transforms(mdir / 'image_netlabels.nii.gz', fimg, [xfm],
                           tmp / f'{case}_net.nii.gz', interpolation='nearestNeighbor')
    arr = lambda p: np.asarray(nb.load(str(p)).dataobj, dtype=np.float32)  # noqa: E731
    spacing = tuple(float(z) for z in nb.load(str(fimg)).header.get_zooms()[:3])
    prompts = (arr(fdir / 'image_netlabels.nii.gz'), arr(net))  # the label network's labels
    return (case, arr(fimg), arr(img), arr(fdir / 'labels.nii.gz'), arr(lab), spacing,
            prompts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--work-dir', type=Path, required=True)
    ap.add_argument('--weights', type=Path, default=None, help='DIO weights (default shipped)')
    ap.add_argument('--setting', nargs='+', default=['exact={}'], metavar='NAME=JSON',
                    help='SolverConfig fields ({} is the exact solver, not DEFAULT_SOLVER)')
    ap.add_argument('--representations', nargs='+', default=['diffeo', 'ffd'])
    ap.add_argument('--cases', type=int, default=len(CASES), help='first N cases')
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from keyprep.pipeline.dio import register as R
    from keyprep.pipeline.dio.network import load_dio
    from keyprep.pipeline.dio.solver import SolverConfig
    from keyprep.pipeline.dio.solver import jacobian_determinant

    def jacobian_fold_percent(disp, mask):
        det = jacobian_determinant(torch.as_tensor(disp)).numpy()
        inner = mask[1:-1, 1:-1, 1:-1]
        return float(100 * (det[inner] <= 0).mean())

    root = args.work_dir / 'intersubject' / 'res-2_seed-0'
    model = load_dio(args.weights, 'cpu')
    print('setting\trep\tcontrast\tdice\tdice_affine\tfold_pct\tsolve_s_median\titerations'
          '\tkept_variance', flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cases = [load_case(root, fx, mv, Path(tmp)) for fx, mv in CASES[:args.cases]]
        feats = {}
        for case, f, m, _fl, _ml, spacing, _p in cases:  # the features' time alone
            t0 = time.perf_counter()
            out = R.register_arrays(f, m, model, representations=[], spacing_mm=spacing)
            feats[case] = time.perf_counter() - t0
        print(f'# prepare + features: median {np.median(list(feats.values())):.2f} s per pair',
              flush=True)
        for setting in args.setting:
            name, _, js = setting.partition('=')
            opts = json.loads(js or '{}')
            label_weight = float(opts.pop('label_weight', 0.0))
            cfg = replace(SolverConfig(), **opts)
            for rep in args.representations:
                rows = {'t1': [], 't2': []}
                for case, f, m, flab, mlab, spacing, prompts in cases:
                    out = R.register_arrays(f, m, model, representations=[rep],
                                            spacing_mm=spacing, solver=cfg,
                                            iterations=cfg.iterations, labels=prompts,
                                            label_weight=label_weight)
                    disp = out[rep]['disp_fwd']
                    warped = R.warp_array(mlab, disp, order=0)
                    rows[case.split('_')[1][:2]].append(
                        (mean_structure_dice(flab, warped), mean_structure_dice(flab, mlab),
                         jacobian_fold_percent(disp, flab > 0), out[rep]['seconds'],
                         out[rep]['iterations'], out['kept_variance']))
                for contrast, rs in rows.items():
                    if not rs:
                        continue
                    d, d0, fo, s, it, kv = zip(*rs)
                    kept = np.round(np.mean(kv, axis=0), 4).tolist()
                    print(f'{name}\t{rep}\t{contrast}\t{np.mean(d):.4f}\t{np.mean(d0):.4f}\t'
                          f'{np.mean(fo):.3f}\t{np.median(s):.2f}\t{list(it[0])}\t{kept}',
                          flush=True)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
