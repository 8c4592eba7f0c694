#!/usr/bin/env python
"""Registration benchmark on real known-truth pairs: every engine, every pair, exact Dice.

Fixed image: the Colin27 brain (``ch2bet``) at ``--resolution`` mm, with its AAL labels
and a 3-class tissue segmentation computed once on it (ANTs Atropos, through
:func:`keyprep.pipeline.anatomy.tissue_segmentation`). Moving images: the same brain moved
by a known transform (:mod:`keyprep.pipeline.perturb`) and resampled onto a grid of its
own; its labels are carried by the same transform, so the Dice after registration is
measured against exact ground truth. Pairs:

* ``rot000`` ... ``rot180``: rotations of 0, 30, ..., 180 degrees about a random axis
  (one per pair, seeded), plus a translation up to 10 mm and a scale in [0.95, 1.05];
* ``field``: nitransforms' real nonlinear displacement field (OASIS template to a ds005
  subject) composed with a 10 degree similarity;
* ``int020``, ``int060``: 20 and 60 degree rotations plus a smooth bias field and a gamma
  change of contrast.

For every engine and pair, :func:`keyprep.pipeline.registration.run_engine` registers the
moving image to the fixed one (recording wall time and peak memory); the moving labels are
warped onto the fixed grid with the exported forward transform; Dice (mean over AAL
labels, mean over tissue classes) and Jacobian statistics inside the fixed brain mask are
written to ``registration_benchmark.tsv`` with a Markdown summary. Two reference rows per
pair: ``none`` (identity transform: the Dice before registration) and ``truth`` (the exact
known transform: the best Dice that resampling the labels allows at this resolution).
Rows already in the TSV are skipped, so an interrupted run resumes.

Engines that use structure labels (KeyMorph: the head's pose) get the label network's labels
of both images, as in a participant run (:func:`keyprep.pipeline.benchmark.structure_labels`,
cached next to each image as ``*_synthseg.nii.gz`` with the labelling time in its ``.json``).
In keyprep the labelling is a preprocessing step every image goes through whatever the
engine, so its time is not registration time and is not in ``runtime_s``.

Run ``python benchmarks/run_registration_benchmark.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nb
import numpy as np

from keyprep.pipeline import benchmark
from keyprep.pipeline import perturb as pt
from keyprep.pipeline.benchmark import (
    add_time_ratios,
    engine_rows,
    fmt,
    guarded,
    jacobian_scores,
    load_array,
    machine_info,
    read_table,
    typed_frame,
    variant_names,
    warp_labels,
    write_table,
)
from keyprep.pipeline.io import make_image
from keyprep.pipeline.targets import mricron_file

REPO = Path(__file__).resolve().parents[1]

#: Columns of the results table, in order.
COLUMNS = [
    'pair', 'rotation_deg', 'deformation', 'intensity', 'method', 'dice_aal', 'dice_tissue',
    'jac_min', 'jac_max', 'jac_neg_frac', 'logjac_std', 'runtime_s', 'peak_mem_mb',
    'time_ratio_to_antsAffine', 'time_ratio_to_antsSyN', 'resolution_mm', 'sloppy',
    'moving_voxel_size', 'status',
]
#: Reference rows computed for every pair (no registration).
REFERENCE_METHODS = ('none', 'truth')


@dataclass(frozen=True)
class PairSpec:
    """How one pair is made; ``index`` seeds its random draws (stable across subsets)."""

    name: str
    index: int
    rotation_deg: float
    deformation: str = 'none'
    intensity: str = 'none'


#: All pairs, in table order.
PAIRS: tuple[PairSpec, ...] = (
    *(PairSpec(f'rot{a:03d}', i, float(a)) for i, a in enumerate(range(0, 181, 30))),
    PairSpec('field', 7, 10.0, deformation='nitransforms-fsl'),
    PairSpec('int020', 8, 20.0, intensity='bias+gamma'),
    PairSpec('int060', 9, 60.0, intensity='bias+gamma'),
)
#: Pairs run with ``--quick``.
QUICK_PAIRS = ('rot000', 'rot090', 'rot180', 'field')


@dataclass
class Fixed:
    """The fixed image and its exact labels, on the benchmark grid."""

    t1: Path
    aal: Path
    tissue: Path
    mask: Path


@dataclass
class Pair:
    """A built pair: the moving image, its labels, and the exact forward transform."""

    spec: PairSpec
    moving: Path
    moving_aal: Path
    moving_tissue: Path
    truth_fwd: Path
    truth_kind: str
    voxel_size: tuple[float, float, float]
    parameters: dict


# --------------------------------------------------------------------------------------
# Building the fixed image and the pairs
# --------------------------------------------------------------------------------------


def _colin(name: str) -> nb.Nifti1Image:
    return nb.load(str(mricron_file(name)))


def build_fixed(work: Path, resolution: float) -> Fixed:
    """The Colin27 brain, AAL, brain mask and tissue classes at ``resolution`` (cached)."""
    from scipy import ndimage as ndi

    from keyprep.pipeline.anatomy import tissue_segmentation

    out = work / 'fixed'
    fixed = Fixed(out / 'colin27_brain.nii.gz', out / 'colin27_aal.nii.gz',
                  out / 'colin27_tissue.nii.gz', out / 'colin27_mask.nii.gz')
    if all(p.exists() for p in asdict(fixed).values()):
        return fixed
    out.mkdir(parents=True, exist_ok=True)
    brain, aal = _colin('ch2bet.nii.gz'), _colin('aal.nii.gz')
    grid = pt.fitting_grid(pt.foreground_points(brain, 0), resolution, margin_mm=12.0)
    t1 = pt.resample(np.asanyarray(brain.dataobj), brain.affine, grid, antialias=True)
    labels = pt.resample(np.asanyarray(aal.dataobj), aal.affine, grid, order=0)
    mask = pt.resample((np.asanyarray(brain.dataobj) > 0).astype(np.uint8), brain.affine, grid,
                       order=0)
    mask = ndi.binary_fill_holes(mask > 0)
    tissue = tissue_segmentation(t1, grid.affine, mask, 'T1w')
    make_image(t1.astype(np.float32), grid.affine).to_filename(fixed.t1)
    make_image(labels.astype(np.uint8), grid.affine).to_filename(fixed.aal)
    make_image(mask.astype(np.uint8), grid.affine).to_filename(fixed.mask)
    make_image(tissue.astype(np.uint8), grid.affine).to_filename(fixed.tissue)
    return fixed


def build_pair(spec: PairSpec, fixed: Fixed, work: Path, resolution: float,
               seed: int = 0) -> Pair:
    """Move the Colin27 brain by the pair's known transform onto its own grid (cached).

    The moving AAL is carried from the 1 mm atlas, the moving tissue classes from the
    fixed grid's segmentation; both by nearest neighbour through the same transform.
    """
    out = work / 'pairs' / spec.name
    files = {k: out / f'{k}.nii.gz' for k in ('moving', 'moving_aal', 'moving_tissue')}
    meta_path = out / 'pair.json'
    if meta_path.exists() and all(p.exists() for p in files.values()):
        meta = json.loads(meta_path.read_text())
        if meta.get('spec') == asdict(spec) and meta.get('seed') == seed:
            return Pair(spec, files['moving'], files['moving_aal'], files['moving_tissue'],
                        Path(meta['truth_fwd']), meta['truth_kind'],
                        tuple(meta['voxel_size']), meta['parameters'])
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([int(seed), spec.index])
    brain, aal = _colin('ch2bet.nii.gz'), _colin('aal.nii.gz')
    tissue_img = nb.load(str(fixed.tissue))
    center = pt.center_of_mass(brain)
    axis = pt.random_axis(rng)
    motion = pt.random_similarity(rng, 180.0, 10.0, (0.95, 1.05), center=center, axis=axis,
                                  angle_deg=spec.rotation_deg)
    field = None
    if spec.deformation == 'nitransforms-fsl':
        field = pt.load_fsl_displacement_field().recentred(center)
    xfm = pt.KnownTransform(motion, field)
    zooms = tuple(float(z) for z in np.round(resolution * rng.uniform(1.0, 1.25, size=3), 3))
    obliquity = float(rng.uniform(0.0, 15.0))
    orientation = str(rng.choice(['RAS', 'LAS', 'LPS', 'RPI']))
    grid = pt.fitting_grid(xfm.push(pt.foreground_points(brain, 0, step=2)), zooms,
                           rotation=pt.rotation_about_axis(pt.random_axis(rng), obliquity),
                           orientation=orientation, margin_mm=10.0)
    moved, (m_aal,) = pt.apply_known_transform(brain, xfm, grid, labels=[aal])
    m_tissue = pt.resample(np.asanyarray(tissue_img.dataobj), tissue_img.affine, grid, xfm,
                           order=0)
    data = moved.get_fdata(dtype=np.float32)
    intensity = {}
    if spec.intensity == 'bias+gamma':
        strength = float(rng.uniform(0.25, 0.35))
        gamma = float(rng.choice([0.7, 1.4]))
        data = pt.apply_gamma(data * pt.bias_field(rng, grid.shape, grid.zooms,
                                                   strength=strength), gamma)
        intensity = {'bias_strength': round(strength, 4), 'gamma': gamma}
    make_image(data.astype(np.float32), grid.affine).to_filename(files['moving'])
    make_image(np.asanyarray(m_aal.dataobj).astype(np.uint8), grid.affine).to_filename(
        files['moving_aal'])
    make_image(m_tissue.astype(np.uint8), grid.affine).to_filename(files['moving_tissue'])
    # the registration's forward transform maps fixed points to moving points: push
    if xfm.is_linear:
        truth = xfm.write_itk(out / 'truth_fwd.txt', inverse=True)
    else:
        fixed_grid = pt.Grid.of(nb.load(str(fixed.t1)))
        truth = xfm.write_itk(out / 'truth_fwd.nii.gz', grid=fixed_grid, inverse=True)
    params = {'motion': pt.describe_similarity(motion, center), 'voxel_size': list(zooms),
              'orientation': orientation, 'obliquity_deg': round(obliquity, 3),
              'shape': list(grid.shape), **intensity}
    meta = {'spec': asdict(spec), 'seed': seed, 'truth_fwd': str(truth),
            'truth_kind': 'linear' if xfm.is_linear else 'deformable', 'voxel_size': zooms,
            'parameters': params}
    meta_path.write_text(json.dumps(meta, indent=2))
    return Pair(spec, files['moving'], files['moving_aal'], files['moving_tissue'], truth,
                meta['truth_kind'], zooms, params)


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------


def score_transform(pair: Pair, fixed: Fixed, fwd: Path, kind: str, out_dir: Path) -> dict:
    """Dice (AAL, tissue) and Jacobian statistics of a forward transform."""
    from keyprep.pipeline.qc import dice_per_label

    scores = {}
    for key, moving, reference in (('dice_aal', pair.moving_aal, fixed.aal),
                                   ('dice_tissue', pair.moving_tissue, fixed.tissue)):
        warped = warp_labels(moving, fixed.t1, fwd, out_dir / f'{key}_warped.nii.gz')
        ref = load_array(reference).astype(np.int64)
        dice = dice_per_label(ref, warped)
        scores[key] = float(np.nanmean(list(dice.values()))) if dice else math.nan
    scores.update(jacobian_scores(fwd, fixed.t1, kind, load_array(fixed.mask) > 0))
    return scores


def _base_row(pair: Pair, method: str, resolution: float, sloppy: bool) -> dict:
    return {
        'pair': pair.spec.name, 'rotation_deg': pair.spec.rotation_deg,
        'deformation': pair.spec.deformation, 'intensity': pair.spec.intensity,
        'method': method, 'resolution_mm': resolution, 'sloppy': sloppy,
        'moving_voxel_size': 'x'.join(f'{z:g}' for z in pair.voxel_size),
    }


def evaluate_rows(method: str, pair: Pair, fixed: Fixed, work: Path, *, resolution: float,
                  threads: int = 2, sloppy: bool = False, seed: int = 0,
                  params: dict | None = None) -> list[dict]:
    """The results rows of one engine on one pair (one per variant), or of a reference
    (``none``, ``truth``); ``params``: the engine's parameters (``--engine-params``). Engine
    errors give rows with ``status`` ``error: ...``."""
    from keyprep.pipeline.transforms import write_itk_affine

    row = _base_row(pair, method, resolution, sloppy)
    row.update({k: math.nan for k in COLUMNS if k not in row})
    run_dir = work / 'runs' / pair.spec.name / method

    def score(fwd: Path, kind: str, out_dir: Path) -> dict:
        return score_transform(pair, fixed, fwd, kind, out_dir)

    if method == 'none':
        return [guarded(row, run_dir, lambda: score(
            write_itk_affine(np.eye(4), run_dir / 'identity.txt'), 'linear', run_dir))]
    if method == 'truth':
        return [guarded(row, run_dir, lambda: score(Path(pair.truth_fwd), pair.truth_kind,
                                                    run_dir))]
    labels = None
    if benchmark.uses_labels(method):  # as in a participant run: the label network's labels
        try:
            labels = {'fixed': benchmark.structure_labels(
                fixed.t1, work / 'fixed' / 'colin27_synthseg.nii.gz', fixed.mask),
                'moving': benchmark.structure_labels(
                    pair.moving, pair.moving.parent / 'moving_synthseg.nii.gz')}
        except Exception as exc:  # the engine then runs without them (and says so)
            print(f'labelling failed ({type(exc).__name__}: {exc}); {method} runs without '
                  'label maps', file=sys.stderr)
    return engine_rows(method, row, run_dir, fixed.t1, pair.moving, score, threads=threads,
                       sloppy=sloppy, seed=seed, labels=labels, params=params)


def evaluate(method: str, pair: Pair, fixed: Fixed, work: Path, *, resolution: float,
             threads: int = 2, sloppy: bool = False, seed: int = 0) -> dict:
    """One results row: register with ``method`` (or a reference: ``none``, ``truth``)
    and score the result (see :func:`evaluate_rows`; for an engine with one variant)."""
    rows = evaluate_rows(method, pair, fixed, work, resolution=resolution, threads=threads,
                         sloppy=sloppy, seed=seed)
    if len(rows) != 1:
        raise ValueError(f'{method} gives {len(rows)} variants: use evaluate_rows')
    return rows[0]


# --------------------------------------------------------------------------------------
# Results table and summary
# --------------------------------------------------------------------------------------

NUMERIC = ['rotation_deg', 'dice_aal', 'dice_tissue', 'jac_min', 'jac_max', 'jac_neg_frac',
           'logjac_std', 'runtime_s', 'peak_mem_mb', 'time_ratio_to_antsAffine',
           'time_ratio_to_antsSyN', 'resolution_mm']


def _key(row: dict) -> tuple:
    return (str(row['pair']), str(row['method']), float(row['resolution_mm']),
            str(row['sloppy']).lower() == 'true')


#: Decimals of the numbers written to the TSV tables.
ROUNDING = {**benchmark.ROUNDING, 'dice_aal': 4, 'dice_tissue': 4}


def read_results(path: Path) -> list[dict]:
    """The rows of the results table (none when it does not exist yet)."""
    return read_table(path, COLUMNS)


def results_frame(rows: list[dict]):
    """Rows as a typed DataFrame, with ``time_ratio_to_antsAffine`` and
    ``time_ratio_to_antsSyN`` filled in: the engine's time over the reference engine's
    time on the same pair, resolution and schedule."""
    df = typed_frame(rows, COLUMNS, NUMERIC)
    return add_time_ratios(df, ['pair', 'resolution_mm', 'sloppy'])


def write_results(rows: list[dict], path: Path) -> None:
    """Write the TSV atomically (numbers rounded for reading)."""
    write_table(results_frame(rows), path, ROUNDING)


def write_summary(rows: list[dict], path: Path, *, info: dict, resolution: float,
                  sloppy: bool, pairs: dict[str, Pair], command: str | None = None) -> None:
    """The Markdown summary of the rows at this resolution and schedule."""
    df = results_frame(rows)
    sel = df[(df['resolution_mm'] == float(resolution)) & (df['sloppy'] == bool(sloppy))]
    methods = [m for m in dict.fromkeys(sel['method']) if m not in REFERENCE_METHODS]
    order = [p.name for p in PAIRS if p.name in set(sel['pair'])]
    lines = [
        '# Registration benchmark on known-truth pairs',
        '',
        f'Generated by `benchmarks/run_registration_benchmark.py` on '
        f'{time.strftime("%Y-%m-%d %H:%M %Z")}.',
        '',
        *([f'* Command (the rows of this table may come from several runs of it, resumed): '
           f'`{command}`'] if command else []),
        f'* Resolution: {resolution:g} mm (fixed grid; moving grids up to 25 % coarser, '
        'anisotropic and oblique)',
        f'* Schedules: {"sloppy (short, for smoke runs only)" if sloppy else "full"}',
        f'* Machine: {info["cpu"]}, {info["cores"]} cores, {info["memory"]} RAM, '
        f'{info["threads"]} thread(s) per engine; {info["platform"]}',
        '* Versions: ' + ', '.join(f'{k} {v}' for k, v in info['versions'].items()),
        '',
        'Fixed: Colin27 brain (ch2bet) with its AAL labels (116) and a 3-class tissue '
        'segmentation computed once on it. Moving: the same brain moved by a known '
        'transform onto its own grid, its labels carried by the same transform, so the '
        'Dice below is exact ground truth. `none` is the identity transform (Dice before '
        'registration); `truth` is the exact known transform, the best Dice that '
        'resampling the labels allows at this resolution.',
        '',
        '## Dice by pair (mean over AAL labels / mean over GM, WM, CSF)',
        '',
        '| pair | rotation | deformation | intensity | none | truth | '
        + ' | '.join(methods) + ' |',
        '|' + '---|' * (6 + len(methods)),
    ]

    def cell(pair: str, method: str, what: str) -> str:
        r = sel[(sel['pair'] == pair) & (sel['method'] == method)]
        if r.empty:
            return ''
        r = r.iloc[-1]
        if str(r['status']) != 'ok':
            return 'error'
        if what == 'dice':
            return f'{fmt(r["dice_aal"])} / {fmt(r["dice_tissue"])}'
        if what == 'time':
            ratio = fmt(r['time_ratio_to_antsSyN'], 2)
            return f'{fmt(r["runtime_s"], 1)} s' + ('' if ratio == 'n/a' else f' ({ratio}x)')
        return (f'{fmt(r["jac_min"], 2)} / {fmt(r["jac_max"], 2)} / '
                f'{fmt(100 * float(r["jac_neg_frac"]), 2)} % / {fmt(r["logjac_std"], 3)}')

    for name in order:
        first = sel[sel['pair'] == name].iloc[0]
        lines.append(f'| {name} | {float(first["rotation_deg"]):g} | {first["deformation"]} | '
                     f'{first["intensity"]} | {cell(name, "none", "dice")} | '
                     f'{cell(name, "truth", "dice")} | '
                     + ' | '.join(cell(name, m, 'dice') for m in methods) + ' |')
    lines += ['', '## Registration time (wall clock; ratio to antsSyN on the same pair)', '',
              '| pair | ' + ' | '.join(methods) + ' |', '|' + '---|' * (1 + len(methods))]
    for name in order:
        lines.append(f'| {name} | ' + ' | '.join(cell(name, m, 'time') for m in methods) + ' |')
    lines += ['', '## Jacobian of the forward transform inside the brain '
              '(min / max / % non-positive / std log J)', '',
              '| pair | truth | ' + ' | '.join(methods) + ' |',
              '|' + '---|' * (2 + len(methods))]
    for name in order:
        lines.append(f'| {name} | {cell(name, "truth", "jac")} | '
                     + ' | '.join(cell(name, m, 'jac') for m in methods) + ' |')
    lines += ['', '## Mean over pairs', '',
              '| method | mean Dice AAL | mean Dice tissue | pairs with Dice AAL >= 0.9 x truth '
              '| mean time (s) | peak memory (MB) |', '|---|---|---|---|---|---|']
    truth = sel[sel['method'] == 'truth'].set_index('pair')['dice_aal']
    for m in ['none', 'truth', *methods]:
        r = sel[(sel['method'] == m) & (sel['status'] == 'ok')]
        if r.empty:
            continue
        near = sum(float(d) >= 0.9 * float(truth.get(p, math.inf))
                   for p, d in zip(r['pair'], r['dice_aal']))
        lines.append(f'| {m} | {fmt(r["dice_aal"].astype(float).mean())} | '
                     f'{fmt(r["dice_tissue"].astype(float).mean())} | {near} of {len(r)} | '
                     f'{fmt(r["runtime_s"].astype(float).mean(), 1)} | '
                     f'{fmt(r["peak_mem_mb"].astype(float).max(), 0)} |')
    errors = sel[sel['status'] != 'ok']
    if not errors.empty:
        lines += ['', '## Errors', '']
        lines += [f'* {r.pair} / {r.method}: {r.status}' for r in errors.itertuples()]
    lines += ['', '## Pairs', '',
              '| pair | moving voxel size (mm) | voxel order | obliquity (deg) | rotation axis '
              '| scale | translation (mm) |', '|---|---|---|---|---|---|---|']
    for name in order:
        if name not in pairs:
            continue
        p = pairs[name].parameters
        mo = p['motion']
        lines.append(f'| {name} | {"x".join(f"{z:g}" for z in p["voxel_size"])} | '
                     f'{p["orientation"]} | {p["obliquity_deg"]:.1f} | '
                     f'({", ".join(f"{a:.2f}" for a in mo["axis"])}) | {mo["scale"]:.3f} | '
                     f'({", ".join(f"{t:.1f}" for t in mo["translation_mm"])}) |')
    path.write_text('\n'.join(lines) + '\n')


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------

def shlex_quote(args) -> list[str]:
    import shlex

    return [shlex.quote(str(a)) for a in args]


def build_parser() -> argparse.ArgumentParser:
    from keyprep.pipeline.engines import available_engines

    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--resolution', type=float, default=2.0, metavar='MM',
                        help='fixed grid resolution in mm (default: 2.0)')
    parser.add_argument('--methods', nargs='+', default=None, metavar='METHOD',
                        help='engines to run (default: all registered: '
                             f'{", ".join(available_engines())})')
    parser.add_argument('--pairs', nargs='+', default=None, metavar='PAIR',
                        help=f'pairs to run (default: all: {", ".join(p.name for p in PAIRS)})')
    parser.add_argument('--out', type=Path, default=REPO / 'benchmarks' / 'results',
                        help='folder of the TSV and Markdown results (default: '
                             'benchmarks/results)')
    parser.add_argument('--work-dir', type=Path, default=REPO / 'benchmarks' / 'work',
                        help='folder for the pair images and engine outputs (default: '
                             'benchmarks/work)')
    parser.add_argument('--threads', type=int, default=2, help='threads per engine (default: 2)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the pairs (default: 0)')
    parser.add_argument('--engine-params', default=None, metavar='JSON',
                        help='engine parameters, e.g. \'{"carl": {"io_steps": 5}}\' (the '
                             'results folder should then be a new one: rows are matched by '
                             'pair, method and resolution only)')
    parser.add_argument('--quick', action='store_true',
                        help=f'pairs {", ".join(QUICK_PAIRS)} only, with sloppy schedules')
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0 (engine failures are results, not errors)."""
    args = build_parser().parse_args(argv)
    from keyprep.pipeline.antsutils import import_ants

    import_ants(args.threads)  # ITK reads its thread count once, at import
    from keyprep.pipeline.engines import available_engines, get_engine

    methods = args.methods or list(available_engines())
    methods = [get_engine(m).name for m in methods]
    names = args.pairs or (list(QUICK_PAIRS) if args.quick else [p.name for p in PAIRS])
    unknown = sorted(set(names) - {p.name for p in PAIRS})
    if unknown:
        raise SystemExit(f'unknown pair(s): {", ".join(unknown)}')
    specs = [p for p in PAIRS if p.name in names]
    sloppy = bool(args.quick)
    given = json.loads(args.engine_params) if args.engine_params else {}
    if not isinstance(given, dict) or not all(isinstance(v, dict) for v in given.values()):
        raise SystemExit('run_registration_benchmark: --engine-params must be a JSON object '
                         'of objects ({"engine": {"param": value}})')
    unknown = sorted(set(given) - set(methods))
    if unknown:
        raise SystemExit(f'run_registration_benchmark: --engine-params names engines not in '
                         f'--methods: {", ".join(unknown)}')
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = args.work_dir / f'res-{args.resolution:g}_seed-{args.seed}'
    tsv = out / 'registration_benchmark.tsv'
    md = out / 'registration_benchmark.md'
    rows = read_results(tsv)
    done = {_key(r) for r in rows}

    t0 = time.time()
    print(f'benchmark: fixed image at {args.resolution:g} mm ...', flush=True)
    fixed = build_fixed(work, args.resolution)
    info = machine_info(args.threads)
    built: dict[str, Pair] = {}
    for spec in specs:
        pair = build_pair(spec, fixed, work, args.resolution, args.seed)
        built[spec.name] = pair
        for method in [*REFERENCE_METHODS, *methods]:
            names = ([method] if method in REFERENCE_METHODS
                     else variant_names(method, sloppy, given.get(method)))
            if all((spec.name, n, float(args.resolution), sloppy) in done for n in names):
                continue
            new = evaluate_rows(method, pair, fixed, work, resolution=args.resolution,
                                threads=args.threads, sloppy=sloppy, seed=args.seed,
                                params=given.get(method))
            rows.extend(new)
            done.update(_key(row) for row in new)
            write_results(rows, tsv)
            for row in new:
                print(f'benchmark: {spec.name:7s} {row["method"]:12s} Dice AAL '
                      f'{fmt(row["dice_aal"])} tissue {fmt(row["dice_tissue"])} time '
                      f'{fmt(row["runtime_s"], 1)} s [{row["status"]}] '
                      f'({time.time() - t0:.0f} s elapsed)', flush=True)
        write_summary(rows, md, info=info, resolution=args.resolution, sloppy=sloppy,
                      command=' '.join(['python', 'benchmarks/run_registration_benchmark.py',
                                        *shlex_quote(argv if argv is not None else sys.argv[1:])]),
                      pairs=built)
    write_results(rows, tsv)
    print(f'benchmark: done in {time.time() - t0:.0f} s: {tsv} and {md}', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
