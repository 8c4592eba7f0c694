"""``keyprep-demo``: build a small real BIDS dataset with known answers, then run keyprep on it.

Every subject of the demo dataset is Colin27 (one real head, with its skull) moved by a
known random rotation, translation and scaling, resampled onto its own grid (voxel sizes
that differ between subjects, anisotropic and oblique ones, other voxel orders) with a
mild intensity change. The AAL labels and the exact transforms are written as a
BIDS-Derivatives ground-truth dataset next to it. By default keyprep registers every
subject to the unmoved Colin27 head, so the exact answer of each registration is known: the
demo then measures each engine's error against it (:func:`groundtruth_errors`) and the
participant reports show it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import nibabel as nb
import numpy as np

from .. import __version__
from ..pipeline import perturb as pt
from ..pipeline.io import atomic_write_text, make_image, save_image
from ..pipeline.targets import MRICRON_DIR, mricron_file

__all__ = ['COLIN27_DIR', 'TRUTH_TABLE', 'build_demo_dataset', 'demo_parameters',
           'groundtruth_errors', 'main', 'write_groundtruth_errors']

#: Where Debian's ``mricron-data`` package installs Colin27 and the AAL atlas.
COLIN27_DIR = MRICRON_DIR

#: Grids of the first subjects (voxel sizes in mm at full resolution, voxel order, obliquity
#: in degrees, extra field of view in mm); further subjects get random grids.
SUBJECT_GRIDS: tuple[dict, ...] = (
    {'voxel_size': (1.0, 1.0, 1.0), 'orientation': 'RAS', 'obliquity_deg': 0.0, 'margin_mm': 8},
    {'voxel_size': (1.2, 1.0, 1.4), 'orientation': 'LAS', 'obliquity_deg': 15.0,
     'margin_mm': 8},
    {'voxel_size': (1.5, 1.5, 1.5), 'orientation': 'LIA', 'obliquity_deg': 6.0, 'margin_mm': 20},
)

_PARAMS_FILE = Path('code') / 'keyprep_demo.json'
_SPACE = 'colin27'
#: The demo's table of errors against the truth, in keyprep's output folder (its name
#: matches ``*_qc.*`` of keyprep's ``.bidsignore``); the participant reports show it.
TRUTH_TABLE = 'demo_desc-groundtruth_qc.tsv'


def _colin(name: str) -> Path:
    return mricron_file(name)


def _subject_grid_spec(index: int, rng: np.random.Generator) -> dict:
    if index < len(SUBJECT_GRIDS):
        return dict(SUBJECT_GRIDS[index])
    return {
        'voxel_size': tuple(float(v) for v in np.round(rng.uniform(0.9, 1.5, size=3), 2)),
        'orientation': str(rng.choice(['RAS', 'LAS', 'LPS', 'LIA', 'RPI'])),
        'obliquity_deg': float(np.round(rng.uniform(0.0, 20.0), 1)),
        'margin_mm': int(rng.integers(5, 20)),
    }


def demo_parameters(n_subjects: int = 3, seed: int = 42, max_rotation: float = 180.0,
                    resolution: float | None = None,
                    rotations: Sequence[float] | None = None) -> dict:
    """The parameters that determine a demo dataset (recorded in ``code/keyprep_demo.json``).

    >>> demo_parameters(2, 1)['n_subjects']
    2
    """
    params = {'n_subjects': int(n_subjects), 'seed': int(seed),
              'max_rotation': float(max_rotation),
              'resolution': None if resolution is None else float(resolution),
              'keyprep_version': __version__}
    if rotations is not None:  # only then, so that earlier datasets stay current
        params['rotations'] = [float(r) for r in rotations]
    return params


def build_demo_dataset(out_dir: str | os.PathLike, n_subjects: int = 3, seed: int = 42,
                       max_rotation: float = 180.0, resolution: float | None = None,
                       rotations: Sequence[float] | None = None) -> Path:
    """Write the demo BIDS dataset (and its ground truth) to ``out_dir``.

    Parameters
    ----------
    out_dir
        Root of the BIDS dataset to write (created; files already there are overwritten).
    n_subjects
        Number of subjects (``sub-01``...); each is Colin27 moved differently.
    seed
        Seed of every random choice: the same seed gives the same dataset.
    max_rotation
        Largest rotation in degrees (the angle is uniform in ``[0, max_rotation]`` about
        an axis uniform on the sphere).
    resolution
        When given (mm), every subject's voxel sizes are multiplied by it, e.g. 3.0 for
        fast tests; by default the voxels are about 1 mm.
    rotations
        When given, subject ``i`` is rotated by exactly ``rotations[i]`` degrees (about a
        random axis) and there are ``len(rotations)`` subjects (``n_subjects`` is ignored):
        a rotation sweep with the same known-truth tables.

    Returns
    -------
    Path
        The dataset root. The ground truth is in ``<root>/derivatives/groundtruth``:
        ``sub-XX_atlas-AAL_dseg.nii.gz`` and ``sub-XX_desc-brain_mask.nii.gz`` on each
        subject's grid, and the ITK transforms ``sub-XX_from-colin27_to-T1w_mode-image_xfm.txt``
        (maps T1w points to Colin27 points: it resamples Colin27 onto the subject) and
        ``sub-XX_from-T1w_to-colin27_mode-image_xfm.txt`` (the inverse).
    """
    if rotations is not None:
        n_subjects = len(rotations)
    if n_subjects < 1:
        raise ValueError('n_subjects must be at least 1')
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    gt = root / 'derivatives' / 'groundtruth'
    params = demo_parameters(n_subjects, seed, max_rotation, resolution, rotations)
    marker = root / _PARAMS_FILE
    if marker.exists():
        marker.unlink()  # rewritten last: its presence means the dataset is complete

    head = nb.load(str(_colin('ch2.nii.gz')))
    brain = nb.load(str(_colin('ch2bet.nii.gz')))
    aal = nb.load(str(_colin('aal.nii.gz')))
    mask = nb.Nifti1Image((np.asanyarray(brain.dataobj) > 0).astype(np.uint8), brain.affine)
    center = pt.center_of_mass(head)
    head_points = pt.foreground_points(head, 0, step=2)

    _write_dataset_files(root, gt, n_subjects, params)
    rows = ['participant_id\tsource_image\trotation_deg\tscale']
    for index in range(n_subjects):
        sub = f'sub-{index + 1:02d}'
        rng = np.random.default_rng([int(seed), index])
        spec = _subject_grid_spec(index, rng)
        motion = pt.random_similarity(rng, max_rotation, 15.0, (0.92, 1.08), center=center,
                                      angle_deg=None if rotations is None
                                      else float(rotations[index]))
        xfm = pt.KnownTransform(motion)
        zooms = np.asarray(spec['voxel_size'], dtype=float) * (resolution or 1.0)
        oblique = (pt.rotation_about_axis(pt.random_axis(rng), spec['obliquity_deg'])
                   if spec['obliquity_deg'] else None)
        grid = pt.fitting_grid(xfm.push(head_points), zooms, rotation=oblique,
                               orientation=spec['orientation'], margin_mm=spec['margin_mm'])
        moved, (labels, brain_mask) = pt.apply_known_transform(head, xfm, grid,
                                                               labels=[aal, mask])
        data = moved.get_fdata(dtype=np.float32)
        # a mild intensity change: smooth bias, gamma, Rician noise; stored as uint8 like ch2
        bias_strength = float(rng.uniform(0.1, 0.2))
        gamma = float(np.exp(rng.uniform(-0.15, 0.15)))
        data = data * pt.bias_field(rng, grid.shape, grid.zooms, strength=bias_strength)
        data = pt.apply_gamma(data, gamma)
        noise = 0.01 * float(np.percentile(data[data > 0], 99)) if np.any(data > 0) else 0.0
        data = pt.add_noise(rng, data, noise)
        top = float(np.percentile(data, 99.95)) if data.max() > 0 else 1.0
        data = np.clip(np.rint(data * (240.0 / max(top, 1e-6))), 0, 255)

        anat = root / sub / 'anat'
        save_image(_int_image(data.astype(np.uint8), grid.affine), anat / f'{sub}_T1w.nii.gz')
        desc = pt.describe_similarity(motion, center)
        sidecar = {
            'SeriesDescription': 'Colin27 T1w moved by a known transform (keyprep demo)',
            'ImageComments': (
                f'Colin27 head rotated by {desc["angle_deg"]:.1f} deg, scaled by '
                f'{desc["scale"]:.3f}, translated by {np.linalg.norm(desc["translation_mm"]):.1f}'
                f' mm; resampled to {"x".join(f"{z:g}" for z in grid.zooms)} mm '
                f'{spec["orientation"]} voxels'
                f'{", oblique" if spec["obliquity_deg"] else ""}; intensity changed '
                f'(bias {bias_strength:.2f}, gamma {gamma:.2f}, noise). Ground truth in '
                'derivatives/groundtruth.'),
        }
        atomic_write_text(anat / f'{sub}_T1w.json', json.dumps(sidecar, indent=2) + '\n')

        gt_anat = gt / sub / 'anat'
        save_image(_int_image(np.asanyarray(labels.dataobj).astype(np.uint8), grid.affine),
                   gt_anat / f'{sub}_atlas-AAL_dseg.nii.gz')
        save_image(_int_image(np.asanyarray(brain_mask.dataobj).astype(np.uint8), grid.affine),
                   gt_anat / f'{sub}_desc-brain_mask.nii.gz')
        info = {
            'Motion': desc,
            'VoxelSize': [round(z, 4) for z in grid.zooms],
            'Orientation': spec['orientation'],
            'ObliquityDeg': spec['obliquity_deg'],
            'Shape': list(grid.shape),
            'BiasStrength': round(bias_strength, 4),
            'Gamma': round(gamma, 4),
            'NoiseSigma': round(noise, 4),
        }
        pull = xfm.write_itk(gt_anat / f'{sub}_from-{_SPACE}_to-T1w_mode-image_xfm.txt')
        push = xfm.write_itk(gt_anat / f'{sub}_from-T1w_to-{_SPACE}_mode-image_xfm.txt',
                             inverse=True)
        for path, what in ((pull, 'Colin27 onto this subject\'s T1w grid'),
                           (push, 'this subject\'s T1w onto the Colin27 grid')):
            meta = {'Description': f'Exact known transform (ITK affine, LPS): resamples {what} '
                                   'with ants.apply_transforms.', **info}
            atomic_write_text(path.with_name(path.name.replace('.txt', '.json')),
                              json.dumps(meta, indent=2) + '\n')
        rows.append(f'{sub}\tColin27 (ch2.nii.gz)\t{desc["angle_deg"]:.2f}\t{desc["scale"]:.4f}')
    atomic_write_text(root / 'participants.tsv', '\n'.join(rows) + '\n')
    atomic_write_text(marker, json.dumps(params, indent=2) + '\n')
    return root


def _int_image(data: np.ndarray, affine: np.ndarray) -> nb.Nifti1Image:
    img = make_image(data, affine)
    img.header['scl_slope'] = 1.0
    img.header['scl_inter'] = 0.0
    return img


def _write_dataset_files(root: Path, gt: Path, n_subjects: int, params: dict) -> None:
    license_text = ('BSD-3-Clause (Colin27 and AAL as distributed in the Debian package '
                    'mricron-data; see /usr/share/doc/mricron-data/copyright)')
    desc = {
        'Name': 'keyprep demo: Colin27 moved by known transforms',
        'BIDSVersion': '1.9.0',
        'DatasetType': 'raw',
        'License': license_text,
        'Authors': ['keyprep developers'],
        'ReferencesAndLinks': [
            'Holmes CJ et al. (1998) Enhancement of MR images using registration for signal '
            'averaging. J Comput Assist Tomogr 22(2):324-333 (Colin27)',
            'Tzourio-Mazoyer N et al. (2002) Automated anatomical labeling of activations in '
            'SPM. NeuroImage 15(1):273-289 (AAL)',
        ],
        'GeneratedBy': [{'Name': 'keyprep-demo', 'Version': __version__}],
    }
    atomic_write_text(root / 'dataset_description.json', json.dumps(desc, indent=2) + '\n')
    atomic_write_text(root / 'README', (
        'keyprep demo dataset\n====================\n\n'
        f'{n_subjects} subject(s). Every T1w image is the Colin27 head (one real person, 27 '
        'scans averaged; with its skull) moved by a known random rotation (up to '
        f'{params["max_rotation"]:g} degrees about a random axis), translation and scaling, '
        'resampled onto its own grid (different voxel sizes, anisotropic and oblique '
        'grids, different voxel orders) with a mild intensity change (smooth bias field, '
        'gamma, Rician noise). All subjects are the same person: this dataset exists to test '
        'registration, not to study anatomy.\n\n'
        'The ground truth (AAL labels and brain mask on each subject\'s grid, exact ITK '
        'transforms to and from Colin27) is in derivatives/groundtruth. Built by '
        '`keyprep-demo` (parameters in code/keyprep_demo.json).\n'))
    atomic_write_text(root / 'participants.json', json.dumps({
        'participant_id': {'Description': 'Participant label'},
        'source_image': {'Description': 'The real image that was moved to make this subject'},
        'rotation_deg': {'Description': 'Angle of the known rotation', 'Units': 'degree'},
        'scale': {'Description': 'Isotropic scale factor of the known transform'},
    }, indent=2) + '\n')

    gt_desc = {
        'Name': 'keyprep demo ground truth: labels and exact transforms',
        'BIDSVersion': '1.9.0',
        'DatasetType': 'derivative',
        'License': license_text,
        'GeneratedBy': [{'Name': 'keyprep-demo', 'Version': __version__,
                         'Description': 'Colin27 labels carried by the known transforms'}],
    }
    atomic_write_text(gt / 'dataset_description.json', json.dumps(gt_desc, indent=2) + '\n')
    atomic_write_text(gt / 'README', (
        'Ground truth of the keyprep demo dataset.\n\n'
        '* sub-XX_atlas-AAL_dseg.nii.gz: AAL (116 regions) carried onto the subject\'s T1w '
        'grid by the known transform (nearest neighbour); names in atlas-AAL_dseg.tsv.\n'
        '* sub-XX_desc-brain_mask.nii.gz: the Colin27 brain (ch2bet) mask, carried likewise.\n'
        '* sub-XX_from-colin27_to-T1w_mode-image_xfm.txt: ITK affine (LPS) mapping T1w points '
        'to Colin27 points; ants.apply_transforms(fixed=T1w, moving=colin27, [this]) '
        'resamples Colin27 onto the subject.\n'
        '* sub-XX_from-T1w_to-colin27_mode-image_xfm.txt: the inverse.\n'))
    names = ['index\tname']
    for line in _colin('aal.nii.txt').read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            names.append(f'{int(parts[0])}\t{parts[1]}')
    atomic_write_text(gt / 'atlas-AAL_dseg.tsv', '\n'.join(names) + '\n')


def _dataset_is_current(bids_dir: Path, params: dict) -> bool:
    marker = bids_dir / _PARAMS_FILE
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()) == params
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


#: The demo's panel: the ANTs baselines, which fail beyond about 60 degrees of rotation, and
#: keymorphAffine, whose pose search registers any starting orientation (learned engines are
#: added here once their model cards show them validated).
DEMO_METHODS = ('antsRigid', 'antsAffine', 'antsSyN', 'keymorphAffine')


def groundtruth_errors(bids_dir: str | os.PathLike, deriv_dir: str | os.PathLike, *,
                       space: str = _SPACE, step: int = 2,
                       work_dir: str | os.PathLike | None = None):
    """Each engine's error against the known truth, for a demo run registered to Colin27.

    For every subject of the demo dataset and every forward transform keyprep wrote
    (``sub-XX_from-T1w_to-<space>_mode-image_desc-<method>_xfm.{txt,nii.gz}``), the
    transform and the true one (``derivatives/groundtruth``) map the points of the Colin27
    brain (``ch2bet``, every ``step``-th voxel) to the subject; the distance between the two
    images of each point is the error (mm, mean, median, 99th percentile, maximum). The
    subject's true AAL labels are carried onto Colin27 by the transform (nearest neighbour)
    and compared with Colin27's AAL labels (mean and lowest Dice over the 116 regions), and
    its true brain mask with Colin27's (``brain_mask_dice``). A row ``truth`` does
    the same with the true transform: 0 mm, and the Dice that resampling allows.

    Returns
    -------
    pandas.DataFrame
        One row per subject and method (``participant_id, method, transform, rotation_deg,
        error_mean_mm, error_median_mm, error_p99_mm, error_max_mm, aal_dice_mean,
        aal_dice_min, brain_mask_dice, n_points``); empty when keyprep wrote no transform to
        ``space``.
    """
    import tempfile

    import pandas as pd

    from ..pipeline import truth

    bids_dir, deriv_dir = Path(bids_dir), Path(deriv_dir)
    gt = bids_dir / 'derivatives' / 'groundtruth'
    points = truth.mask_points(_colin('ch2bet.nii.gz'), step=step)
    aal = _colin('aal.nii.gz')
    rows = []
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        # Colin27's brain mask (ch2bet > 0), the reference of the brain-mask overlap
        bet = nb.load(str(_colin('ch2bet.nii.gz')))
        colin_mask = Path(tmp) / 'colin27_brain_mask.nii.gz'
        _int_image((np.asanyarray(bet.dataobj) > 0).astype(np.uint8),
                   bet.affine).to_filename(colin_mask)
        for gt_anat in sorted(gt.glob('sub-*/anat')):
            rows += _truth_rows(gt_anat, deriv_dir, space, points, aal, colin_mask, tmp)
    df = pd.DataFrame(rows)
    if not df.empty:  # the truth first, then the engines in the order of the registry
        from .reports import _sort_methods

        df = _sort_methods(df, ['truth']).reset_index(drop=True)
    return df


def _truth_rows(gt_anat: Path, deriv_dir: Path, space: str, points, aal: Path,
                colin_mask: Path, tmp: str) -> list[dict]:
    """The rows of :func:`groundtruth_errors` for one subject."""
    from ..pipeline import truth

    sub = gt_anat.parent.name
    true_xfm = gt_anat / f'{sub}_from-T1w_to-{space}_mode-image_xfm.txt'
    labels = gt_anat / f'{sub}_atlas-AAL_dseg.nii.gz'
    mask = gt_anat / f'{sub}_desc-brain_mask.nii.gz'
    if not true_xfm.is_file():
        return []
    meta = json.loads(true_xfm.with_suffix('.json').read_text())
    angle = meta.get('Motion', {}).get('angle_deg')
    found = sorted((deriv_dir / sub / 'anat').glob(
        f'{sub}_from-T1w_to-{space}_mode-image_desc-*_xfm.*'))
    xfms = [('truth', true_xfm)] + [
        (f.name.split('_desc-')[1].split('_xfm')[0], f) for f in found
        if f.name.endswith(('.txt', '.nii.gz'))]
    if len(xfms) == 1:
        return []
    rows = []
    for method, xfm in xfms:
        err = truth.point_errors(xfm, true_xfm, points)
        dice_mean, dice_min, _ = truth.label_dice(labels, xfm, aal, tmp)
        mask_dice = (truth.label_dice(mask, xfm, colin_mask, tmp)[0] if mask.is_file()
                     else float('nan'))
        rows.append({'participant_id': sub, 'method': method,
                     'transform': 'linear' if xfm.name.endswith('.txt') else 'deformable',
                     'rotation_deg': angle, **{k: v for k, v in err.items()
                                               if k != 'n_points'},
                     'aal_dice_mean': dice_mean, 'aal_dice_min': dice_min,
                     'brain_mask_dice': mask_dice, 'n_points': err['n_points']})
    return rows


def write_groundtruth_errors(bids_dir: str | os.PathLike, deriv_dir: str | os.PathLike,
                             **kwargs) -> Path | None:
    """Write :func:`groundtruth_errors` as ``<deriv_dir>/demo_desc-groundtruth_qc.tsv``
    (with a JSON sidecar); ``None`` when there is nothing to compare."""
    df = groundtruth_errors(bids_dir, deriv_dir, **kwargs)
    if df.empty:
        return None
    out = Path(deriv_dir) / TRUTH_TABLE
    atomic_write_text(out, df.to_csv(sep='\t', index=False, float_format='%.4f',
                                     na_rep='n/a'))
    sidecar = {
        'Description': 'keyprep-demo: each engine\'s forward transform against the known true '
                       'transform (derivatives/groundtruth of the demo dataset)',
        'error_mean_mm': {'Description': 'mean distance between the points of the Colin27 '
                                         'brain mapped by the engine\'s transform and by the '
                                         'true one', 'Units': 'mm'},
        'error_median_mm': {'Description': 'median of that distance', 'Units': 'mm'},
        'error_p99_mm': {'Description': '99th percentile of that distance', 'Units': 'mm'},
        'error_max_mm': {'Description': 'largest distance', 'Units': 'mm'},
        'aal_dice_mean': {'Description': 'mean Dice over the AAL regions between the subject\'s '
                                         'true AAL labels carried onto Colin27 by the '
                                         'transform and Colin27\'s AAL labels'},
        'aal_dice_min': {'Description': 'lowest Dice over the AAL regions'},
        'brain_mask_dice': {'Description': 'Dice between the subject\'s true brain mask carried '
                                           'onto Colin27 by the transform (nearest neighbour) '
                                           'and Colin27\'s brain mask (ch2bet)'},
        'rotation_deg': {'Description': 'angle of the true rotation of the subject',
                         'Units': 'degree'},
        'n_points': {'Description': 'points of the Colin27 brain compared'},
    }
    atomic_write_text(out.with_suffix('.json'), json.dumps(sidecar, indent=2) + '\n')
    return out


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='keyprep-demo',
        description='Build a small BIDS dataset from Colin27 moved by known random transforms '
                    '(ground truth in bids/derivatives/groundtruth), run keyprep on it '
                    '(participant and group levels; target: Colin27 itself by default), '
                    'compare every engine with the known transforms (table '
                    f'derivatives/keyprep/{TRUTH_TABLE}, shown in the reports) and print '
                    'where the reports are.')
    parser.add_argument('--out', type=Path, default=Path('keyprep-demo'), metavar='DIR',
                        help='folder for bids/, derivatives/keyprep/ and work/ '
                             '(default: ./keyprep-demo)')
    parser.add_argument('--n-subjects', type=int, default=3, metavar='N',
                        help='number of subjects (default: 3)')
    parser.add_argument('--nprocs', type=int, default=os.cpu_count() or 1, metavar='N',
                        help='processes for keyprep (default: all cores)')
    parser.add_argument('--quick', action='store_true',
                        help='2 mm grids, --sloppy and the target at 2 mm (:res-2): a quick '
                             'look, not a result')
    parser.add_argument('--seed', type=int, default=42, help='seed of the dataset (default: 42)')
    parser.add_argument('--max-rotation', type=float, default=180.0, metavar='DEG',
                        help='largest rotation of a subject, in degrees (default: 180, any '
                             'pose: with the default seed the three heads are rotated by 126, '
                             '114 and 58 degrees, beyond what ANTs recovers from its '
                             'centre-of-mass start for the first two)')
    parser.add_argument('--rotations', type=float, nargs='+', default=None, metavar='DEG',
                        help='exact rotation of each subject in degrees, about a random axis '
                             '(one subject per value; replaces --n-subjects and '
                             '--max-rotation): a rotation sweep, e.g. --rotations 0 30 60 90 '
                             '120 150 180')
    parser.add_argument('--target', choices=('colin27', 'MNI152NLin2009aSym'),
                        default='colin27',
                        help='colin27 (default): the unmoved Colin27 head, so that every '
                             'registration has a known exact answer and the reports show each '
                             'engine\'s error against it; MNI152NLin2009aSym: the ICBM 2009a '
                             'template (a real inter-subject registration, no exact answer)')
    parser.add_argument('--methods', nargs='+', default=list(DEMO_METHODS), metavar='METHOD',
                        help='engines to run (default: ' + ' '.join(DEMO_METHODS) + ': the '
                             'ANTs baselines next to keyprep\'s pose-robust keymorphAffine)')
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console script ``keyprep-demo``; returns (and exits with) keyprep's exit code."""
    opts = _build_parser().parse_args(argv)
    if opts.n_subjects < 1 or opts.nprocs < 1:
        print('keyprep-demo: --n-subjects and --nprocs must be at least 1', file=sys.stderr)
        return _exit(64, argv)
    out = opts.out.expanduser().resolve()
    bids_dir, deriv, work = out / 'bids', out / 'derivatives' / 'keyprep', out / 'work'
    resolution = 2.0 if opts.quick else None
    if opts.rotations is not None:
        opts.n_subjects = len(opts.rotations)
    params = demo_parameters(opts.n_subjects, opts.seed, opts.max_rotation, resolution,
                             opts.rotations)
    if _dataset_is_current(bids_dir, params):
        print(f'keyprep-demo: reusing the dataset in {bids_dir}')
    else:
        if bids_dir.exists() and any(bids_dir.iterdir()):
            if not (bids_dir / _PARAMS_FILE).exists() and not (
                    bids_dir / 'derivatives' / 'groundtruth').exists():
                print(f'keyprep-demo: {bids_dir} exists and was not made by keyprep-demo; '
                      'choose another --out', file=sys.stderr)
                return _exit(64, argv)
            shutil.rmtree(bids_dir)
        print(f'keyprep-demo: building {opts.n_subjects} subject(s) in {bids_dir} ...')
        build_demo_dataset(bids_dir, opts.n_subjects, opts.seed, opts.max_rotation, resolution,
                           opts.rotations)

    from .run import run

    common = ['-w', str(work), '--nprocs', str(opts.nprocs), '--methods', *opts.methods]
    if opts.target == 'colin27':  # the source of every subject: the truth is known
        target = out / 'target' / f'{_SPACE}.nii.gz'
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_colin('ch2.nii.gz'), target)
        target_arg = str(target)
    else:
        target_arg = opts.target
    common += ['--target', target_arg + (':res-2' if opts.quick else '')]
    if opts.quick:
        common += ['--sloppy']
    print('keyprep-demo: running keyprep (participant level) ...')
    code = run([str(bids_dir), str(deriv), 'participant', *common])
    print(f'keyprep-demo: participant level finished with exit code {code}')
    if opts.target == 'colin27':
        _report_truth(bids_dir, deriv, work, opts.methods)
    group_code = run([str(bids_dir), str(deriv), 'group', *common])
    print(f'keyprep-demo: group level finished with exit code {group_code}')
    code = code or group_code
    reports = sorted(deriv.glob('sub-*.html'))
    for report in reports:
        print(f'  subject report: {report}')
    if (deriv / 'group.html').exists():
        print(f'  group report:   {deriv / "group.html"}')
    if not reports:
        print(f'  no report was written in {deriv}')
    print(f'  ground truth:   {bids_dir / "derivatives" / "groundtruth"}')
    return _exit(code, argv)


