#!/usr/bin/env python
"""Evaluate keyprep's label network: held-out synthetic volumes and real heads.

    python benchmarks/eval_synthseg.py [--weights PATH] [--label-maps DIR] [--out DIR] [--quick]

Writes ``<out>/synthseg_eval.tsv`` (one row per case and structure), ``synthseg_eval.json``
(summaries, timings, machine) and ``synthseg_eval.md`` (the tables of the model card).

1. **Held-out synthetic**: the held-out SynthSeg maps (never used in training), synthesised at
   1 mm with skull: random contrasts (SynthSeg's generative model, 3 seeds each), T1-, T2-, PD-
   and FLAIR-like contrasts (fixed tissue intensities, never seen as such in training), and a
   1x1x5 mm thick-slice T1; Dice per structure against the exact labels.
2. **Real heads**: Colin27 (ch2, T1 with skull): brain-mask Dice against ch2bet and (0.5 mm)
   ch2better, next to deepbet's; time and peak memory of labelling it at 1 mm (and deepbet's).
3. **Colin27 structures**: labels of the real T1 against keyprep's AAL-derived Colin27 map
   (an approximate reference: see docs/synthseg_labels.md).
4. **Contrast consistency**: labels of the real T1 against labels of a T2-like image
   synthesised from the Colin27 map on the same grid.
5. **Real deformation**: Colin27 moved by nitransforms' real displacement field; network labels
   of the moved head against (a) the reference labels moved by the same field and (b) the
   network's own labels of the original head moved by the field (equivariance).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from keyprep.pipeline import perturb as pt
from keyprep.pipeline.resources import measure
from keyprep.pipeline.targets import mricron_file
from keyprep.pipeline.synth.generator import SynthConfig, Synthesizer, grid_affine, load_label_map
from keyprep.pipeline.synth.labeller import LabelNetwork, default_weights
from keyprep.pipeline.synth.labels import OUTPUT_LABELS, OUTPUT_NAMES
from keyprep.pipeline.synth.train import HELD_OUT

STRUCTURES = [lab for lab in OUTPUT_LABELS if lab != 0]

CONDITIONS = {  # name -> (contrast, fixed acquisition resolution)
    'random-gmm': (None, None),
    't1-like': ('t1', None),
    't2-like': ('t2', None),
    'pd-like': ('pd', None),
    'flair-like': ('flair', None),
    't1-1x1x5mm': ('t1', (1.0, 1.0, 5.0)),
}


def dice_rows(pred: np.ndarray, truth: np.ndarray, **meta) -> list[dict]:
    rows = []
    for lab in STRUCTURES:
        p, t = pred == lab, truth == lab
        denom = int(p.sum()) + int(t.sum())
        if not t.any():
            continue
        rows.append({**meta, 'label': lab, 'structure': OUTPUT_NAMES[lab],
                     'dice': round(2 * int((p & t).sum()) / denom, 4) if denom else np.nan,
                     'truth_voxels': int(t.sum())})
    return rows


def mask_dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return round(2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum())), 4)


def held_out_synthetic(net: LabelNetwork, maps_dir: Path, quick: bool, pose: str = 'auto') -> tuple[list[dict], dict]:
    """The validation set of training (:func:`~keyprep.pipeline.synth.validation.heldout_volumes`:
    held-out maps x T1/T2/PD/FLAIR-like x with/without skull, 1 mm), scored by
    :func:`~keyprep.pipeline.synth.validation.score_volumes` (``LabelNetwork.predict``, the
    deployment path); then SynthSeg's random contrasts (3 seeds) and a 1x1x5 mm T1."""
    from keyprep.pipeline.synth.validation import heldout_volumes, score_volumes

    maps = [load_label_map(maps_dir / f'{name}.nii.gz') for name in HELD_OUT
            if (maps_dir / f'{name}.nii.gz').exists()]
    shape = (176, 208, 176)
    rows = []
    vols = heldout_volumes(maps, contrasts=('t1',) if quick else ('t1', 't2', 'pd', 'flair'))
    res = score_volumes(net, vols, pose=pose, log=lambda m: print(m, flush=True))
    for name, d in res['per_volume_structure'].items():
        subject, contrast, skull = name.split(':')
        for lab, dice in d.items():
            rows.append({'case': 'validation-set', 'condition': f'{contrast}-like:{skull}', 'subject': subject,
                         'seed': 0, 'label': lab, 'structure': OUTPUT_NAMES[lab], 'dice': round(dice, 4),
                         'truth_voxels': int((vols[[v.name for v in vols].index(name)].truth == lab).sum())})
    validation = {'n_volumes': len(vols), 'mean_dice': round(res['mean_dice'], 4),
                  'min_volume_dice': round(min(res['per_volume'].values()), 4),
                  'worst_volumes': [(n, round(d, 4)) for n, d in res['worst']],
                  'volumes_below_0.5': [n for n, d in res['per_volume'].items() if d < 0.5],
                  'per_volume': {n: round(d, 4) for n, d in res['per_volume'].items()}, 'pose': pose}
    conditions = {} if quick else {k: v for k, v in CONDITIONS.items() if k in ('random-gmm', 't1-1x1x5mm')}
    for cname, (contrast, acq) in conditions.items():
        cfg = SynthConfig(shape=shape, res_mm=1.0).evaluation(contrast, acq)
        synth = Synthesizer(maps, cfg)
        seeds = (0, 1, 2) if contrast is None else (0,)
        for i, m in enumerate(maps):
            for seed in seeds:
                s = synth.synthesize(i, torch.Generator().manual_seed(1000 * seed + i))
                img = nib.Nifti1Image(s['image'].numpy().astype(np.float32), grid_affine(shape, 1.0))
                truth = np.asarray(OUTPUT_LABELS)[s['labels'].numpy()]
                pred = np.asarray(net.predict(img, pose=pose).labels.dataobj)
                rows += dice_rows(pred, truth, case='held-out-synthetic', condition=cname,
                                  subject=m.name, seed=seed)
                print(f'  {cname} {m.name} seed {seed}: mean Dice '
                      f'{np.nanmean([r["dice"] for r in rows[-len(STRUCTURES):]]):.3f}', flush=True)
    return rows, validation


