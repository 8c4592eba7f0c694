#!/usr/bin/env python
"""Inter-subject registration benchmark on synthetic images of real brains, Dice per structure.

The paper's protocol (KeyMorph, Wang et al. 2023, §5.1.1; ``paper_keymorph.md`` §5.4) on
keyprep's synthesis engine: every ordered pair of two *different* held-out SynthSeg brains
(``HELD_OUT`` of :mod:`keyprep.pipeline.synth.train`: never seen in training), each image
synthesised from its real label map with a named contrast (fixed T1, moving T1/T2/PD-like,
:data:`keyprep.pipeline.synth.generator.CONTRASTS`), skull removed, and the moving image
rotated about its brain centre by 0, 45, 90, 135 or 180 degrees. The exact label maps of both
images are known, so the Dice after registration is measured per SynthSeg structure, as in the
paper's tables, with no estimated ground truth.

For each pair and engine (every registered engine by default; engines with several variants,
e.g. one thin-plate spline per λ, give one row per variant from one run), the moving labels
are warped onto the fixed grid with the exported forward transform (``genericLabel``): mean
Dice over the 32 SynthSeg structures and over the paper's 12 merged left/right ROIs, the
Jacobian determinant inside the fixed brain, wall time and peak memory of the registration,
and the time ratios to ``antsAffine`` and ``antsSyN`` on the same pair. Reference rows:
``none`` (identity: Dice before registration) and ``derotate`` (the exact inverse of the
applied rotation and nothing else). Engines that use structure labels (KeyMorph: the head's
pose) get the label network's labels of both synthetic images, as in a participant run
(:func:`keyprep.pipeline.benchmark.structure_labels`, cached next to each image as
``*_netlabels.nii.gz``; not the exact labels, which only score); labelling is preprocessing
in keyprep, so its time is not in ``runtime_s``. Where the KeyMorph detector exists, keypoint repeatability
under rotation and cross-subject consistency are measured too
(:mod:`keyprep.pipeline.keymorph.keypoint_analysis`).

Rows already in the TSV are skipped, so an interrupted run resumes; the images are cached in
the work folder. Run ``python benchmarks/run_intersubject_benchmark.py --help`` for the
options and ``benchmarks/README.md`` for the protocol in full.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from itertools import permutations
from pathlib import Path

import nibabel as nb
import numpy as np

from keyprep.pipeline import benchmark as bh
from keyprep.pipeline.synth.benchmark_images import (
    CSF_SHELL_MM, MARGIN_MM, brain_label_map, crc32, draw_rotation, rotate, synthesise,
)
from keyprep.pipeline.synth.labels import BRAIN_OUTPUT_LABELS, OUTPUT_LABELS, OUTPUT_NAMES

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

#: Where the SynthSeg training label maps are, relative to the repository.
DEFAULT_LABEL_MAPS = REPO.parent / 'shared' / 'data' / 'synthseg' / 'training_label_maps'
#: Rotation levels of the paper (degrees).
ROTATIONS = (0.0, 45.0, 90.0, 135.0, 180.0)
#: Contrast pairs ``moving-fixed`` (the paper's "A -> B": moving A registered to fixed B).
CONTRAST_PAIRS = ('t1-t1', 't2-t1', 'pd-t1')
#: BIDS suffix of each named contrast (for engines that want the images' contrasts).
BIDS_SUFFIX = {'t1': 'T1w', 't2': 'T2w', 'pd': 'PDw', 'flair': 'FLAIR'}
#: The paper's 12 ROIs, left and right merged (``paper_keymorph.md`` §4.2).
PAPER_ROIS: dict[str, tuple[int, ...]] = {
    'cerebral-wm': (2, 41), 'cerebral-cortex': (3, 42), 'lateral-ventricle': (4, 43),
    'cerebellum-wm': (7, 46), 'cerebellum-cortex': (8, 47), 'thalamus': (10, 49),
    'caudate': (11, 50), 'putamen': (12, 51), 'pallidum': (13, 52), 'hippocampus': (17, 53),
    'amygdala': (18, 54), 'brainstem': (16,),
}
#: The SynthSeg structures scored (the label network's 32, as in keyprep's QC).
STRUCTURES: tuple[int, ...] = tuple(BRAIN_OUTPUT_LABELS)
#: Reference rows (no registration).
REFERENCE_METHODS = ('none', 'derotate')
#: Bumped when the way images are made changes (invalidates the cached images).
IMAGE_VERSION = 2

COLUMNS = [
    'case', 'moving_subject', 'fixed_subject', 'contrast_pair', 'rotation_deg',
    'rotation_axes', 'engine', 'method', 'dice_rois', 'dice_structures', 'jac_min', 'jac_max',
    'jac_neg_frac', 'logjac_std', 'runtime_s', 'run_time_s', 'peak_mem_mb', 'baseline_mem_mb',
    'time_ratio_to_antsAffine', 'time_ratio_to_antsSyN', 'resolution_mm', 'sloppy', 'threads',
    'seed', 'engine_params', 'status',
]
NUMERIC = ['rotation_deg', 'dice_rois', 'dice_structures', 'jac_min', 'jac_max', 'jac_neg_frac',
           'logjac_std', 'runtime_s', 'run_time_s', 'peak_mem_mb', 'baseline_mem_mb',
           'time_ratio_to_antsAffine', 'time_ratio_to_antsSyN', 'resolution_mm', 'threads',
           'seed']
ROUNDING = {**bh.ROUNDING, 'dice_rois': 4, 'dice_structures': 4, 'run_time_s': 2,
            'baseline_mem_mb': 1}
#: One row per case, method and region (structure or merged ROI).
REGION_COLUMNS = ['case', 'method', 'resolution_mm', 'sloppy', 'seed', 'region_kind', 'region',
                  'dice']
#: The columns that identify a row (resuming skips rows whose key is present).
KEY = ['case', 'method', 'resolution_mm', 'sloppy', 'seed']
#: The columns that identify one registration problem (for the time ratios).
PROBLEM = ['case', 'resolution_mm', 'sloppy', 'seed']


# --------------------------------------------------------------------------------------
# Subjects, rotations and images
# --------------------------------------------------------------------------------------

def short_name(name: str) -> str:
    """A compact subject name for file and case names (``training_seg_14`` -> ``seg14``)."""
    return name.replace('training_seg_', 'seg').replace('_', '')


@dataclass(frozen=True)
class CaseSpec:
    """One registration problem: subjects, contrasts and the rotation level."""

    moving: str
    fixed: str
    moving_contrast: str
    fixed_contrast: str
    rotation_deg: float
    #: slice thickness of the moving image along its third axis (0: as the fixed image)
    moving_slice_mm: float = 0.0

    @property
    def contrast_pair(self) -> str:
        return f'{self.moving_contrast}-{self.fixed_contrast}'

    @property
    def name(self) -> str:
        slices = f'_slice{self.moving_slice_mm:g}mm' if self.moving_slice_mm else ''
        return (f'{short_name(self.moving)}-to-{short_name(self.fixed)}_'
                f'{self.contrast_pair}_rot{int(round(self.rotation_deg)):03d}{slices}')


@dataclass
class Case:
    """A built case: files of both images and labels, and the applied rotation."""

    spec: CaseSpec
    fixed: Path
    fixed_labels: Path
    moving: Path
    moving_labels: Path
    rotation: np.ndarray
    axes: str
    axis: np.ndarray


def brain_mask(image: Path) -> Path:
    """The brain mask of a synthetic image (its exact labels > 0, holes filled), written once
    beside it: the reference a participant run has from skull stripping, which the label
    network's self-check compares its labels with. (The image's non-zero voxels are not a
    brain mask: the CSF shell and the background noise make them about twice the brain.)"""
    out = image.with_name('brainmask.nii.gz')
    if not out.exists():
        from keyprep.pipeline.io import make_image
        from keyprep.pipeline.masks import largest_component_filled

        lab = nb.load(str(image.with_name('labels.nii.gz')))
        mask = largest_component_filled(np.asanyarray(lab.dataobj) > 0)
        tmp = out.with_name('brainmask.tmp.nii.gz')
        make_image(mask.astype(np.uint8), lab.affine).to_filename(str(tmp))
        os.replace(tmp, out)
    return out


class ImageCache:
    """Synthetic images in the work folder, made once (checked by a JSON record)."""

    def __init__(self, work: Path, maps: dict, resolution: float, seed: int):
        self.work, self.maps, self.resolution, self.seed = work, maps, resolution, seed

    def _make(self, folder: Path, meta: dict, build) -> tuple[Path, Path]:
        image, labels, record = (folder / 'image.nii.gz', folder / 'labels.nii.gz',
                                 folder / 'image.json')
        if record.exists() and image.exists() and labels.exists():
            if json.loads(record.read_text()) == meta:
                return image, labels
        folder.mkdir(parents=True, exist_ok=True)
        img, lab = build()
        img.to_filename(str(image))
        lab.to_filename(str(labels))
        record.write_text(json.dumps(meta, indent=2))
        return image, labels

    def _meta(self, subject: str, contrast: str) -> dict:
        return {'version': IMAGE_VERSION, 'subject': subject, 'contrast': contrast,
                'resolution_mm': self.resolution, 'seed': self.seed,
                'csf_shell_mm': CSF_SHELL_MM, 'margin_mm': MARGIN_MM}

    def generator_seed(self, subject: str, contrast: str) -> int:
        return crc32(f'{self.seed}:{subject}:{contrast}')

    def subject(self, subject: str, contrast: str) -> tuple[Path, Path]:
        """The unrotated image of a subject in a contrast (the fixed image of its pairs)."""
        return self._make(
            self.work / 'subjects' / f'{short_name(subject)}_{contrast}',
            self._meta(subject, contrast),
            lambda: synthesise(self.maps[subject], contrast, self.resolution,
                               self.generator_seed(subject, contrast)))

    def case(self, spec: CaseSpec) -> Case:
        """Both images of a case: the fixed subject image, and the moving subject image
        turned by the case's rotation (at 0 degrees, the subject image itself)."""
        fixed, fixed_labels = self.subject(spec.fixed, spec.fixed_contrast)
        rot, axes, axis = draw_rotation(self.seed, spec.moving, spec.fixed, spec.rotation_deg)
        moving, moving_labels = self.subject(spec.moving, spec.moving_contrast)
        if spec.rotation_deg != 0:
            meta = {**self._meta(spec.moving, spec.moving_contrast), 'rotation': rot.tolist()}
            source = moving
            moving, moving_labels = self._make(
                self.work / 'moving' / spec.name, meta,
                lambda: rotate(nb.load(str(source)), self.maps[spec.moving], rot,
                               self.resolution))
        if spec.moving_slice_mm:  # scored with the full-resolution labels it was made from
            source, source_labels = moving, moving_labels
            meta = {**self._meta(spec.moving, spec.moving_contrast), 'rotation': rot.tolist(),
                    'slice_mm': spec.moving_slice_mm}
            moving, _ = self._make(
                self.work / 'moving' / spec.name, meta,
                lambda: (thick_slices(nb.load(str(source)), spec.moving_slice_mm, order=1),
                         thick_slices(nb.load(str(source_labels)), spec.moving_slice_mm,
                                      order=0)))
        return Case(spec, fixed, fixed_labels, moving, moving_labels, rot, axes, axis)


