"""The harness of keyprep's registration benchmarks (``benchmarks/``): run an engine the way
the pipeline does and score its exported transform, with the results tables they share.

:func:`engine_rows` registers one pair with one engine (every variant from one run, an engine
that starts from another method's affine after that method, wall time and peak memory per
variant) and scores each result with the caller's function; an engine that fails gives error
rows (the traceback in ``error.txt``) instead of stopping the benchmark. :func:`warp_labels`
and :func:`jacobian_scores` are the scores the benchmarks share; :func:`structure_labels`
gives an engine that uses them (KeyMorph's pose) the label network's labels of each image,
as a participant run does (cached per image; labelling is not registration time, so it is
not in ``runtime_s``); :func:`read_table`,
:func:`typed_frame`, :func:`add_time_ratios` and :func:`write_table` their TSV tables,
:func:`machine_info` and :func:`fmt` their Markdown summaries.

>>> fmt(0.12345), fmt(float('nan')), fmt('ok')
('0.123', 'n/a', 'ok')
"""

from __future__ import annotations

import math
import os
import platform
import traceback
from pathlib import Path

import nibabel as nb
import numpy as np

__all__ = ['ROUNDING', 'TIME_REFERENCES', 'VARIANT_TIME_KEYS', 'add_time_ratios', 'engine_rows', 'fmt',
           'guarded', 'jacobian_scores', 'load_array', 'machine_info', 'mean_structure_dice',
           'read_table',
           'record_error', 'register', 'structure_labels', 'typed_frame', 'uses_labels',
           'variant_names', 'warp_labels', 'write_table']


#: Engines whose time on the same pair is the unit of the ``time_ratio_to_<engine>`` columns.
TIME_REFERENCES = ('antsAffine', 'antsSyN')
#: Decimals of the measures every benchmark table has.
ROUNDING = {'jac_min': 4, 'jac_max': 4, 'jac_neg_frac': 6, 'logjac_std': 4, 'runtime_s': 2,
            'peak_mem_mb': 1, 'time_ratio_to_antsAffine': 3, 'time_ratio_to_antsSyN': 3}


def load_array(path: Path) -> np.ndarray:
    """The data of a NIfTI file, as stored."""
    return np.asanyarray(nb.load(str(path)).dataobj)


def warp_labels(moving_labels: Path, reference: Path, fwd: Path, out_file: Path) -> np.ndarray:
    """The moving label map on the reference (fixed) grid through the forward transform
    (``genericLabel`` interpolation), as an int64 array."""
    from .transforms import apply_transforms

    out_file.parent.mkdir(parents=True, exist_ok=True)
    warped = apply_transforms(moving_labels, reference, [fwd], out_file,
                              interpolation='genericLabel')
    return load_array(warped).astype(np.int64)


def jacobian_scores(fwd: Path, reference: Path, kind: str, mask: np.ndarray) -> dict:
    """Jacobian-determinant statistics of a forward transform inside ``mask`` (a boolean
    array on the reference grid): ``jac_min``, ``jac_max``, ``jac_neg_frac``, ``logjac_std``."""
    from .qc import jacobian_stats
    from .transforms import jacobian_map

    jac = np.asarray(jacobian_map(fwd, reference, kind).dataobj)
    stats = jacobian_stats(jac, mask)
    return {k: stats[k] for k in ('jac_min', 'jac_max', 'jac_neg_frac', 'logjac_std')}


def uses_labels(method: str) -> bool:
    """Whether engine ``method`` uses the images' structure label maps (then the benchmark
    gives it :func:`structure_labels` of both images, as the pipeline gives it the label
    network's outputs)."""
    from .engines import get_engine

    return bool(get_engine(method).uses_labels)


def structure_labels(image: Path, out_file: Path, mask: Path | None = None,
                     device: str = 'cpu') -> Path:
    """The label network's structure labels of ``image`` (FreeSurfer numbering, on the image's
    grid), as a participant run makes them (:class:`keyprep.pipeline.synth.labeller.
    LabelNetwork`, header pose first and its own pose search when its self-check fails, with
    ``mask`` (default: the image's non-zero voxels, for the benchmarks' brain-only images) as
    the reference brain mask: give the image's real brain mask where the image has
    non-brain voxels, or the self-check fails on every image and the pose search runs for
    nothing). Cached: ``out_file`` is reused when it exists and its sidecar
    ``<out_file>.json`` (labelling time, self-check, pose used) names the same reference mask
    and the same labeller (weights, self-check thresholds, pose attempts and their order: a
    label map made before a change of any is made again)."""
    import json

    from .io import make_image
    from .synth import selfcheck
    from .synth.labeller import MAX_POSE_ATTEMPTS, REGION_MASK_CM3, LabelNetwork

    out_file = Path(out_file)
    sidecar = Path(str(out_file) + '.json')
    reference = 'nonzero voxels' if mask is None else str(mask)
    network = LabelNetwork.cached(None, device)
    labeller = {'weights_sha256': network.sha256,
                'min_intensity_fit': selfcheck.MIN_INTENSITY_FIT,
                'region_mask_cm3': list(REGION_MASK_CM3),
                'pose_attempts': MAX_POSE_ATTEMPTS, 'pose_order': 'interleaved'}
    if out_file.is_file() and sidecar.is_file():
        try:
            meta = json.loads(sidecar.read_text())
            if meta.get('reference_mask') == reference and meta.get('labeller') == labeller:
                return out_file
        except ValueError:
            pass
    img = nb.load(str(image))
    if mask is not None:
        ref = nb.load(str(mask))
    else:
        data = np.asanyarray(img.dataobj)
        while data.ndim > 3:
            data = data[..., 0]
        ref = make_image((data > 0).astype(np.uint8), img.affine)
    result = network.predict(img, reference_mask=ref)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    labels = np.asanyarray(result.labels.dataobj).astype(np.int16)
    make_image(labels, img.affine).to_filename(out_file)
    meta = {'image': str(image), 'reference_mask': reference, 'labeller': labeller,
            'timings_s': {k: round(float(v), 3)
                                                for k, v in result.timings.items()},
            'check': result.check, 'pose': result.pose}
    sidecar.write_text(json.dumps(meta, indent=2, default=str))
    return out_file