def real_heads(net: LabelNetwork, quick: bool) -> tuple[list[dict], dict]:
    from keyprep.pipeline.anatomy import deepbet_mask
    from keyprep.pipeline.io import conform
    from keyprep.pipeline.synth import anatomies

    summary: dict = {}
    rows: list[dict] = []
    ch2 = conform(nib.load(str(mricron_file('ch2.nii.gz'))))
    bet = np.asarray(nib.load(str(mricron_file('ch2bet.nii.gz'))).dataobj) > 0
    # speed and memory of one 1 mm head (the model is loaded already)
    db_img = nib.Nifti1Image(deepbet_mask(ch2).astype(np.uint8), ch2.affine)
    net.predict(ch2, reference_mask=db_img)  # warm-up
    with measure() as m:  # as a participant run: deepbet's mask is the self-check's reference
        res = net.predict(ch2, reference_mask=db_img)
    summary['label_1mm_head'] = {'wall_s': round(m.wall_s, 2), 'peak_rss_mb': round(m.peak_rss_mb),
                                 'timings': {k: round(v, 2) for k, v in res.timings.items()},
                                 'threads': torch.get_num_threads(), 'check': res.check}
    with measure() as m2:
        db = deepbet_mask(ch2)
    summary['deepbet_1mm_head'] = {'wall_s': round(m2.wall_s, 2), 'peak_rss_mb': round(m2.peak_rss_mb)}
    mask = np.asarray(res.mask.dataobj)
    summary['mask_dice_vs_ch2bet'] = mask_dice(mask, bet)
    summary['deepbet_mask_dice_vs_ch2bet'] = mask_dice(db, bet)
    better = nib.load(str(mricron_file('ch2better.nii.gz')))
    grid = pt.Grid.of(better)
    ours_hr = pt.resample(mask.astype(np.uint8), ch2.affine, grid, pt.KnownTransform(), order=0)
    db_hr = pt.resample(db.astype(np.uint8), ch2.affine, grid, pt.KnownTransform(), order=0)
    better_mask = np.asarray(better.dataobj) > 0
    summary['mask_dice_vs_ch2better'] = mask_dice(ours_hr, better_mask)
    summary['deepbet_mask_dice_vs_ch2better'] = mask_dice(db_hr, better_mask)
    labels_t1 = np.asarray(res.labels.dataobj)
    ref_img = anatomies.colin27_ground_truth()
    ref = np.asarray(ref_img.dataobj)
    rows += dice_rows(labels_t1, ref, case='colin27-real-t1', condition='t1-real', subject='colin27', seed=0)
    # contrast consistency: T2-like synthesised from the Colin27 map on the ch2 grid
    cmap = anatomies.colin27_label_map()
    shape = ch2.shape[:3]
    cfg = replace(SynthConfig(shape=shape, res_mm=1.0).evaluation('t2'), shape=shape)
    # place the synthetic grid exactly on ch2's grid: centre the synthesiser on ch2's centre
    centre = ch2.affine[:3, :3] @ ((np.asarray(shape) - 1) / 2) + ch2.affine[:3, 3]
    cmap.centre_mm = centre
    synth = Synthesizer([cmap], cfg)
    s = synth.synthesize(0, torch.Generator().manual_seed(5))
    t2 = nib.Nifti1Image(s['image'].numpy().astype(np.float32), ch2.affine)
    labels_t2 = np.asarray(net.predict(t2).labels.dataobj)
    rows += dice_rows(labels_t2, labels_t1, case='colin27-t1-vs-synthetic-t2', condition='consistency',
                      subject='colin27', seed=0)
    rows += dice_rows(labels_t2, ref, case='colin27-synthetic-t2', condition='t2-like', subject='colin27',
                      seed=0)
    # the real nitransforms field
    field = pt.load_fsl_displacement_field().recentred(pt.center_of_mass(ch2))
    xfm = pt.KnownTransform(np.eye(4), field)
    lab_img = nib.Nifti1Image(labels_t1.astype(np.int16), ch2.affine)
    moved, (moved_ref, moved_ours) = pt.apply_known_transform(ch2, xfm, pt.Grid.of(ch2),
                                                             labels=[ref_img, lab_img])
    labels_moved = np.asarray(net.predict(moved).labels.dataobj)
    rows += dice_rows(labels_moved, np.asarray(moved_ref.dataobj), case='colin27-field-vs-reference',
                      condition='real-field', subject='colin27', seed=0)
    rows += dice_rows(labels_moved, np.asarray(moved_ours.dataobj), case='colin27-field-equivariance',
                      condition='real-field', subject='colin27', seed=0)
    return rows, summary