def thick_slices(img: nb.Nifti1Image, slice_mm: float, order: int = 1) -> nb.Nifti1Image:
    """``img`` acquired with slices ``slice_mm`` thick along its third axis: each block of
    ``slice_mm / voxel`` slices averaged into one (a box slice profile; ``order=0``, for
    labels: the block's middle slice), on a grid of the same field of view whose voxels
    are that thick (the affine's third column scaled, the voxel centres at the blocks'
    centres). An anisotropic clinical acquisition, e.g. 1 x 1 x 5 mm from a 1 mm image."""
    data = np.asanyarray(img.dataobj)
    zoom = float(img.header.get_zooms()[2])
    f = int(round(slice_mm / zoom))
    if f < 2 or abs(f * zoom - slice_mm) > 1e-3:
        raise ValueError(f'slice thickness {slice_mm} mm must be an integer multiple (>= 2) '
                         f'of the voxel size {zoom} mm')
    n = data.shape[2] // f
    blocks = data[:, :, :n * f].reshape(data.shape[0], data.shape[1], n, f)
    if order == 0:
        out = blocks[..., f // 2].astype(data.dtype)
    else:
        out = blocks.astype(np.float32).mean(-1)
    scale = np.eye(4)
    scale[2, 2] = f
    scale[2, 3] = (f - 1) / 2
    new = nb.Nifti1Image(out, img.affine @ scale)
    new.set_qform(img.affine @ scale, 1)
    new.set_sform(img.affine @ scale, 1)
    return new


# --------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------

def _roi_lut() -> np.ndarray:
    lut = np.zeros(max(OUTPUT_LABELS) + 1, dtype=np.int64)
    for i, labels in enumerate(PAPER_ROIS.values(), start=1):
        lut[list(labels)] = i
    return lut


def region_dice(reference: np.ndarray, warped: np.ndarray) -> dict[tuple[str, str], float]:
    """Dice per SynthSeg structure present in ``reference`` and per merged paper ROI:
    ``{('structure' | 'roi', name): dice}``.

    >>> ref = np.array([0, 2, 2, 41, 41, 17]); war = np.array([0, 2, 41, 41, 41, 0])
    >>> d = region_dice(ref, war)
    >>> round(d['structure', 'Left-Cerebral-White-Matter'], 3), d['roi', 'cerebral-wm']
    (0.667, 1.0)
    >>> d['roi', 'hippocampus']
    0.0
    """
    from keyprep.pipeline.qc import dice_per_label

    present = [lab for lab in STRUCTURES if np.any(reference == lab)]
    out = {('structure', OUTPUT_NAMES[lab]): d
           for lab, d in dice_per_label(reference, warped, present).items()}
    lut = _roi_lut()
    ref_roi = lut[np.clip(reference, 0, len(lut) - 1)]
    war_roi = lut[np.clip(warped, 0, len(lut) - 1)]
    rois = [i for i in range(1, len(PAPER_ROIS) + 1) if np.any(ref_roi == i)]
    names = list(PAPER_ROIS)
    out.update({('roi', names[i - 1]): d
                for i, d in dice_per_label(ref_roi, war_roi, rois).items()})
    return out


def score_case(case: Case, fwd: Path, kind: str, out_dir: Path) -> dict:
    """Mean Dice (structures, ROIs), Jacobian statistics inside the fixed brain and the
    per-region Dice (under ``_regions``) of one forward transform."""
    ref = np.asanyarray(nb.load(str(case.fixed_labels)).dataobj).astype(np.int64)
    warped = bh.warp_labels(case.moving_labels, case.fixed, fwd,
                             out_dir / 'labels_warped.nii.gz')
    regions = region_dice(ref, warped)
    structures = [d for (k, _), d in regions.items() if k == 'structure']
    rois = [d for (k, _), d in regions.items() if k == 'roi']
    out = {'dice_structures': float(np.nanmean(structures)) if structures else math.nan,
           'dice_rois': float(np.nanmean(rois)) if rois else math.nan, '_regions': regions}
    out.update(bh.jacobian_scores(fwd, case.fixed, kind, ref > 0))
    return out


def _base_row(case: Case, method: str, *, resolution: float, sloppy: bool, seed: int,
              threads: int) -> dict:
    row = {k: math.nan for k in COLUMNS}
    row.update({
        'case': case.spec.name, 'moving_subject': case.spec.moving,
        'fixed_subject': case.spec.fixed, 'contrast_pair': case.spec.contrast_pair,
        'rotation_deg': case.spec.rotation_deg, 'rotation_axes': case.axes,
        'engine': 'reference' if method in REFERENCE_METHODS else method, 'method': method,
        'resolution_mm': float(resolution), 'sloppy': bool(sloppy), 'threads': threads,
        'seed': seed, 'status': ''})
    return row


def evaluate_rows(method: str, case: Case, work: Path, *, resolution: float, threads: int = 1,
                  sloppy: bool = False, seed: int = 0, params: dict | None = None
                  ) -> tuple[list[dict], list[dict]]:
    """Register one case with engine ``method`` (with engine ``params``) or a reference,
    and score every variant: ``(rows, region rows)``. Engine errors give rows with
    ``status`` ``error: ...``."""
    from keyprep.pipeline.transforms import write_itk_affine

    row = _base_row(case, method, resolution=resolution, sloppy=sloppy, seed=seed,
                    threads=threads)
    row['engine_params'] = json.dumps(params, sort_keys=True) if params else ''
    run_dir = work / 'runs' / case.spec.name / method

    def score(fwd: Path, kind: str, out_dir: Path) -> dict:
        return score_case(case, fwd, kind, out_dir)

    if method == 'none':
        rows = [bh.guarded(row, run_dir, lambda: score(
            write_itk_affine(np.eye(4), run_dir / 'identity.txt'), 'linear', run_dir))]
    elif method == 'derotate':
        # fixed -> moving: the moving image is the unrotated anatomy turned by R about the
        # brain centre, which is the world origin of every synthetic grid
        mat = np.eye(4)
        mat[:3, :3] = case.rotation
        rows = [bh.guarded(row, run_dir, lambda: score(
            write_itk_affine(mat, run_dir / 'rotation.txt'), 'linear', run_dir))]
    else:
        contrasts = {'fixed': BIDS_SUFFIX.get(case.spec.fixed_contrast, 'T1w'),
                     'moving': BIDS_SUFFIX.get(case.spec.moving_contrast, 'T1w')}
        labels = None
        if bh.uses_labels(method):  # as in a participant run: the label network's labels
            try:
                labels = {k: bh.structure_labels(p, p.with_name(p.name.replace(
                    '.nii.gz', '') + '_netlabels.nii.gz'), brain_mask(p))
                    for k, p in (('fixed', case.fixed), ('moving', case.moving))}
            except Exception as exc:  # the engine then runs without them (and says so)
                print(f'labelling failed ({type(exc).__name__}: {exc}); {method} runs '
                      'without label maps', file=sys.stderr)
        rows = bh.engine_rows(method, row, run_dir, case.fixed, case.moving, score,
                               threads=threads, sloppy=sloppy, seed=seed, contrasts=contrasts,
                               params=params, labels=labels)
    regions = []
    for r in rows:
        for (kind, name), dice in (r.pop('_regions', None) or {}).items():
            regions.append({'case': r['case'], 'method': r['method'],
                            'resolution_mm': r['resolution_mm'], 'sloppy': r['sloppy'],
                            'seed': r['seed'], 'region_kind': kind, 'region': name,
                            'dice': dice})
    return rows, regions


# --------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------

def _key(row: dict) -> tuple:
    return (str(row['case']), str(row['method']), float(row['resolution_mm']),
            str(row['sloppy']).lower() == 'true', int(float(row['seed'])))


def results_frame(rows: list[dict]):
    """Typed rows with the time ratios to antsAffine and antsSyN on the same case."""
    df = bh.typed_frame(rows, COLUMNS, NUMERIC)
    return bh.add_time_ratios(df, PROBLEM)


def write_results(rows: list[dict], regions: list[dict], tsv: Path, regions_tsv: Path) -> None:
    """Write both TSVs atomically (regions first: a row is done once the main TSV has it)."""
    import pandas as pd

    bh.write_table(pd.DataFrame(regions, columns=REGION_COLUMNS), regions_tsv, {'dice': 4})
    bh.write_table(results_frame(rows), tsv, ROUNDING)


def _ms(values, scale: float = 100.0, nd: int = 1) -> str:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float) * scale
    if not v.size:
        return 'n/a'
    return f'{v.mean():.{nd}f} ± {v.std():.{nd}f}' if v.size > 1 else f'{v[0]:.{nd}f}'