def variant_names(method: str, sloppy: bool = False, params: dict | None = None) -> list[str]:
    """The result names one run of engine ``method`` gives (its variants, e.g. one per TPS
    λ; just the engine's name for most engines). Cheap: no registration, no torch."""
    from .engines import EngineOptions, engine_variants, get_engine

    engine = get_engine(method)
    options = EngineOptions(sloppy=sloppy, params=dict(params or {}))
    return [n for n, _ in engine_variants(engine, options)]


#: Keys of a variant's ``extras`` that time work done for that variant alone (for example a
#: test-time refinement that starts from another variant's result).
VARIANT_TIME_KEYS = ('refine_time_s', 'variant_time_s')


def register(method: str, fixed: Path, moving: Path, run_dir: Path, *, threads: int,
             sloppy: bool, seed: int, contrasts: dict | None = None,
             params: dict | None = None, labels: dict | None = None) -> list[dict]:
    """Register ``moving`` to ``fixed`` with a registered engine through
    :func:`keyprep.pipeline.registration.run_engine_variants` (one run, every variant).

    Returns one dict per variant: ``method`` (the variant's name), ``fwd`` (its forward
    transform), ``kind``, ``run_time_s`` (the wall time of the whole run), ``runtime_s`` (the
    variant's time: the run's, less the time the engine reports in :data:`VARIANT_TIME_KEYS`
    for the *other* variants, so an unrefined result is not charged for the refinement of its
    sibling; equal to the run's time for engines without such variants), ``peak_mem_mb``
    (the process's peak resident memory during the run) and ``baseline_mem_mb`` (its
    resident memory just before). ``labels`` (``{'fixed': path, 'moving': path}``, see
    :func:`structure_labels`) go to the engines that use them, the starting method's too.
    """
    from .engines import EngineOptions, get_engine, variant_owner
    from .registration import run_engine_variants
    from .resources import rss_mb

    baseline = round(rss_mb(), 1)
    # an engine that starts from another method's affine (CARL, DIO) runs after that method,
    # as in the pipeline; its time includes the starting method's
    init = get_engine(method).init_method(EngineOptions(sloppy=sloppy, params=dict(params or {})))
    init_xfm, init_s = None, 0.0
    if init:
        first = run_engine_variants(variant_owner(init, sloppy=sloppy), fixed, moving,
                                    Path(run_dir) / f'init_{init}', omp_nthreads=threads,
                                    seed=seed, sloppy=sloppy, contrasts=contrasts,
                                    labels=labels)
        chosen = next(r for r in first if r.method == init)
        init_xfm, init_s = chosen.fwd_xfm, float(chosen.runtime_s)
    runs = run_engine_variants(method, fixed, moving, run_dir, omp_nthreads=threads, seed=seed,
                               sloppy=sloppy, contrasts=contrasts, params=params,
                               init_transform=init_xfm, init_method=init, labels=labels)
    own = {r.method: sum(float((r.extras or {}).get(k) or 0.0) for k in VARIANT_TIME_KEYS)
           for r in runs}
    total = sum(own.values())
    return [{'method': r.method, 'fwd': Path(r.fwd_xfm), 'kind': r.transform_kind,
             'run_time_s': round(r.runtime_s + init_s, 3),
             'runtime_s': round(r.runtime_s - total + own[r.method] + init_s, 3),
             'peak_mem_mb': r.peak_mem_mb, 'baseline_mem_mb': baseline} for r in runs]


