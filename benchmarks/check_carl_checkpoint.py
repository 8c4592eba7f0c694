"""Judge a CARL training checkpoint on the path users run: through the engine, after its affine.

    python benchmarks/check_carl_checkpoint.py training/carl-postaffine/checkpoint.pt \
        --out /tmp/check-500 [--work-dir /tmp/bench/work] [--io-steps 0] [--field-steps 0] [--passes 1]
        [--threads 1]

The trainer's own validation registers centred synthetic brains on its 2 mm working grid; a
participant run registers 1 mm images after keymorphAffine, through the ``carl`` engine and
its symmetrised export. The two have disagreed by several Dice points (steps 250 -> 2250 of
``carl-dice``: the validation rose, the engine fell), so a checkpoint ships only after this
check. It exports the checkpoint (float16, as shipped) to ``<out>/carl.pt``, runs
``run_intersubject_benchmark.py`` on held-out label maps (default: 14 -> 15 and 16 -> 15, T1 -> T1
and T2 -> T1, 1 mm, no rotation) with ``keymorphAffine`` (CARL's start) and ``carl``, and
writes ``<out>/check.md``: each case's Dice (32 structures, %) for the start, carl (and
carlIO with ``--io-steps`` or ``--field-steps``), and carl minus its start. Exit status 0; the verdict is in the
table (``carl above its start on every case: yes/no``).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('checkpoint', type=Path, help='training checkpoint (keyprep train carl)')
    p.add_argument('--out', type=Path, required=True, help='folder for weights and tables')
    p.add_argument('--work-dir', type=Path, default=None,
                   help='benchmark work folder (images are cached there and reused)')
    p.add_argument('--pairs', nargs='+',
                   default=['training_seg_14:training_seg_15', 'training_seg_16:training_seg_15'])
    p.add_argument('--contrasts', nargs='+', default=['t1-t1', 't2-t1'])
    p.add_argument('--resolution', type=float, default=1.0)
    p.add_argument('--io-steps', type=int, default=0,
                   help="carlIO's weight-space IO steps (the paper's kind; default 0)")
    p.add_argument('--field-steps', type=int, default=0,
                   help="carlIO's field-space IO steps (keyprep's; default 0: with --io-steps "
                        "0, carl only, the network's own score)")
    p.add_argument('--symmetric', choices=('on', 'off'), default='on')
    p.add_argument('--passes', type=int, default=1,
                   help='network passes of carl and carlIO (keyprep\'s cascade; default 1)')
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--recipe', default=None, help='recipe name recorded in the weights')
    return p


def summarise(tsv: Path) -> tuple[list[str], bool | None]:
    """Markdown rows (case, start, carl[, carlIO], carl - start) and whether carl beat its
    start on every case (None when a case lacks a row)."""
    rows = list(csv.DictReader(open(tsv), delimiter='\t'))
    by_case: dict[str, dict[str, float]] = {}
    for r in rows:
        if r['status'] != 'ok':
            continue
        by_case.setdefault(r['case'], {})[r['method']] = 100 * float(r['dice_structures'])
    methods = [m for m in ('keymorphAffine', 'carl', 'carlIO')
               if any(m in v for v in by_case.values())]
    lines = ['| case | ' + ' | '.join(methods) + ' | carl - start |',
             '|---' * (len(methods) + 2) + '|']
    verdict: bool | None = True
    sums: dict[str, list[float]] = {}
    for case, v in sorted(by_case.items()):
        cells = [f'{v[m]:.1f}' if m in v else 'n/a' for m in methods]
        if 'carl' in v and 'keymorphAffine' in v:
            diff = v['carl'] - v['keymorphAffine']
            cells.append(f'{diff:+.1f}')
            verdict = verdict and diff > 0 if verdict is not None else None
        else:
            cells.append('n/a')
            verdict = None
        for m in methods:
            if m in v:
                sums.setdefault(m, []).append(v[m])
        lines.append(f'| {case} | ' + ' | '.join(cells) + ' |')
    means = [f'{sum(sums[m]) / len(sums[m]):.1f}' if sums.get(m) else 'n/a' for m in methods]
    lines.append('| mean | ' + ' | '.join(means) + ' | |')
    return lines, verdict


def main(argv=None) -> int:
    parser = build_parser()
    opts = parser.parse_args(argv)
    if not opts.checkpoint.is_file():
        parser.error(f'no checkpoint at {opts.checkpoint}')  # exit 2, no traceback
    sys.path.insert(0, str(HERE.parent))
    from keyprep.pipeline.carl.train import export_weights

    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    exported = export_weights(opts.checkpoint, out / 'carl.pt', recipe=opts.recipe)
    params = {'carl': {'weights': exported['path'], 'io_steps': opts.io_steps,
                       'field_steps': opts.field_steps,
                       'symmetric': opts.symmetric == 'on', 'passes': opts.passes}}
    cmd = [sys.executable, str(HERE / 'run_intersubject_benchmark.py'),
           '--pairs', *opts.pairs, '--contrasts', *opts.contrasts, '--rotations', '0',
           '--methods', 'keymorphAffine', 'carl', '--engine-params', json.dumps(params),
           '--threads', str(opts.threads), '--resolution', f'{opts.resolution:g}',
           '--out', str(out), '--skip-keypoints']
    if opts.work_dir is not None:
        cmd += ['--work-dir', str(opts.work_dir)]
    print(' '.join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    lines, verdict = summarise(out / 'intersubject_benchmark.tsv')
    verdict_text = {True: 'yes', False: 'no', None: 'not measured'}[verdict]
    text = '\n'.join([
        f'# CARL checkpoint through the engine: {opts.checkpoint} (step {exported["step"]})',
        '',
        f'Weights: `{exported["path"]}` (sha256 `{exported["sha256"]}`); symmetrised export '
        f'{opts.symmetric}; carlIO steps {opts.io_steps} (weights) + {opts.field_steps} '
        f'(field); passes {opts.passes}. Dice of the '
        f'exact labels over 32 structures (%), {opts.resolution:g} mm, CARL after '
        'keymorphAffine (its start). Full rows: `intersubject_benchmark.tsv`.',
        '', *lines, '',
        f'carl above its start on every case: **{verdict_text}**', ''])
    (out / 'check.md').write_text(text)
    print(text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