def _paired(ok, a: str, b: str, col: str, by: list[str], where=None) -> tuple:
    """Means of ``col`` for methods ``a`` and ``b`` over the problems both solved, and n."""
    sub = ok if where is None else ok[where(ok)]
    x = sub[sub['method'] == a].set_index(by)[col]
    y = sub[sub['method'] == b].set_index(by)[col]
    common = x.index.intersection(y.index)
    if not len(common):
        return math.nan, math.nan, 0
    return float(x.loc[common].mean()), float(y.loc[common].mean()), len(common)


def goal_lines(sel, resolution: float, threads: int) -> list[str]:
    """The issue's goals, each with the measured values (12-ROI Dice; 32-structure Dice in
    brackets), computed from the rows."""
    ok = sel[sel['status'] == 'ok']
    methods = set(ok['method'])
    km, aa, syn = 'keymorphAffine', 'antsAffine', 'antsSyN'
    lines = []

    def pts(x: float) -> str:
        return f'{100 * x:.2f}'

    # 1. robustness: keymorphAffine from 0 to 180 degrees, same subject and contrast pairs
    levels = set(ok['rotation_deg'])
    if km in methods and {0.0, 180.0} <= levels:
        by = ['moving_subject', 'fixed_subject', 'contrast_pair']
        res = {}
        for col in ('dice_rois', 'dice_structures'):
            a = ok[(ok['method'] == km) & (ok['rotation_deg'] == 0.0)].set_index(by)[col]
            b = ok[(ok['method'] == km) & (ok['rotation_deg'] == 180.0)].set_index(by)[col]
            common = a.index.intersection(b.index)
            res[col] = (float(a.loc[common].mean()), float(b.loc[common].mean()), len(common))
        d0, d180, n = res['dice_rois']
        s0, s180, _ = res['dice_structures']
        loss = 100 * (d0 - d180)
        verdict = 'met' if loss <= 2.0 else 'NOT met'
        lines.append(f'* keymorphAffine loses at most 2 Dice points between 0° and 180°: '
                     f'{pts(d0)} at 0°, {pts(d180)} at 180° (loss {loss:.2f} points; '
                     f'32 structures: {pts(s0)} → {pts(s180)}, loss {100 * (s0 - s180):.2f}) '
                     f'over {n} subject/contrast pair(s): **{verdict}**.')
    else:
        lines.append('* keymorphAffine loses at most 2 Dice points between 0° and 180°: not '
                     'measured (needs keymorphAffine rows at 0° and 180°).')
    # 2. keymorphAffine versus antsAffine at 0 degrees
    if {km, aa} <= methods:
        at0 = lambda d: d['rotation_deg'] == 0.0  # noqa: E731
        k, a, n = _paired(ok, km, aa, 'dice_rois', PROBLEM, at0)
        ks, as_, _ = _paired(ok, km, aa, 'dice_structures', PROBLEM, at0)
        if n:
            gap = 100 * (a - k)
            verdict = 'met' if gap <= 2.0 else 'NOT met'
            lines.append(f'* keymorphAffine within 2 Dice points of antsAffine at 0°: '
                         f'{pts(k)} vs {pts(a)} (antsAffine ahead by {gap:.2f} points; '
                         f'32 structures: {pts(ks)} vs {pts(as_)}) over {n} pair(s): '
                         f'**{verdict}**.')
        else:
            lines.append('* keymorphAffine within 2 Dice points of antsAffine at 0°: not '
                         'measured (no 0° pair where both succeeded).')
    else:
        lines.append('* keymorphAffine within 2 Dice points of antsAffine at 0°: not measured '
                     '(needs both engines).')
    # 3. refined KeyMorph versus antsSyN, overall and per rotation level
    refined = sorted(m for m in methods if m.lower().startswith('keymorph')
                     and 'refine' in m.lower())
    if refined and syn in methods:
        for m in refined:
            r, s, n = _paired(ok, m, syn, 'dice_rois', PROBLEM)
            rs, ss, _ = _paired(ok, m, syn, 'dice_structures', PROBLEM)
            diff = 100 * (r - s)
            verdict = ('beats' if diff > 0 else 'matches (within 1 point)' if diff >= -1.0
                       else 'does NOT match')
            below = []
            for level in sorted(levels):
                lr, ls, ln = _paired(ok, m, syn, 'dice_rois', PROBLEM,
                                     lambda d, lv=level: d['rotation_deg'] == lv)
                if ln and 100 * (lr - ls) < -1.0:
                    below.append(f'{level:g}° ({pts(lr)} vs {pts(ls)})')
            lines.append(f'* {m} matches or beats antsSyN: {pts(r)} vs {pts(s)} over all '
                         f'levels ({diff:+.2f} points; 32 structures: {pts(rs)} vs {pts(ss)}) '
                         f'over {n} pair(s): **{verdict}**; more than 1 point below antsSyN at: '
                         f'{", ".join(below) or "no level"}.')
    else:
        lines.append('* refined KeyMorph matches or beats antsSyN: not measured (needs a '
                     'refined KeyMorph variant and antsSyN).')
    # 4. speed: antsAffine time over keymorphAffine time on the same case
    if {km, aa} <= methods:
        kt = ok[ok['method'] == km].set_index(PROBLEM)['runtime_s']
        at = ok[ok['method'] == aa].set_index(PROBLEM)['runtime_s']
        common = kt.index.intersection(at.index)
        if len(common):
            speed = (at.loc[common] / kt.loc[common]).astype(float)
            med = float(speed.median())
            verdict = 'met' if med >= 10.0 else 'NOT met'
            note = '' if resolution == 1.0 else f' (measured at {resolution:g} mm, not 1 mm)'
            lines.append(f'* keymorphAffine at least 10× faster than antsAffine: median '
                         f'{med:.1f}× (range {speed.min():.1f}–{speed.max():.1f}×; '
                         f'{float(kt.loc[common].median()):.2f} s vs '
                         f'{float(at.loc[common].median()):.2f} s) over {len(common)} pair(s), '
                         f'{threads} thread(s){note}: **{verdict}**.')
    else:
        lines.append('* keymorphAffine at least 10× faster than antsAffine: not measured '
                     '(needs both engines).')
    # one run gives every variant (e.g. every TPS lambda)
    for engine, grp in ok[ok['engine'] != 'reference'].groupby('engine'):
        variants = list(dict.fromkeys(grp['method']))
        if len(variants) > 1:
            run = grp.groupby('case')['run_time_s'].first()
            fastest = grp.groupby('case')['runtime_s'].min()
            lines.append(f'* {engine}: one run gives {len(variants)} variants '
                         f'({", ".join(variants)}); median wall time of the whole run '
                         f'{float(run.median()):.2f} s, of its variants without their own '
                         f'extra work (refinement) {float(fastest.median()):.2f} s.')
    return lines


