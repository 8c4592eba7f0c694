#!/usr/bin/env python
"""Throughput of the synthesis engine next to the training step it feeds.

    python benchmarks/bench_synthesis.py [--label-maps DIR] [--repeats N] [--out DIR]

For each grid (96^3 at 2 mm, 160^3 at 1 mm, and the CPU recipe's 64^3 training crop) it
times single samples, pairs (two deformations of one anatomy with their correspondence) and,
for the training grids, one optimisation step of the network that consumes them, in the same
run, on the same threads. The ratio synthesis / step says whether synthesis is the bottleneck
(well below 1: it is not). Without the SynthSeg maps, a label map is drawn from Colin27's
AAL-derived map (``keyprep.pipeline.synth.anatomies``).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from keyprep.pipeline.synth.generator import SynthConfig, Synthesizer, load_label_map
from keyprep.pipeline.synth.train import RECIPES, TrainConfig, train_step
from keyprep.pipeline.synth.unet import UNet3D

GRIDS = [  # name, shape, resolution, network recipe whose step is timed (or None)
    ('train-crop 64^3 @2mm (cpu-2mm recipe)', (64, 64, 64), 2.0, 'cpu-2mm'),
    ('96^3 @2mm', (96, 96, 96), 2.0, None),
    ('160^3 @1mm', (160, 160, 160), 1.0, None),
]


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--label-maps', type=Path,
                    default=Path(__file__).resolve().parents[2] / 'shared/data/synthseg/training_label_maps')
    ap.add_argument('--repeats', type=int, default=5)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--out', type=Path, default=Path(__file__).parent / 'results')
    opts = ap.parse_args(argv)
    torch.set_num_threads(opts.threads)
    if opts.label_maps.is_dir():
        maps = [load_label_map(f) for f in sorted(opts.label_maps.glob('*.nii.gz'))[:4]]
        source = 'SynthSeg training maps 01-04'
    else:
        from keyprep.pipeline.synth.anatomies import colin27_label_map

        maps = [colin27_label_map()]
        source = 'Colin27 AAL-derived map'
    rows = []
    for name, shape, res, recipe in GRIDS:
        synth = Synthesizer(maps, SynthConfig(shape=shape, res_mm=res))
        gen = torch.Generator().manual_seed(0)
        t_one = _time(lambda: synth.sample(1, gen), opts.repeats)
        t_pair = _time(lambda: synth.sample_pair(gen), max(2, opts.repeats // 2))
        t_step = np.nan
        if recipe is not None:
            cfg: TrainConfig = RECIPES[recipe]
            model = UNet3D(cfg.unet)
            optim = torch.optim.Adam(model.parameters(), lr=1e-4)
            batch = synth.sample(cfg.batch_size, gen)
            t_step = _time(lambda: train_step(model, optim, batch, cfg, torch.device('cpu')),
                           max(2, opts.repeats // 2))
        rows.append({'grid': name, 'volumes_per_s': 1 / t_one, 'sample_s': t_one, 'pair_s': t_pair,
                     'train_step_s': t_step, 'synth_over_step': t_one / t_step if recipe else np.nan})
        print(rows[-1], flush=True)
    opts.out.mkdir(parents=True, exist_ok=True)
    import pandas as pd

    df = pd.DataFrame(rows)
    df.to_csv(opts.out / 'synthesis_throughput.tsv', sep='\t', index=False, float_format='%.4g')
    lines = ['# Synthesis engine throughput', '',
             f'{platform.machine()}, {opts.threads} torch threads, torch {torch.__version__}; '
             f'label maps: {source}; batch 1; {opts.repeats} repeats after a warm-up.', '',
             '| grid | volumes/s | s per volume | s per pair | training step (s) | synthesis / step |',
             '|---|---|---|---|---|---|']
    for r in rows:
        step = '' if np.isnan(r['train_step_s']) else f"{r['train_step_s']:.2f}"
        ratio = '' if np.isnan(r['synth_over_step']) else f"{r['synth_over_step']:.3f}"
        lines.append(f"| {r['grid']} | {r['volumes_per_s']:.2f} | {r['sample_s']:.3f} | {r['pair_s']:.3f} | "
                     f"{step} | {ratio} |")
    (opts.out / 'synthesis_throughput.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    return 0


if __name__ == '__main__':
    sys.exit(main())