def record_error(row: dict, run_dir: Path, exc: BaseException) -> dict:
    """Mark ``row`` as an error (``status``: the exception's first line) and write the
    traceback to ``run_dir/error.txt``."""
    row['status'] = f'error: {type(exc).__name__}: {(str(exc).splitlines() or [""])[0][:200]}'
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / 'error.txt').write_text(
        ''.join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    return row


def guarded(row: dict, run_dir: Path, score) -> dict:
    """Fill ``row`` with the dict that ``score()`` returns and ``status`` ``ok``; if it
    raises, ``status`` is ``error: ...`` and the traceback goes to ``run_dir/error.txt``
    (an engine that fails is a result too)."""
    try:
        row.update(score())
        row['status'] = 'ok'
    except Exception as exc:
        record_error(row, run_dir, exc)
    return row


def engine_rows(method: str, row: dict, run_dir: Path, fixed: Path, moving: Path, score, *,
                threads: int, sloppy: bool, seed: int, contrasts: dict | None = None,
                params: dict | None = None, labels: dict | None = None) -> list[dict]:
    """Run engine ``method`` once and give one row per variant: a copy of ``row`` with the
    variant's name, the run's measures (those of :func:`register` that ``row`` has keys
    for) and ``score(fwd, kind, out_dir)``. If the engine fails, every variant gets an
    error row."""
    try:
        runs = register(method, fixed, moving, run_dir, threads=threads, sloppy=sloppy,
                        seed=seed, contrasts=contrasts, params=params, labels=labels)
    except Exception as exc:
        try:
            names = variant_names(method, sloppy, params)
        except Exception:
            names = [method]
        return [record_error(dict(row, method=n), run_dir, exc) for n in names]
    rows = []
    for run in runs:
        out = dict(row, method=run['method'])
        out.update({k: v for k, v in run.items() if k in row and k != 'method'})
        where = run['fwd'].parent
        rows.append(guarded(out, where, lambda run=run, where=where: score(
            run['fwd'], run['kind'], where)))
    return rows


def read_table(path: Path, columns: list[str]) -> list[dict]:
    """The rows of a results TSV with these columns (missing columns are NaN; no rows when
    the file does not exist yet)."""
    import pandas as pd

    if not path.exists():
        return []
    df = pd.read_csv(path, sep='\t', na_values=['n/a'], keep_default_na=False)
    for col in columns:
        if col not in df:
            df[col] = math.nan
    return df[columns].to_dict('records')


def typed_frame(rows: list[dict], columns: list[str], numeric: list[str]):
    """Rows as a DataFrame with numeric columns as floats and ``sloppy`` as a boolean."""
    import pandas as pd

    df = pd.DataFrame(rows, columns=columns)
    for col in numeric:
        df[col] = pd.to_numeric(df[col], errors='coerce')
    df['sloppy'] = df['sloppy'].astype(str).str.lower() == 'true'
    return df


def add_time_ratios(df, by: list[str], references: tuple[str, ...] = TIME_REFERENCES):
    """Fill ``time_ratio_to_<ref>``: each row's ``runtime_s`` over the time of engine
    ``ref`` on the same problem (the rows that agree on the ``by`` columns), NaN where
    ``ref`` has no successful row there."""
    for ref_method in references:
        ok = df[(df['method'] == ref_method) & (df['status'] == 'ok')]
        ref = {tuple(k): t for k, t in zip(ok[by].itertuples(index=False), ok['runtime_s'])}
        df[f'time_ratio_to_{ref_method}'] = [
            t / ref[tuple(k)] if ref.get(tuple(k)) else math.nan
            for k, t in zip(df[by].itertuples(index=False), df['runtime_s'])]
    return df


def write_table(df, path: Path, rounding: dict[str, int]) -> None:
    """Write a DataFrame as a TSV atomically (``n/a`` for missing values)."""
    tmp = path.with_name(path.name + '.tmp')
    df.round(rounding).to_csv(tmp, sep='\t', index=False, na_rep='n/a')
    os.replace(tmp, path)


def machine_info(threads: int) -> dict:
    """Cores, CPU model, memory, platform and software versions."""
    from .registration import software_versions

    cpu = platform.processor() or 'unknown'
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                cpu = line.split(':', 1)[1].strip()
                break
    except OSError:
        pass
    mem = 'unknown'
    try:
        for line in Path('/proc/meminfo').read_text().splitlines():
            if line.startswith('MemTotal'):
                mem = f'{int(line.split()[1]) / 2**20:.1f} GiB'
                break
    except OSError:
        pass
    return {'cpu': cpu, 'cores': os.cpu_count(), 'threads': threads, 'memory': mem,
            'platform': platform.platform(), 'versions': software_versions()}


def fmt(value, nd: int = 3) -> str:
    """A number with ``nd`` decimals for a Markdown table (``n/a`` for NaN)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    return 'n/a' if math.isnan(v) else f'{v:.{nd}f}'


def mean_structure_dice(reference: np.ndarray, test: np.ndarray, min_voxels: int = 20
                        ) -> float:
    """Mean Dice over the non-zero labels of ``reference`` with more than ``min_voxels``
    voxels there (the tuning sweeps' score; :func:`keyprep.pipeline.qc.dice_per_label`)."""
    from .qc import dice_per_label

    ref = np.rint(np.asarray(reference)).astype(np.int64)
    ids, counts = np.unique(ref[ref > 0], return_counts=True)
    labels = [int(k) for k, c in zip(ids, counts) if c > min_voxels]
    return float(np.mean(list(dice_per_label(ref, np.rint(test).astype(np.int64),
                                             labels).values())))