def write_summary(rows: list[dict], regions: list[dict], path: Path, *, info: dict,
                  resolution: float, sloppy: bool, seed: int, threads: int,
                  cases: list[Case], keypoints: dict | None = None) -> None:
    """The Markdown summary of the rows at this resolution, schedule and seed."""
    import pandas as pd

    df = results_frame(rows)
    sel = df[(df['resolution_mm'] == float(resolution)) & (df['sloppy'] == bool(sloppy))
             & (df['seed'] == seed)]
    ok = sel[sel['status'] == 'ok']
    methods = [m for m in REFERENCE_METHODS if m in set(sel['method'])]
    methods += [m for m in dict.fromkeys(sel['method']) if m not in REFERENCE_METHODS]
    levels = sorted(set(sel['rotation_deg']))
    thick = sorted({c.spec.moving_slice_mm for c in cases if c.spec.moving_slice_mm})
    slices = ('both images' if not thick else 'the fixed images; the moving images '
              + ' or '.join(f'{resolution:g} x {resolution:g} x {t:g} mm' for t in thick))
    pairs = list(dict.fromkeys(sel['contrast_pair']))
    subjects = sorted(set(sel['moving_subject']) | set(sel['fixed_subject']))
    lines = [
        '# Inter-subject registration benchmark (synthetic images of held-out real brains)',
        '',
        f'Generated by `benchmarks/run_intersubject_benchmark.py` on '
        f'{time.strftime("%Y-%m-%d %H:%M %Z")}.',
        '',
        '* Command (rows already in the output folder are kept, so the table may come from '
        f'several runs of it, resumed): `python {shlex.join(sys.argv)}`',
        f'* Subjects (held-out SynthSeg label maps): {", ".join(subjects)}; every ordered pair '
        'of two different brains',
        f'* Contrast pairs (moving-fixed): {", ".join(pairs)}; rotation levels: '
        f'{", ".join(f"{v:g}°" for v in levels)}; seed {seed}',
        f'* Resolution: {resolution:g} mm ({slices}); schedules: '
        f'{"sloppy (short, for smoke runs only)" if sloppy else "full"}',
        f'* Machine: {info["cpu"]}, {info["cores"]} cores, {info["memory"]} RAM, '
        f'{info["threads"]} thread(s) per engine; {info["platform"]}',
        '* Versions: ' + ', '.join(f'{k} {v}' for k, v in info['versions'].items()),
        '',
        'Dice in percent, mean ± std over the pairs (subject pairs × contrast pairs, or × '
        'rotation levels where pooled). `none`: identity (before registration); `derotate`: '
        'the exact inverse of the applied rotation (pose corrected, no inter-subject '
        'alignment). Failed registrations are counted in brackets and left out of the '
        'means.',
        '',
        '## Goals of the issue (measured)',
        '',
        *goal_lines(sel, resolution, threads),
    ]

    def table(title: str, col: str, group: str, keys: list,
              names: list[str] | None = None) -> list[str]:
        out = ['', f'## {title}', '',
               '| method | ' + ' | '.join(names or [str(k) for k in keys]) + ' |',
               '|---|' + '---|' * len(keys)]
        for m in methods:
            cells = []
            for k in keys:
                r = sel[(sel['method'] == m) & (sel[group] == k)]
                if r.empty:
                    cells.append('')
                    continue
                good = r[r['status'] == 'ok']
                errors = len(r) - len(good)
                cells.append(_ms(good[col]) + (f' ({errors} failed)' if errors else ''))
            out.append(f'| {m} | ' + ' | '.join(cells) + ' |')
        return out

    level_names = [f'{v:g}°' for v in levels]
    lines += table('Dice (12 paper ROIs, L/R merged) by rotation level', 'dice_rois',
                   'rotation_deg', levels, level_names)
    lines += table('Dice (32 SynthSeg structures) by rotation level', 'dice_structures',
                   'rotation_deg', levels, level_names)
    lines += table('Dice (12 ROIs) by contrast pair, all rotation levels', 'dice_rois',
                   'contrast_pair', pairs)
    # per ROI, pooled over every case
    reg = pd.DataFrame(regions, columns=REGION_COLUMNS)
    if not reg.empty:
        reg['dice'] = pd.to_numeric(reg['dice'], errors='coerce')
        reg = reg[(pd.to_numeric(reg['resolution_mm']) == float(resolution))
                  & (reg['sloppy'].astype(str).str.lower() == str(bool(sloppy)).lower())
                  & (pd.to_numeric(reg['seed']) == seed) & (reg['region_kind'] == 'roi')]
        rois = [r for r in PAPER_ROIS if r in set(reg['region'])]
        lines += ['', '## Dice per ROI (mean over all pairs and levels)', '',
                  '| method | ' + ' | '.join(rois) + ' |', '|---|' + '---|' * len(rois)]
        for m in methods:
            r = reg[reg['method'] == m].groupby('region')['dice'].mean()
            if r.empty:
                continue
            lines.append(f'| {m} | ' + ' | '.join(bh.fmt(100 * r.get(x, math.nan), 1)
                                                  for x in rois) + ' |')
    lines += ['', '## Jacobian determinant of the forward transform inside the fixed brain', '',
              '| method | min J (all pairs) | median of min J | mean % J ≤ 0 | max % J ≤ 0 '
              '| mean std log J |', '|---|---|---|---|---|---|']
    for m in methods:
        r = ok[ok['method'] == m]
        if r.empty:
            continue
        lines.append(f'| {m} | {bh.fmt(r["jac_min"].min(), 3)} | '
                     f'{bh.fmt(r["jac_min"].median(), 3)} | '
                     f'{bh.fmt(100 * r["jac_neg_frac"].mean(), 3)} | '
                     f'{bh.fmt(100 * r["jac_neg_frac"].max(), 3)} | '
                     f'{bh.fmt(r["logjac_std"].mean(), 4)} |')
    lines += ['', '## Time and memory per registration', '',
              'Wall time of the engine\'s own registration; peak resident memory of the '
              'benchmark process during it (it includes the process baseline, shown beside it); '
              'ratios: time over antsAffine\'s / antsSyN\'s on the same pair (median over pairs). '
              'Variants of one engine share one run; a variant\'s time is the run\'s less the '
              'time the engine spent on its other variants alone (their test-time refinement; '
              '`run_time_s` in the TSV is the whole run).', '',
              '| method | n | time (s) mean ± std | median time (s) | peak memory (MB) median / '
              'max | baseline (MB) | ratio to antsAffine | ratio to antsSyN |',
              '|---|---|---|---|---|---|---|---|']
    for m in methods:
        r = ok[(ok['method'] == m) & ok['runtime_s'].notna()]
        if r.empty:
            continue
        lines.append(f'| {m} | {len(r)} | {_ms(r["runtime_s"], 1.0, 2)} | '
                     f'{bh.fmt(r["runtime_s"].median(), 2)} | '
                     f'{bh.fmt(r["peak_mem_mb"].median(), 0)} / '
                     f'{bh.fmt(r["peak_mem_mb"].max(), 0)} | '
                     f'{bh.fmt(r["baseline_mem_mb"].median(), 0)} | '
                     f'{bh.fmt(r["time_ratio_to_antsAffine"].median(), 3)} | '
                     f'{bh.fmt(r["time_ratio_to_antsSyN"].median(), 3)} |')
    if keypoints:
        from keyprep.pipeline.keymorph.keypoint_analysis import summary_lines

        lines += ['', *summary_lines(keypoints)]
    errors = sel[sel['status'] != 'ok']
    if not errors.empty:
        lines += ['', f'## Errors ({len(errors)})', '']
        lines += [f'* {r.case} / {r.method}: {r.status}' for r in errors.head(30).itertuples()]
        if len(errors) > 30:
            lines.append(f'* ... and {len(errors) - 30} more (see the TSV)')
    rot_rows = {}
    for c in cases:
        if c.spec.rotation_deg:
            rot_rows[(c.spec.moving, c.spec.fixed, c.spec.rotation_deg)] = c
    if rot_rows:
        lines += ['', '## Rotations applied to the moving images', '',
                  'About the moving brain centre; coordinate axes involved and the unit '
                  'rotation axis (RAS); the same for every contrast pair.', '',
                  '| moving | fixed | level | axes | axis |', '|---|---|---|---|---|']
        for (mv, fx, lv), c in sorted(rot_rows.items()):
            lines.append(f'| {mv} | {fx} | {lv:g}° | {c.axes} | '
                         f'({", ".join(f"{a:.3f}" for a in c.axis)}) |')
    path.write_text('\n'.join(lines) + '\n')


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from keyprep.pipeline.synth.train import HELD_OUT

    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--label-maps', type=Path, default=DEFAULT_LABEL_MAPS, metavar='DIR',
                        help='folder of the SynthSeg label maps (default: '
                             '../shared/data/synthseg/training_label_maps)')
    parser.add_argument('--subjects', nargs='+', default=list(HELD_OUT), metavar='NAME',
                        help=f'label maps (<DIR>/<NAME>.nii.gz; default: the held-out '
                             f'{", ".join(HELD_OUT)})')
    parser.add_argument('--pairs', nargs='+', default=None, metavar='MOVING:FIXED',
                        help='ordered subject pairs to run (default: every ordered pair of two '
                             'different --subjects)')
    parser.add_argument('--contrasts', nargs='+', default=list(CONTRAST_PAIRS),
                        metavar='MOVING-FIXED',
                        help=f'contrast pairs (default: {" ".join(CONTRAST_PAIRS)}; '
                             'contrasts: t1, t2, pd, flair)')
    parser.add_argument('--rotations', nargs='+', type=float, default=list(ROTATIONS),
                        metavar='DEG', help='rotation levels (default: 0 45 90 135 180)')
    parser.add_argument('--resolution', type=float, default=2.0, metavar='MM',
                        help='resolution of the synthetic images in mm (default: 2.0)')
    parser.add_argument('--moving-slice-mm', type=float, default=0.0, metavar='MM',
                        help='moving images acquired with slices this thick along their third '
                             'axis (an integer multiple of --resolution, e.g. 5 for '
                             '1 x 1 x 5 mm; scored with their full-resolution labels; default: '
                             'isotropic like the fixed image)')
    parser.add_argument('--methods', nargs='+', default=None, metavar='ENGINE',
                        help='engines to run (default: every registered engine)')
    parser.add_argument('--out', type=Path, default=REPO / 'benchmarks' / 'results',
                        help='folder of the TSV and Markdown results (default: '
                             'benchmarks/results)')
    parser.add_argument('--work-dir', type=Path, default=REPO / 'benchmarks' / 'work',
                        help='folder for the images and engine outputs (default: '
                             'benchmarks/work; a subfolder intersubject/res-<MM>_seed-<S>)')
    parser.add_argument('--threads', type=int, default=2, help='threads per engine (default: 2)')
    parser.add_argument('--seed', type=int, default=0,
                        help='seed of the rotations and intensities (default: 0)')
    parser.add_argument('--sloppy', action='store_true', help='short engine schedules')
    parser.add_argument('--quick', action='store_true',
                        help='one subject pair, the first two contrast pairs, rotations 0, 90 '
                             'and 180, sloppy schedules')
    parser.add_argument('--engine-params', default=None, metavar='JSON',
                        help='engine parameters, e.g. \'{"keymorphTPS": {"lambdas": [0, 1]}}\'')
    parser.add_argument('--keymorph-lambdas', nargs='+', type=float, default=None,
                        metavar='LAMBDA', help='TPS lambdas of the KeyMorph engines (one '
                                               'variant each; default: the engine\'s)')
    parser.add_argument('--keymorph-refine', default=None,
                        choices=('none', 'affine', 'deformable'),
                        help='test-time refinement of the KeyMorph engines (adds a '
                             '<variant>Refined row per variant; default: the engine\'s)')
    parser.add_argument('--keymorph-pose-search', default=None, choices=('labels', 'cube', 'none'),
                        help='pose search of the KeyMorph engines (default: the engine\'s)')
    parser.add_argument('--keymorph-keypoint-source', default=None,
                        choices=('detector', 'labels', 'both'),
                        help='keypoints of the KeyMorph fits (default: the engine\'s)')
    parser.add_argument('--retry-errors', action='store_true',
                        help='run again the rows whose status is an error (default: an error '
                             'is a result and is kept)')
    parser.add_argument('--skip-keypoints', action='store_true',
                        help='do not measure keypoint repeatability and consistency (the '
                             'summary keeps the results of an earlier run in --out)')
    parser.add_argument('--keymorph-weights', type=Path, default=None, metavar='PT',
                        help='KeyMorph weights of the engines and of the keypoint analysis '
                             '(default: the shipped ones)')
    parser.add_argument('--device', default='cpu',
                        help='torch device of the keypoint analysis (default: cpu)')
    return parser