def summarise(rows: list[dict]) -> dict:
    import pandas as pd

    df = pd.DataFrame(rows)
    out = {}
    for (case, cond), g in df.groupby(['case', 'condition']):
        per_struct = g.groupby('structure')['dice'].mean()
        out[f'{case}:{cond}'] = {'mean_dice': round(float(per_struct.mean()), 4),
                                 'median_dice': round(float(per_struct.median()), 4),
                                 'worst': per_struct.nsmallest(3).round(3).to_dict(),
                                 'n_volumes': int(g[['subject', 'seed']].drop_duplicates().shape[0])}
    return out


def _validation_lines(v: dict | None) -> list[str]:
    if not v:
        return []
    lines = [f"## Validation set ({v['n_volumes']} held-out volumes, 1 mm, pose {v['pose']})", '',
             f"Mean structure Dice **{v['mean_dice']:.3f}**; lowest volume {v['min_volume_dice']:.3f}; "
             f"volumes below 0.5: {len(v['volumes_below_0.5'])}. Worst three: "
             + ', '.join(f'{n} {d:.3f}' for n, d in v['worst_volumes']) + '.', '',
             '| volume | mean structure Dice |', '|---|---|']
    lines += [f'| {n} | {d:.3f} |' for n, d in sorted(v['per_volume'].items())]
    return lines + ['']


