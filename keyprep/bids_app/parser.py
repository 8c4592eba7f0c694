"""Command-line parser in the BIDS Apps convention, with NiPreps spellings."""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

from .. import __version__
from ..pipeline.errors import EXIT_CODES, EXIT_UNKNOWN_LEVEL, EXIT_USAGE, KeyprepError

__all__ = ['build_parser', 'check_paths', 'engine_params', 'parse_args', 'parse_mem']

ANALYSIS_LEVELS = ('participant', 'group')


class _Parser(argparse.ArgumentParser):
    """argparse with the documented usage exit code (64) instead of 2."""

    def error(self, message):  # noqa: D102
        self.print_usage()
        self.exit(EXIT_USAGE, f'keyprep: error: {message}\n')


def parse_mem(value: str) -> float:
    """Memory in GB from ``--mem``: a number of MB, or with a unit suffix.

    >>> parse_mem('8000'), parse_mem('16G'), parse_mem('1.5T'), parse_mem('512M')
    (7.8125, 16.0, 1536.0, 0.5)
    """
    m = re.fullmatch(r'\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)B?\s*', str(value), flags=re.I)
    if not m:
        raise argparse.ArgumentTypeError(f'invalid memory value {value!r} (e.g. 8000, 16G)')
    num, unit = float(m.group(1)), (m.group(2) or 'M').upper()
    gb = num * {'K': 2**-20, 'M': 2**-10, 'G': 1.0, 'T': 1024.0}[unit]
    if gb <= 0:
        raise argparse.ArgumentTypeError('memory must be positive')
    return gb


def _positive_int(value: str) -> int:
    try:
        out = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{value!r} is not an integer') from None
    if out < 1:
        raise argparse.ArgumentTypeError(f'{value!r} must be 1 or more')
    return out


def _non_negative_int(value: str) -> int:
    try:
        out = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{value!r} is not an integer') from None
    if out < 0:
        raise argparse.ArgumentTypeError(f'{value!r} must be 0 or more')
    return out


def _non_negative_float(value: str) -> float:
    try:
        out = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{value!r} is not a number') from None
    if not out >= 0 or out == float('inf'):
        raise argparse.ArgumentTypeError(f'{value!r} must be a finite number >= 0')
    return out


def _odd_window(value: str) -> int:
    try:
        out = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{value!r} is not a whole number') from None
    if out < 3 or out % 2 == 0:
        raise argparse.ArgumentTypeError(f'{value!r} must be an odd number >= 3')
    return out


def _positive_float(value: str) -> float:
    out = _non_negative_float(value)
    if out == 0:
        raise argparse.ArgumentTypeError(f'{value!r} must be a finite number > 0')
    return out


def _auto_or_non_negative_float(value: str) -> 'float | str':
    if str(value).strip().lower() == 'auto':
        return 'auto'
    return _non_negative_float(value)


def _label_list(prefix: str):
    def strip(value: str) -> str:
        value = value.strip()
        if value.startswith(prefix):
            value = value[len(prefix):]
        if not re.fullmatch(r'[A-Za-z0-9]+', value):
            raise argparse.ArgumentTypeError(f'{value!r} is not a valid BIDS label')
        return value

    return strip


def _exit_codes_epilog() -> str:
    lines = ['exit codes:']
    lines += [f'  {code:<4} {text}' for code, text in EXIT_CODES.items()]
    return '\n'.join(lines)


def _add_contrast_transfer(group, family: str, before: str, default: str) -> None:
    """``--<family>-contrast-transfer`` (:mod:`keyprep.pipeline.contrast`)."""
    group.add_argument(f'--{family}-contrast-transfer', choices=('auto', 'moving', 'both', 'off'),
                       default=None,
                       help=f're-render images from their structure labels before {before}, '
                            'each structure painted with the target\'s median intensity in it '
                            '(keyprep\'s addition, not the paper\'s): moving (the image), both '
                            '(image and target), auto (both, across contrasts), off; default: '
                            f'{default} (benchmarks/results/contrast-transfer/)')


