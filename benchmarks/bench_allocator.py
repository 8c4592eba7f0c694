"""keyprep's glibc allocator setting (:func:`keyprep.pipeline.resources.tune_allocator`), on
and off, in the same run: CARL on one 1 mm pair of real data, timed in fresh processes.

The pair: Debian's Colin27 brain (``ch2bet.nii.gz``, mricron-data) as the fixed image, and
the same brain moved by a smooth seeded displacement field (up to ``--amplitude`` mm) with a
gamma change of contrast as the moving image. Each run is a new Python process (the setting
is process-wide) that registers the pair with ``register_arrays`` as the carl engine calls
it (symmetrised export, ``--io-steps`` steps of instance optimisation) and reports its wall
time, user and system CPU time, minor page faults and peak resident memory, and a checksum
of the fields. The two settings alternate (``--reps`` runs each) so that a drift of the
machine's load falls on both. Writes ``allocator.tsv`` and ``README.md`` to ``--out``.

    python benchmarks/bench_allocator.py --out benchmarks/results/allocator
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--out', type=Path, default=Path('benchmarks/results/allocator'))
    p.add_argument('--reps', type=int, default=2, help='runs per setting (default 2)')
    p.add_argument('--io-steps', type=int, default=5)
    p.add_argument('--io-train', choices=('all', 'refine'), default='all')
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--amplitude', type=float, default=4.0,
                   help='largest displacement of the moving image, mm (default 4)')
    p.add_argument('--child', choices=('on', 'off'), help=argparse.SUPPRESS)
    return p


def make_pair(amplitude: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, tuple]:
    import nibabel as nb
    from scipy.ndimage import gaussian_filter, map_coordinates

    from keyprep.pipeline.targets import mricron_file

    img = nb.load(str(mricron_file('ch2bet.nii.gz')))
    fixed = np.asanyarray(img.dataobj).astype(np.float32)
    rng = np.random.default_rng(seed)
    field = np.stack([gaussian_filter(rng.standard_normal(fixed.shape), 12) for _ in range(3)])
    field *= amplitude / max(float(np.abs(field).max()), 1e-6)
    grid = np.indices(fixed.shape, dtype=np.float32) + field
    moving = map_coordinates(fixed, grid, order=1, mode='constant')
    moving = (np.clip(moving / max(float(moving.max()), 1e-6), 0, 1) ** 1.5).astype(np.float32)
    return fixed, moving, tuple(float(z) for z in img.header.get_zooms()[:3])


def child(opts) -> None:
    os.environ['KEYPREP_MALLOC_TUNING'] = '1' if opts.child == 'on' else '0'
    import torch

    from keyprep.pipeline.carl.network import load_carl, register_arrays
    from keyprep.pipeline.resources import tune_allocator

    tuned = tune_allocator()
    torch.set_num_threads(opts.threads)
    fixed, moving, spacing = make_pair(opts.amplitude)
    model, meta = load_carl(None, 'cpu')
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    out = register_arrays(fixed, moving, model, io_steps=opts.io_steps, seed=0,
                          io_lr=5e-4 / max(opts.io_steps, 1), spacing_mm=spacing,
                          io_similarity=(meta.get('recipe') or {}).get('similarity') or 'lncc',
                          symmetric=True, io_train=opts.io_train)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    digest = hashlib.sha256(out['disp_fwd'].tobytes() + out['disp_inv'].tobytes()).hexdigest()
    print(json.dumps({'setting': opts.child, 'in_force': tuned, 'wall_s': round(wall, 2),
                      'user_s': round(r1.ru_utime - r0.ru_utime, 2),
                      'sys_s': round(r1.ru_stime - r0.ru_stime, 2),
                      'minor_faults': r1.ru_minflt - r0.ru_minflt,
                      'peak_rss_mb': round(r1.ru_maxrss / 1024, 1),
                      'io_s': round(out['timings']['io_s'], 2), 'fields_sha256': digest[:16]}))


def main(argv=None) -> int:
    opts = build_parser().parse_args(argv)
    if opts.child:
        child(opts)
        return 0
    import pandas as pd

    rows = []
    for rep in range(opts.reps):
        for setting in ('on', 'off'):
            cmd = [sys.executable, __file__, '--child', setting, '--io-steps', str(opts.io_steps),
                   '--io-train', opts.io_train, '--threads', str(opts.threads),
                   '--amplitude', str(opts.amplitude)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row = {'rep': rep, **json.loads(res.stdout.strip().splitlines()[-1])}
            print(row, flush=True)
            rows.append(row)
    df = pd.DataFrame(rows)
    opts.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(opts.out / 'allocator.tsv', sep='\t', index=False)
    med = df.groupby('setting')[['wall_s', 'user_s', 'sys_s', 'minor_faults', 'peak_rss_mb',
                                 'io_s']].median()
    same = df['fields_sha256'].nunique() == 1
    cmdline = 'python benchmarks/bench_allocator.py ' + ' '.join(argv or sys.argv[1:])
    lines = ['# glibc allocator setting on and off (CARL, one 1 mm pair of real data)', '',
             f'Generated by `{cmdline}` on {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}'
             f' ({opts.reps} fresh processes per setting, alternating; {opts.threads} torch '
             f'thread(s); CARL with {opts.io_steps} steps of instance optimisation on '
             f'{opts.io_train} weights).', '',
             'Medians (`allocator.tsv` has every run):', '',
             '| setting | wall s | user s | system s | minor page faults | peak RSS MB | IO s |',
             '|---|---|---|---|---|---|---|']
    for s in ('on', 'off'):
        r = med.loc[s]
        lines.append(f'| {s} | {r.wall_s:.1f} | {r.user_s:.1f} | {r.sys_s:.1f} | '
                     f'{int(r.minor_faults)} | {r.peak_rss_mb:.0f} | {r.io_s:.1f} |')
    lines += ['', f'Wall time ratio on/off: {med.loc["on", "wall_s"] / med.loc["off", "wall_s"]:.2f}.'
              f' Fields identical in every run: {"yes" if same else "NO"}.', '']
    (opts.out / 'README.md').write_text('\n'.join(lines))
    print('\n'.join(lines))
    return 0


if __name__ == '__main__':
    sys.exit(main())