def _cases(pairs: list[tuple[str, str]], contrasts: list[str], rotations: list[float],
           quick: bool, moving_slice_mm: float = 0.0) -> list[CaseSpec]:
    if quick:
        pairs, contrasts, rotations = pairs[:1], contrasts[:2], [0.0, 90.0, 180.0]
    out = []
    for cp in contrasts:  # contrast pair outermost: an interrupted run has whole tables
        mc, fc = cp.split('-')
        for mv, fx in pairs:
            out += [CaseSpec(mv, fx, mc, fc, float(r), float(moving_slice_mm))
                    for r in rotations]
    return out


def engine_params(methods: list[str], args) -> dict[str, dict]:
    """Parameters per engine: ``--engine-params``, plus the ``--keymorph-*`` options for
    the engines of the ``keymorph`` family that take them."""
    from keyprep.pipeline.engines import EngineOptions, get_engine

    given = json.loads(args.engine_params) if args.engine_params else {}
    if not isinstance(given, dict) or not all(isinstance(v, dict) for v in given.values()):
        raise SystemExit('run_intersubject_benchmark: --engine-params must be a JSON object '
                         'of objects ({"engine": {"param": value}})')
    out = {}
    for m in methods:
        engine = get_engine(m)
        extra = {}
        if engine.family == 'keymorph':
            options = {'weights': str(args.keymorph_weights) if args.keymorph_weights else None,
                       'refine': args.keymorph_refine, 'lambdas': args.keymorph_lambdas,
                       'pose_search': args.keymorph_pose_search,
                       'keypoint_source': args.keymorph_keypoint_source}
            for key, value in options.items():
                if value is None:
                    continue
                try:  # only the engines that take this parameter
                    engine.parameters(EngineOptions(params={key: value}))
                except (ValueError, TypeError):
                    continue
                extra[key] = value
        params = {**extra, **given.get(m, {})}
        if params:
            out[m] = params
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0 (engine failures are results, not errors)."""
    args = build_parser().parse_args(argv)
    from keyprep.pipeline.synth.generator import CONTRASTS

    if args.pairs:
        try:
            pairs = [tuple(p.split(':')) for p in args.pairs]
            assert all(len(p) == 2 and p[0] != p[1] for p in pairs)
        except AssertionError:
            raise SystemExit('run_intersubject_benchmark: --pairs takes MOVING:FIXED names of '
                             'two different subjects') from None
        subjects = list(dict.fromkeys(s for p in pairs for s in p))
    else:
        subjects = list(dict.fromkeys(args.subjects))
        pairs = list(permutations(subjects, 2))
    paths = {s: args.label_maps / f'{s}.nii.gz' for s in subjects}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise SystemExit(
            'run_intersubject_benchmark: this benchmark needs the SynthSeg label maps of the '
            f'subjects it compares, and these are missing: {", ".join(missing)}. Put the '
            'SynthSeg training label maps (training_seg_XX.nii.gz) in '
            f'{args.label_maps} or pass --label-maps DIR (the tests and the demo do not need '
            'them).')
    if len(paths) < 2:
        raise SystemExit('run_intersubject_benchmark: inter-subject pairs need at least two '
                         '--subjects')
    for cp in args.contrasts:
        parts = cp.split('-')
        if len(parts) != 2 or not all(p in CONTRASTS for p in parts):
            raise SystemExit(f'run_intersubject_benchmark: contrast pair {cp!r} must be '
                             f'MOVING-FIXED with contrasts in {", ".join(CONTRASTS)}')
    from keyprep.pipeline.antsutils import import_ants

    import_ants(args.threads)  # ITK reads its thread count once, at import
    import torch

    torch.set_num_threads(max(1, args.threads))
    from keyprep.pipeline.engines import available_engines, get_engine

    methods = [get_engine(m).name for m in (args.methods or list(available_engines()))]
    sloppy = bool(args.sloppy or args.quick)
    specs = _cases(pairs, list(args.contrasts), list(args.rotations), args.quick,
                   args.moving_slice_mm)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = args.work_dir / 'intersubject' / f'res-{args.resolution:g}_seed-{args.seed}'
    tsv, regions_tsv = out / 'intersubject_benchmark.tsv', out / 'intersubject_regions.tsv'
    md = out / 'intersubject_benchmark.md'
    rows = bh.read_table(tsv, COLUMNS)
    regions = bh.read_table(regions_tsv, REGION_COLUMNS)
    present = {_key(r) for r in rows}
    done = {_key(r) for r in rows if r['status'] == 'ok' or not args.retry_errors}
    info = bh.machine_info(args.threads)
    t0 = time.time()

    print(f'benchmark: {len(specs)} cases, synthesising the images at {args.resolution:g} mm '
          '...', flush=True)
    maps = {s: brain_label_map(p) for s, p in paths.items()}
    cache = ImageCache(work, maps, args.resolution, args.seed)
    cases = [cache.case(spec) for spec in specs]
    print(f'benchmark: images ready ({time.time() - t0:.0f} s)', flush=True)
    params = engine_params(methods, args)
    variants = {m: bh.variant_names(m, sloppy, params.get(m)) for m in methods}
    for case in cases:
        for method in [*REFERENCE_METHODS, *methods]:
            names = variants.get(method, [method])
            if all((case.spec.name, n, float(args.resolution), sloppy, args.seed) in done
                   for n in names):
                continue
            new, new_regions = evaluate_rows(method, case, work, resolution=args.resolution,
                                             threads=args.threads, sloppy=sloppy,
                                             seed=args.seed, params=params.get(method))
            done_now = {_key(r) for r in new}
            if done_now & present:  # rows measured again (errors, variants): replace them
                regions = [r for r in regions if _key(r) not in done_now]
                rows = [r for r in rows if _key(r) not in done_now]
            rows += new
            regions += new_regions
            done |= done_now
            present |= done_now
            write_results(rows, regions, tsv, regions_tsv)
            for row in new:
                print(f'benchmark: {case.spec.name} {row["method"]:16s} Dice ROIs '
                      f'{bh.fmt(row["dice_rois"])} structures '
                      f'{bh.fmt(row["dice_structures"])} time {bh.fmt(row["runtime_s"], 1)}'
                      f' s [{row["status"]}] ({time.time() - t0:.0f} s elapsed)', flush=True)
        write_summary(rows, regions, md, info=info, resolution=args.resolution, sloppy=sloppy,
                      seed=args.seed, threads=args.threads, cases=cases)
    keypoints = None
    if args.skip_keypoints:  # keep the section of an earlier run in the summary
        if (out / 'keypoint_summary.json').is_file():
            keypoints = json.loads((out / 'keypoint_summary.json').read_text())
    else:
        from keyprep.pipeline.keymorph import keypoint_analysis as ka

        contrasts = list(dict.fromkeys(c for cp in args.contrasts for c in cp.split('-')))
        keypoints = ka.run(
            list(maps), contrasts, list(args.rotations), image=cache.subject,
            draw_rotation=lambda s, lv: draw_rotation(args.seed, s, 'keypoints', lv)[:2],
            rotate=lambda img, s, r: rotate(img, maps[s], r, args.resolution)[0], out=out,
            weights=args.keymorph_weights, device=args.device, threads=args.threads,
            seed=args.seed)
        print(f'benchmark: keypoints: {keypoints.get("status")}', flush=True)
    write_summary(rows, regions, md, info=info, resolution=args.resolution, sloppy=sloppy,
                  seed=args.seed, threads=args.threads, cases=cases, keypoints=keypoints)
    print(f'benchmark: done in {time.time() - t0:.0f} s: {tsv} and {md}', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