def write_markdown(rows: list[dict], summary: dict, path: Path) -> None:
    import pandas as pd

    df = pd.DataFrame(rows)
    lines = ['# Label network evaluation', '', f"Weights: `{summary['weights']}` (sha256 "
             f"`{summary['sha256'][:16]}...`, step {summary['step']}); machine: {summary['machine']}.", '',
             *_validation_lines(summary.get('validation_set')),
             '## Mean Dice over the 32 structures', '', '| case | condition | volumes | mean | median | worst three |',
             '|---|---|---|---|---|---|']
    for key, s in summary['cases'].items():
        case, cond = key.split(':', 1)
        worst = ', '.join(f'{k} {v:.2f}' for k, v in s['worst'].items())
        lines.append(f"| {case} | {cond} | {s['n_volumes']} | {s['mean_dice']:.3f} | "
                     f"{s['median_dice']:.3f} | {worst} |")
    lines += ['', '## Dice per structure (held-out synthetic, mean over volumes)', '']
    syn = df[df['case'] == 'held-out-synthetic']
    if len(syn):
        table = syn.pivot_table(index='structure', columns='condition', values='dice', aggfunc='mean')
        table = table.reindex([OUTPUT_NAMES[lab] for lab in STRUCTURES]).dropna(how='all')
        lines.append('| structure | ' + ' | '.join(table.columns) + ' |')
        lines.append('|---|' + '---|' * len(table.columns))
        for name, r in table.iterrows():
            lines.append(f'| {name} | ' + ' | '.join(f'{v:.3f}' for v in r.values) + ' |')
    if 'real' in summary:
        r = summary['real']
        lines += ['', '## Real head (Colin27, 1 mm, with skull)', '',
                  '| measure | label network | deepbet |', '|---|---|---|',
                  f"| brain-mask Dice vs ch2bet | {r['mask_dice_vs_ch2bet']:.3f} | {r['deepbet_mask_dice_vs_ch2bet']:.3f} |",
                  f"| brain-mask Dice vs ch2better (0.5 mm) | {r['mask_dice_vs_ch2better']:.3f} | "
                  f"{r['deepbet_mask_dice_vs_ch2better']:.3f} |",
                  f"| wall time (s) | {r['label_1mm_head']['wall_s']} | {r['deepbet_1mm_head']['wall_s']} |",
                  f"| peak RSS of the process (MB) | {r['label_1mm_head']['peak_rss_mb']} | "
                  f"{r['deepbet_1mm_head']['peak_rss_mb']} |"]
    path.write_text('\n'.join(lines) + '\n')


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--weights', type=Path, default=default_weights())
    ap.add_argument('--label-maps', type=Path,
                    default=Path(__file__).resolve().parents[2] / 'shared/data/synthseg/training_label_maps')
    ap.add_argument('--out', type=Path, default=Path(__file__).parent / 'results')
    ap.add_argument('--quick', action='store_true', help='two synthetic conditions, one seed')
    ap.add_argument('--skip-real', action='store_true')
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--pose', default='auto', choices=('auto', 'header'),
                    help="the labeller's pose mode (default: auto, as a participant run)")
    opts = ap.parse_args(argv)
    torch.set_num_threads(opts.threads)
    torch.manual_seed(0)
    net = LabelNetwork(opts.weights)
    rows: list[dict] = []
    summary: dict = {'weights': str(opts.weights.name), 'sha256': net.sha256, 'step': net.step,
                     'machine': f'{platform.processor() or platform.machine()}, {opts.threads} threads, '
                                f'torch {torch.__version__}, {net.precision} inference'}
    t0 = time.time()
    if opts.label_maps.is_dir():
        syn_rows, summary['validation_set'] = held_out_synthetic(net, opts.label_maps, opts.quick, opts.pose)
        rows += syn_rows
    else:
        print(f'no held-out label maps at {opts.label_maps}: synthetic part skipped', file=sys.stderr)
    if not opts.skip_real:
        real_rows, real = real_heads(net, opts.quick)
        rows += real_rows
        summary['real'] = real
    summary['cases'] = summarise(rows)
    summary['eval_s'] = round(time.time() - t0, 1)
    opts.out.mkdir(parents=True, exist_ok=True)
    import pandas as pd

    pd.DataFrame(rows).to_csv(opts.out / 'synthseg_eval.tsv', sep='\t', index=False)
    (opts.out / 'synthseg_eval.json').write_text(json.dumps(summary, indent=1, default=float))
    write_markdown(rows, summary, opts.out / 'synthseg_eval.md')
    print((opts.out / 'synthseg_eval.md').read_text())
    return 0


if __name__ == '__main__':
    sys.exit(main())