def build_parser() -> argparse.ArgumentParser:
    """The ``keyprep`` argument parser."""
    from ..pipeline.engines import DEFAULT_METHODS, available_engines, learned_models

    engines = available_engines()
    parser = _Parser(
        prog='keyprep',
        description=(f'keyprep {__version__}: skull stripping, anatomical labels and brain MRI '
                     'registration with a panel of engines, BIDS-Derivatives outputs, '
                     'Dice/Jacobian QC tables and HTML reports.'),
        epilog=_exit_codes_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Arguments as specified by BIDS-Apps: they must go directly with the parser object.
    parser.add_argument('bids_dir', type=Path, help='the root folder of a BIDS dataset')
    parser.add_argument('output_dir', type=Path,
                        help='the output folder (a BIDS-Derivatives dataset); for the group '
                             'level, the folder the participant level wrote')
    parser.add_argument('analysis_level', metavar='{participant,group}',
                        help='participant: process subjects; group: merge their QC tables')

    g = parser.add_argument_group('BIDS filtering')
    g.add_argument('--participant-label', '--participant_label', nargs='+', default=None,
                   type=_label_list('sub-'), metavar='LABEL',
                   help='participants to process (the sub- prefix may be omitted); '
                        'default: all')
    g.add_argument('--session-label', '--session_label', nargs='+', default=None,
                   type=_label_list('ses-'), metavar='LABEL',
                   help='sessions to process (the ses- prefix may be omitted); default: all')
    g.add_argument('--bids-filter-file', type=Path, metavar='FILE',
                   help='JSON file of pybids queries, e.g. {"t1w": {"acquisition": "mprage"}}; '
                        'keys: t1w, t2w, pdw, flair')
    g.add_argument('--skip-bids-validation', '--skip_bids_validation', action='store_true',
                   help='do not run the official BIDS validator (bids-validator-deno) on '
                        'the input dataset (its sub-<label> folders are still required)')
    g.add_argument('--bids-database-dir', type=Path, metavar='DIR',
                   help='pybids database folder (default: <work-dir>/bids_db)')

    g = parser.add_argument_group('Performance')
    g.add_argument('--nprocs', '--nthreads', '--n_cpus', '--n-cpus', type=_positive_int,
                   default=None, metavar='N',
                   help='maximum number of processes (default: all CPUs)')
    g.add_argument('--omp-nthreads', type=_positive_int, default=None, metavar='N',
                   help='threads per process (ANTs, torch); default: min(nprocs, 8)')
    g.add_argument('--mem', '--mem-mb', '--mem_mb', type=parse_mem, default=None,
                   metavar='MEM', help='memory limit: MB, or with a unit (16G)')
    g.add_argument('--device', choices=('auto', 'cpu', 'cuda'), default='auto',
                   help='torch device for learned engines, skull stripping and the label '
                        'network')
    g.add_argument('--use-plugin', '--nipype-plugin-file', type=Path, metavar='FILE',
                   help='Nipype plugin and its arguments from a YAML/JSON file, e.g. '
                        '{plugin: SLURM, plugin_args: {sbatch_args: "-p short -t 1:00:00"}} '
                        '(default: MultiProc with --nprocs); see docs/hpc.md')

    g = parser.add_argument_group('Workflow')
    g.add_argument('--methods', nargs='+', default=list(DEFAULT_METHODS), metavar='METHOD',
                   help='registration engines to run, or "all"; available: '
                        + ', '.join(engines) + '; default: ' + ' '.join(DEFAULT_METHODS))
    g.add_argument('--target', default='MNI152NLin2009aSym', metavar='TARGET',
                   help='registration target: a bundled template (MNI152NLin2009aSym, '
                        'optionally :res-N for N mm), a NIfTI file, sub-<label> to '
                        'register every other subject to that one, or groupwise '
                        '(optionally groupwise:res-N, default 1 mm) to build a keypoint-mean '
                        'template of the selected participants (KeyMorph keypoints aligned '
                        'by generalised Procrustes, the brains averaged on the mean keypoint '
                        'cloud; written to tpl-keyprepGroupwise/) and register each one to it')
    g.add_argument('--skull-strip', choices=('auto', 'force', 'skip', 'synth'), default='auto',
                   help='auto: strip unless the image is already brain-only (a large exact '
                        'background and a brain-sized foreground: its mask is then that '
                        'foreground); force: always strip; skip: never (every image is taken '
                        'as brain-only and masked by its foreground); synth: as auto, but an '
                        "image with a head is masked with the label network's brain mask "
                        'instead of deepbet (same as auto with --skull-strip-method synth). '
                        'The target is prepared in auto mode with the same method.')
    g.add_argument('--skull-strip-method', choices=('deepbet', 'synth'), default=None,
                   help='how an image with a head is stripped under auto or force: deepbet '
                        "(default) or synth (the label network's brain mask: the union of its "
                        '32 structures, extra-cerebral CSF included)')
    g.add_argument('--random-seed', type=int, default=0, metavar='SEED',
                   help='seed for every random number generator (recorded in QC tables)')
    g.add_argument('--sloppy', action='store_true',
                   help='shorter optimisation schedules, and no left/right test-time '
                        'augmentation in the label network: for testing only')

    g = parser.add_argument_group(
        'KeyMorph engines',
        'Options of keymorphRigid, keymorphAffine and keymorphTPS (learned keypoints and '
        'closed-form fits; run them with --methods all or by name) and of --target groupwise.')
    g.add_argument('--keymorph-lambdas', nargs='+', type=_non_negative_float, default=None,
                   metavar='LAMBDA',
                   help='thin-plate-spline regularisation weights of keymorphTPS, in the '
                        "paper's normalised frame (0 interpolates the keypoints, which with the "
                        'default ~31 structure centroids distorts the brain between them; 10 is '
                        'close to affine); default 1. Several values give one result per value from '
                        'ONE keypoint detection, each written as its own method '
                        'keymorphTPSlam<value> (0.1 -> lam0p1) with its own derivatives, QC '
                        'rows and figures, and a figure of all of them side by side')
    g.add_argument('--keymorph-refine', choices=('none', 'affine', 'deformable'),
                   default='none',
                   help='test-time refinement by image similarity (LNCC for the same '
                        'contrast, MIND otherwise) on a 2 mm grid, starting from the '
                        'keypoint solution: affine refines keymorphRigid (staying rigid) and '
                        'keymorphAffine; deformable also refines keymorphTPS with a smooth '
                        'diffeomorphic correction (stationary velocity field). Refined '
                        'results are ADDED as methods <method>Refined (e.g. '
                        'keymorphAffineRefined), next to the unrefined ones, which keep '
                        'their names; default: none')
    g.add_argument('--keymorph-refine-steps', type=_positive_int, default=None, metavar='N',
                   help='optimisation steps of the refinement (default 40 for the linear '
                        'corrections, 20 for the deformable one; 8 with --sloppy)')
    g.add_argument('--ants-preset', choices=('synquick', 'syn', 'antspy'), default=None,
                   help='recipe of the ANTs baselines: synquick (default) runs '
                        'antsRegistrationSyNQuick.sh\'s rigid/affine/SyN stage lists (rigid, '
                        'then affine, then SyN, Mattes MI), as ANTs\' authors recommend; syn the '
                        'full antsRegistrationSyN.sh recipes (slower); antspy ANTsPy\'s '
                        'one-stage Rigid/Affine/SyN presets with keyprep\'s earlier schedule')
    g.add_argument('--ants-metric-masks', action='store_true', default=None,
                   help='pass the brain masks to the ANTs similarity metric (off by default: '
                        'on Colin27 moved by known rotations the masked metric failed from 30 '
                        'degrees, the unmasked one up to 90)')
    g.add_argument('--keymorph-pose-search', choices=('labels', 'cube', 'none'), default=None,
                   help='labels (default): take the head\'s pose from the label network\'s '
                        'structure labels of both images (a similarity fit to their centroids; '
                        'one detection per image), or the cube search when that fit is '
                        'implausible; cube: detect the moving keypoints in the 24 cube '
                        'orientations of the detector grid and keep the fit of highest '
                        'mutual information, so any starting orientation registers; none: '
                        'the axis-aligned grid only (one forward pass, faster; fails beyond '
                        'the detector\'s trained rotation range of about 45 degrees)')
    g.add_argument('--keymorph-keypoint-source', choices=('detector', 'labels', 'both'),
                   default=None,
                   help='corresponding points of the KeyMorph fits: labels (default) the '
                        'centroids of the structures that keyprep\'s label network labelled in '
                        'both images (the learned detector is not run); detector the learned '
                        'keypoints only (the papers\' KeyMorph); both the two sets, each with '
                        'half of the weight. Without usable label maps (missing, or a centroid '
                        'fit that is implausible) the learned keypoints alone are used, and '
                        'the sidecar says why')
    g.add_argument('--keymorph-keypoints', type=_positive_int, default=None, metavar='N',
                   help='use only N of the model\'s keypoints (at least 4), spread over the '
                        'brain by farthest-point sampling of the target\'s keypoints; '
                        'default: all')

    g = parser.add_argument_group('DIO engines', 'Options of dio, dioDiffeo and dioAffine.')
    g.add_argument('--dio-label-weight', type=_auto_or_non_negative_float, default=None,
                   metavar='LAMBDA|auto',
                   help='label prompting: add a label-fidelity term to the solver\'s feature '
                        'loss, on the structure labels keyprep\'s label network gives both '
                        'images, with LAMBDA times the features\' energy (1 weighs them alike; '
                        '0: features only); default auto: 16 across contrasts, none for images '
                        'of one contrast while the image term is on (1 with --dio-image-weight '
                        '0) (benchmarks/results/dio-label-prompt/, dio-image-prompt/)')
    g.add_argument('--dio-image-weight', type=_non_negative_float, default=None, metavar='MU',
                   help='image prompting: add the images\' own local squared normalised '
                        'cross-correlation to the solver\'s objective with weight MU (1 weighs '
                        'a perfect local correlation like a perfect feature match; 0: DIO\'s '
                        'features alone); default 4 (benchmarks/results/dio-image-prompt/)')
    g.add_argument('--dio-image-window', type=_odd_window, default=None, metavar='VOXELS',
                   help='box window of the image term, in voxels of DIO\'s working grid '
                        '(2 mm for the shipped model); odd, at least 3; default 5')
    _add_contrast_transfer(g, 'dio', 'the feature network', 'off')

    g = parser.add_argument_group('CARL engines', 'Options of carl and carlIO.')
    g.add_argument('--carl-io-steps', type=_non_negative_int, default=None, metavar='N',
                   help='steps of the paper\'s instance optimisation of carlIO (Adam on a '
                        'copy of the network\'s weights; default 0: carlIO uses keyprep\'s '
                        'field-space IO, --carl-field-steps, measured better and faster; 5 '
                        'measured; the paper\'s is 50). On a CPU thread each step at 1 mm '
                        'takes 5-15 s (benchmarks/results/carl-io/, carl-field-io/)')
    g.add_argument('--carl-io-lr', type=_positive_float, default=None, metavar='LR',
                   help='Adam learning rate of carlIO\'s instance optimisation (default '
                        '0.0005 / N: 1e-4 for 5 steps, measured 0.8 Dice points '
                        'above 5e-4 and about 5 above the paper\'s 2e-5 at 5 steps; the paper: '
                        '2e-5 for 50 steps; benchmarks/results/carl-io-lr/)')
    g.add_argument('--carl-io-train', choices=('all', 'refine'), default=None,
                   help='weights carlIO adapts: refine (default: the refinement networks '
                        'only; 0.3 Dice points below all on 8 held-out 1 mm pairs in about '
                        '0.6 of the time; benchmarks/results/carl-io-lr/) or all (the '
                        'paper\'s)')
    g.add_argument('--carl-label-weight', type=_non_negative_float, default=None,
                   metavar='LAMBDA',
                   help='label prompting of carlIO: weight of the soft Dice of the structure '
                        'labels keyprep\'s label network gives both images, added to '
                        'instance optimisation\'s loss (default 1; 0: image similarity only)')
    g.add_argument('--carl-symmetric', choices=('on', 'off'), default=None,
                   help='export the average of the network\'s forward field and the inverse '
                        'of its backward field, with its inverse (keyprep\'s, not the '
                        'paper\'s; default on: it removes the shipped network\'s bias of 1-2 voxels '
                        'on an image registered to itself and raised AAL Dice on two real '
                        'known-truth heads by 2-13 points; keyprep/models/carl/MODEL_CARD.md)')
    g.add_argument('--carl-passes', type=_positive_int, default=None, metavar='N',
                   help='network passes of carl and carlIO: each further pass registers the '
                        'moving image warped by the fields so far, and the fields compose '
                        '(keyprep\'s cascade, not the paper\'s; default 1)')
    g.add_argument('--carl-field-steps', type=_non_negative_int, default=None, metavar='N',
                   help='carlIO\'s field-space instance optimisation, after the paper\'s '
                        'weight-space one: Adam steps on a smooth correction of the two '
                        'fields themselves, on the same loss (keyprep\'s, not the paper\'s; '
                        'default 20, about 1 s each at 1 mm on a CPU thread; 0: the paper\'s '
                        'IO alone, and 0 for both: carl only; benchmarks/results/carl-field-io/)')
    g.add_argument('--carl-field-label-weight', type=_non_negative_float, default=None,
                   metavar='LAMBDA',
                   help='weight of the structure labels\' soft Dice in carlIO\'s field-space '
                        'instance optimisation (default 0: image similarity and GradICON only)')
    _add_contrast_transfer(g, 'carl', 'registration', 'auto')

    g = parser.add_argument_group(
        "Learned models' weights",
        'Each learned engine family reads its weights from keyprep/models/<family>/ (shipped '
        'with a model card) unless a file is given here; every file is checked at start-up '
        '(exit 66 if missing, 65 if unreadable or for another model) and its SHA-256 is '
        'recorded in the sidecars and decides whether cached results are reused.')
    for model in learned_models().values():
        g.add_argument(model.option, type=Path, default=None, metavar='FILE',
                       help=f'{model.title} weights file (e.g. exported by keyprep train '
                            f'{model.name} --export); default: the model shipped in '
                            f'keyprep/models/{model.name}/')

    starting = {n: c for n, c in engines.items() if c.default_init is not None}
    if starting:
        g = parser.add_argument_group(
            'Starting affine',
            "Engines that register after another engine's affine (the starting engine is run "
            'too, and the chain is recorded in the sidecars and the QC tables)')
        for name, cls in starting.items():
            g.add_argument(f'--{name.lower()}-init', default=None, metavar='METHOD',
                           help=f'method whose forward affine {name} starts from, or none; '
                                f'default: {cls.default_init or "none"}')

    g = parser.add_argument_group('Subsets and other options')
    g.add_argument('-w', '--work-dir', type=Path, default=Path('work'),
                   help='work folder; rerunning with the same one resumes (default: ./work)')
    g.add_argument('--reports-only', action='store_true',
                   help='only rebuild the HTML reports from existing outputs')
    g.add_argument('--boilerplate-only', '--boilerplate_only', action='store_true',
                   help='build the workflow, write the citation boilerplate and exit')
    g.add_argument('--stop-on-first-crash', action='store_true',
                   help='stop at the first failed node instead of running the rest')
    g.add_argument('--write-graph', action='store_true', help='write the workflow graph')
    g.add_argument('-v', '--verbose', dest='verbose_count', action='count', default=0,
                   help='-v: also one line per workflow node that ran (name and time); '
                        "-vv: also Nipype's own log")
    g.add_argument('--version', action='version', version=f'keyprep v{__version__}')
    return parser


def engine_params(opts: argparse.Namespace) -> dict[str, dict]:
    """Engine name -> engine-specific parameters from the command line (the ``--keymorph-*``
    options for every KeyMorph engine, ``--ants-*`` for every ANTs engine; only options
    that were given)."""
    from ..pipeline.engines import available_engines

    common = {}
    if getattr(opts, 'keymorph_refine', 'none') != 'none':
        common['refine'] = opts.keymorph_refine
    if getattr(opts, 'keymorph_refine_steps', None):
        common['refine_steps'] = int(opts.keymorph_refine_steps)
    if getattr(opts, 'keymorph_pose_search', None):
        common['pose_search'] = opts.keymorph_pose_search
    if getattr(opts, 'keymorph_keypoint_source', None):
        common['keypoint_source'] = opts.keymorph_keypoint_source
    if getattr(opts, 'keymorph_keypoints', None):
        common['n_keypoints'] = int(opts.keymorph_keypoints)
    out = {}
    for name, cls in available_engines().items():
        weights = getattr(opts, f'{cls.model}_weights', None) if cls.model else None
        if weights:
            out[name] = {'weights': str(Path(weights).expanduser().absolute())}
        init = getattr(opts, f'{name.lower()}_init', None)  # engines starting from an affine
        if init:
            out.setdefault(name, {})['init'] = init
        if cls.family == 'dio' and getattr(opts, 'dio_label_weight', None) is not None:
            out.setdefault(name, {})['label_weight'] = opts.dio_label_weight
        if cls.family == 'dio' and getattr(opts, 'dio_image_weight', None) is not None:
            out.setdefault(name, {})['image_weight'] = float(opts.dio_image_weight)
        if cls.family == 'dio' and getattr(opts, 'dio_image_window', None) is not None:
            out.setdefault(name, {})['image_window'] = int(opts.dio_image_window)
        transfer = getattr(opts, f'{cls.family}_contrast_transfer', None)
        if cls.family in ('dio', 'carl') and transfer is not None:
            out.setdefault(name, {})['contrast_transfer'] = transfer
        if cls.family == 'carl':
            if getattr(opts, 'carl_io_steps', None) is not None:
                out.setdefault(name, {})['io_steps'] = int(opts.carl_io_steps)
            if getattr(opts, 'carl_io_train', None) is not None:
                out.setdefault(name, {})['io_train'] = opts.carl_io_train
            if getattr(opts, 'carl_io_lr', None) is not None:
                out.setdefault(name, {})['io_lr'] = float(opts.carl_io_lr)
            if getattr(opts, 'carl_label_weight', None) is not None:
                out.setdefault(name, {})['label_weight'] = float(opts.carl_label_weight)
            if getattr(opts, 'carl_passes', None) is not None:
                out.setdefault(name, {})['passes'] = int(opts.carl_passes)
            if getattr(opts, 'carl_field_steps', None) is not None:
                out.setdefault(name, {})['field_steps'] = int(opts.carl_field_steps)
            if getattr(opts, 'carl_field_label_weight', None) is not None:
                out.setdefault(name, {})['field_label_weight'] = float(
                    opts.carl_field_label_weight)
            if getattr(opts, 'carl_symmetric', None) is not None:
                out.setdefault(name, {})['symmetric'] = opts.carl_symmetric == 'on'
        if cls.family == 'ants':
            ants = {}
            if getattr(opts, 'ants_preset', None):
                ants['preset'] = opts.ants_preset
            if getattr(opts, 'ants_metric_masks', None):
                ants['masks'] = True
            if ants:
                out[name] = {**out.get(name, {}), **ants}
        if cls.family != 'keymorph':
            continue
        params = {**out.get(name, {}), **common}
        if name == 'keymorphTPS' and getattr(opts, 'keymorph_lambdas', None):
            params['lambdas'] = [float(v) for v in dict.fromkeys(opts.keymorph_lambdas)]
        if params:
            out[name] = params
    return out


def _inside(path: Path, root: Path) -> tuple[str, ...] | None:
    """The parts of ``path`` below ``root`` when ``path`` is ``root`` (``()``) or inside
    it, else ``None``. Both must be resolved; an existing ancestor of ``path`` that is the
    same folder as ``root`` (same device and inode: a bind mount, or another spelling on a
    case-insensitive file system) counts as ``root``."""
    try:
        root_stat = root.stat()
    except OSError:
        root_stat = None
    for anc in (path, *path.parents):
        if anc == root:
            return path.relative_to(anc).parts
        if root_stat is not None:
            try:
                if os.path.samestat(anc.stat(), root_stat):
                    return path.relative_to(anc).parts
            except OSError:  # not there (yet), or not reachable
                continue
    return None


def check_paths(opts: argparse.Namespace) -> None:
    """Resolve the input, output, work and pybids database folders (``~``, ``..`` and
    symlinks, :meth:`Path.resolve`) and refuse (exit 64) every layout that would write into
    the input dataset:

    * the output folder is the input dataset, or inside it anywhere but
      ``<bids_dir>/derivatives/<name>/`` (the BIDS place for derivatives, allowed);
    * the work folder, or ``--bids-database-dir``, is the input dataset or inside it
      (``derivatives/`` included: they hold scratch files, not derivatives).

    The resolved paths replace the given ones in ``opts``, so what was checked is what is
    written to.
    """
    given_bids = opts.bids_dir
    opts.bids_dir = opts.bids_dir.expanduser().resolve()
    if not opts.bids_dir.is_dir():
        raise KeyprepError(f'bids_dir does not exist or is not a folder: {given_bids}',
                           EXIT_USAGE)
    bids = opts.bids_dir
    suggestion = bids / 'derivatives' / 'keyprep'

    def resolved(given: Path, what: str) -> Path:
        path = given.expanduser().resolve()
        shown = f'{what} {given}' + (f' (= {path})' if str(path) != str(given) else '')
        rel = _inside(path, bids)
        if rel is None:
            return path
        if what == 'output_dir':
            if len(rel) >= 2 and rel[0] == 'derivatives':
                return path
            where = 'is the input dataset' if not rel else 'is inside the input dataset'
            raise KeyprepError(f'{shown} {where} {bids}: nothing is written into the input '
                               'dataset; use a folder outside it, or '
                               f'{suggestion} (BIDS derivatives)', EXIT_USAGE)
        where = 'is the input dataset' if not rel else 'is inside the input dataset'
        raise KeyprepError(f'{shown} {where} {bids}: nothing is written into the input '
                           'dataset (derivatives/ included); use a folder outside it',
                           EXIT_USAGE)

    opts.output_dir = resolved(opts.output_dir, 'output_dir')
    opts.work_dir = resolved(opts.work_dir, 'the work folder (-w)')
    if getattr(opts, 'bids_database_dir', None) is not None:
        opts.bids_database_dir = resolved(opts.bids_database_dir, '--bids-database-dir')


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line. Usage errors exit with code 64, an unknown
    analysis level with 17; errors in the values raise :class:`KeyprepError`."""
    from ..pipeline.engines import available_engines, learned_models, resolve_methods
    from ..pipeline.errors import UsageError

    parser = build_parser()
    opts = parser.parse_args(argv)
    if opts.analysis_level not in ANALYSIS_LEVELS:
        parser.print_usage()
        parser.exit(EXIT_UNKNOWN_LEVEL,
                    f'keyprep: error: unknown analysis level {opts.analysis_level!r}; '
                    f'choose from {", ".join(ANALYSIS_LEVELS)}\n')
    check_paths(opts)
    engines = available_engines()
    names = {k.lower(): k for k in engines}
    methods = []
    requested = opts.methods
    if [m.lower() for m in opts.methods] == ['all']:
        # every engine, except learned engines whose model ships no weights yet and was
        # given none (they are named, so that a user can give the weights)
        requested, opts.methods_unavailable = [], []
        models = learned_models()
        for name, cls in engines.items():
            given = getattr(opts, f'{cls.model}_weights', None) if cls.model else None
            if cls.model and not given and not Path(models[cls.model].default_weights()).is_file():
                opts.methods_unavailable.append(name)
                continue
            requested.append(name)
        if opts.methods_unavailable:
            import sys

            print('keyprep: --methods all: not running ' + ', '.join(
                f'{n} (no {models[engines[n].model].title} weights ship with this version: give '
                f'{models[engines[n].model].option})' for n in opts.methods_unavailable),
                file=sys.stderr)
    for m in requested:
        if m.lower() not in names:
            raise KeyprepError(f'unknown method {m!r}; available: {", ".join(engines)}',
                               EXIT_USAGE)
        if names[m.lower()] not in methods:
            methods.append(names[m.lower()])
    opts.methods = methods
    if opts.skull_strip == 'synth' and opts.skull_strip_method not in (None, 'synth'):
        raise KeyprepError('--skull-strip synth uses the label network: it cannot be combined '
                           f'with --skull-strip-method {opts.skull_strip_method}', EXIT_USAGE)
    if opts.skull_strip == 'synth':
        opts.skull_strip, opts.skull_strip_method = 'auto', 'synth'
    if opts.skull_strip == 'skip' and opts.skull_strip_method is not None:
        raise KeyprepError('--skull-strip-method has no effect with --skull-strip skip',
                           EXIT_USAGE)
    opts.skull_strip_method = opts.skull_strip_method or 'deepbet'
    opts.bids_filters = {}
    if opts.bids_filter_file is not None:
        if not opts.bids_filter_file.is_file():
            raise KeyprepError(f'--bids-filter-file not found: {opts.bids_filter_file}',
                               EXIT_USAGE)
        try:
            opts.bids_filters = json.loads(opts.bids_filter_file.read_text())
        except json.JSONDecodeError as exc:
            raise KeyprepError(f'--bids-filter-file is not valid JSON: {exc}', EXIT_USAGE) \
                from None
        if not isinstance(opts.bids_filters, dict):
            raise KeyprepError('--bids-filter-file must hold a JSON object', EXIT_USAGE)
    for model in learned_models().values():  # nodes run in their own folders
        value = getattr(opts, f'{model.name}_weights', None)
        if value is not None:
            setattr(opts, f'{model.name}_weights', Path(value).expanduser().absolute())
    opts.engine_params = engine_params(opts)
    if opts.keymorph_keypoints is not None and opts.keymorph_keypoints < 4:
        raise KeyprepError('--keymorph-keypoints must be at least 4', EXIT_USAGE)
    try:  # engines that start from another engine's affine bring that engine along
        opts.methods = resolve_methods(opts.methods, opts.engine_params, opts.sloppy)
    except UsageError as exc:
        raise KeyprepError(str(exc), EXIT_USAGE) from None
    from ..pipeline.weights import models_used

    for name in models_used(opts.methods, opts.target):
        model = learned_models()[name]
        weights = getattr(opts, f'{name}_weights', None) or model.default_weights()
        if not Path(weights).is_file():
            from ..pipeline.errors import EXIT_NO_INPUT

            raise KeyprepError(f'{model.title} weights not found: {weights} (give '
                               f'{model.option}, or reinstall keyprep)', EXIT_NO_INPUT)
    ncpus = os.cpu_count() or 1
    opts.nprocs = opts.nprocs or ncpus
    opts.omp_nthreads = opts.omp_nthreads or min(opts.nprocs, 8)
    if opts.omp_nthreads > opts.nprocs:
        raise KeyprepError(f'--omp-nthreads ({opts.omp_nthreads}) exceeds --nprocs '
                           f'({opts.nprocs})', EXIT_USAGE)
    return opts