def _report_truth(bids_dir: Path, deriv: Path, work: Path, methods: list[str]) -> None:
    """Errors against the truth: the table, a summary on stdout, the reports rebuilt."""
    from .reports import method_order, render_participant_report

    print('keyprep-demo: comparing every engine with the known transforms ...')
    work.mkdir(parents=True, exist_ok=True)
    try:
        table = write_groundtruth_errors(bids_dir, deriv, work_dir=work)
    except Exception as exc:  # the run's own result stands; say why the comparison failed
        print(f'keyprep-demo: could not compare with the truth: {exc}', file=sys.stderr)
        return
    if table is None:
        print('keyprep-demo: no transform to compare with the truth')
        return
    import pandas as pd

    df = pd.read_csv(table, sep='\t')
    summary = df.groupby('method', sort=False)[['error_mean_mm', 'error_p99_mm',
                                                'aal_dice_mean']].mean()
    summary = summary.loc[method_order(summary.index, ['truth', *methods])]
    print(f'  errors against the truth ({table.name}; mean over subjects):')
    for method, r in summary.iterrows():
        print(f'    {method:<22} {r["error_mean_mm"]:8.2f} mm mean  {r["error_p99_mm"]:8.2f} mm '
              f'p99   AAL Dice {r["aal_dice_mean"]:.3f}')
    for sub in sorted(df['participant_id'].unique()):
        if (deriv / f'{sub}.html').exists():
            render_participant_report(deriv, sub[4:])


def _exit(code: int, argv: list[str] | None) -> int:
    """Exit with ``code`` when run as the console script; return it when called."""
    if argv is None:
        sys.exit(code)
    return code


if __name__ == '__main__':  # pragma: no cover
    main()
