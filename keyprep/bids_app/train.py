"""``keyprep train <model>``: train keyprep's learned components on synthetic data.

    keyprep train synthseg --label-maps DIR --output DIR [--recipe cpu-2mm|gpu-1mm]
    keyprep train keymorph --label-maps DIR --output DIR [--recipe cpu-2.5mm|gpu-2mm]
    keyprep train carl --label-maps DIR --output DIR [--recipe cpu|paper|cpu-dice|cpu-postaffine|cpu-deployed]
                     [--init-from CKPT] [--device cuda]
    keyprep train dio --output DIR [--label-maps DIR] [--recipe cpu-2mm|cpu-2mm-real|cpu-2mm-real-lncc|cpu-2mm-prompted|gpu-2mm] [--steps N]

Training resumes from ``<output>/checkpoint.pt`` when it exists (same seed: same batches),
logs its curves to ``<output>/train_log.tsv`` and ``val_log.tsv``, and ``--export PATH`` writes
the weights file that ``keyprep`` loads (``--synthseg-weights`` or the packaged default).
Exit codes as for ``keyprep`` (0 success, 64 usage, 65 unusable label maps, 66 missing input).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

from ..pipeline.errors import EXIT_DATA, EXIT_NO_INPUT, EXIT_OK, EXIT_USAGE, KeyprepError

__all__ = ['main', 'run_train', 'build_parser']

LOGGER = logging.getLogger('keyprep.train')


def build_parser() -> argparse.ArgumentParser:
    from ..pipeline.synth.train import HELD_OUT, RECIPES

    parser = argparse.ArgumentParser(prog='keyprep train', description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='model', required=True)
    p = sub.add_parser('synthseg', help='the contrast-agnostic label network (SynthSeg-style)')
    p.add_argument('--label-maps', type=Path, required=True,
                   help='folder of training label maps (*.nii.gz) in SynthSeg generation '
                   'labels, or a label-map bundle (python -m keyprep.pipeline.synth.bundle)')
    p.add_argument('--output', type=Path, required=True, help='run folder (checkpoint, logs)')
    p.add_argument('--recipe', choices=sorted(RECIPES), default='cpu-2mm',
                   help='cpu-2mm: small U-Net, 2 mm, 64^3 crops (ships); gpu-1mm: SynthSeg-sized, 1 mm')
    p.add_argument('--steps', type=int, help='total optimisation steps (default: the recipe)')
    p.add_argument('--seed', type=int, help='training seed (default: the recipe)')
    p.add_argument('--lr', type=float, help='peak learning rate (default: the recipe)')
    p.add_argument('--restart-step', type=int,
                   help='warm restart of the schedule at this step (resuming a run: its step); '
                   'the rate warms up again, is held, then decays to the end')
    p.add_argument('--val-every', type=int, help='validate every N steps (0: never)')
    p.add_argument('--val-pose', choices=['auto', 'header'],
                   help="pose mode of the labeller during validation (default: 'auto', as a "
                   'participant run)')
    p.add_argument('--device', default='auto', help='auto, cpu or cuda[:N]')
    p.add_argument('--held-out', nargs='*', default=list(HELD_OUT),
                   help='label-map names kept out of training for validation')
    p.add_argument('--extra-anatomies', nargs='*', default=[], choices=['colin27', 'jhu189', 'icbm'],
                   help='add label maps built from atlases installed with mricron-data / nilearn')
    p.add_argument('--max-minutes', type=float, help='stop (with a checkpoint) after this long')
    p.add_argument('--threads', type=int, help='torch CPU threads')
    p.add_argument('--export', type=Path, help='write the weights file for keyprep here at the end')
    p.add_argument('--precision', choices=['auto', 'bf16', 'fp32'], default='auto',
                   help='bf16: bfloat16 autocast for the forward pass (about 2x faster on CPUs with '
                   'AVX512-BF16/AMX and on recent GPUs); fp32: full precision; auto (default): '
                   'bf16 where the device runs it natively, else fp32')

    from ..pipeline.keymorph.train import RECIPES as KM_RECIPES

    k = sub.add_parser('keymorph', help='the KeyMorph keypoint detector (pretraining, then '
                       'supervised or unsupervised registration training)')
    k.add_argument('--label-maps', type=Path, required=True,
                   help='folder of training label maps (*.nii.gz) in SynthSeg generation '
                   'labels, or a label-map bundle (python -m keyprep.pipeline.synth.bundle)')
    k.add_argument('--output', type=Path, required=True, help='run folder (checkpoint, logs)')
    k.add_argument('--recipe', choices=sorted(KM_RECIPES), default='cpu-2.5mm',
                   help='cpu-2.5mm: 96^3 at 2.5 mm, small detector; cpu-2.5mm-centroids: the '
                   'same detector, pretrained on structure centroids of every training anatomy, '
                   "then Dice at +-45 deg; gpu-2mm(-centroids): the paper's 128^3 network "
                   '(widths 32-512)')
    k.add_argument('--mode', choices=['supervised', 'unsupervised'],
                   help='second stage: soft Dice on labels, or image similarity (default: recipe)')
    k.add_argument('--unsup-sim', choices=['mse', 'lncc', 'mi'],
                   help='unsupervised similarity: mse/lncc on same-contrast pairs alternated with '
                   'keypoint consistency, or mutual information on random contrasts')
    k.add_argument('--pretrain-steps', type=int, help='self-supervised keypoint pretraining steps')
    k.add_argument('--steps', type=int, help='steps after pretraining (default: the recipe)')
    k.add_argument('--pretrain-ramp', type=int,
                   help='pretraining steps over which the augmentation grows to its maximum')
    k.add_argument('--n-keypoints', type=int, help='number of keypoints (default 128)')
    k.add_argument('--weighted', choices=['none', 'mass', 'head'],
                   help='per-keypoint weights (default: none)')
    k.add_argument('--spatial-reg', action='store_true',
                   help="the paper's spatial regularisation: KL 1, variance 0.01, repulsion 0.001, "
                   'tau 0.1 (individual weights below override)')
    k.add_argument('--kl-weight', type=float, help='weight of the KL-to-Gaussian loss (0: off)')
    k.add_argument('--var-weight', type=float, help='weight of the variance loss (0: off)')
    k.add_argument('--rep-weight', type=float, help='weight of the repulsion loss (0: off)')
    k.add_argument('--rep-tau', type=float, help='repulsion temperature (normalised frame)')
    k.add_argument('--rotation-deg', type=float,
                   help='largest training rotation about each axis after pretraining (degrees; '
                   'the recipe: 180). Smaller ranges pair with the engine\'s pose search')
    k.add_argument('--rotation-ramp', type=int,
                   help='steps over which the rotation range grows from the pretraining\'s to '
                   '--rotation-deg (0: at once)')
    k.add_argument('--lr', type=float, help='learning rate after pretraining')
    k.add_argument('--seed', type=int, help='training seed (default: the recipe)')
    k.add_argument('--init', type=Path,
                   help='start from this checkpoint\'s weights when the run has no checkpoint '
                   'yet: at the second stage (e.g. another run\'s pretrained.pt), or, with a '
                   'centroid-pretraining recipe, at its first step')
    k.add_argument('--val-every', type=int, help='validate every this many steps')
    k.add_argument('--checkpoint-every', type=int, help='checkpoint every this many steps')
    k.add_argument('--device', default='auto', help='auto, cpu or cuda[:N]')
    k.add_argument('--held-out', nargs='*', default=list(HELD_OUT),
                   help='label-map names kept out of training for validation')
    k.add_argument('--extra-anatomies', nargs='*', default=[],
                   choices=['colin27', 'jhu189', 'icbm'],
                   help='add label maps built from atlases installed with mricron-data / nilearn')
    k.add_argument('--max-minutes', type=float, help='stop (with a checkpoint) after this long')
    k.add_argument('--threads', type=int, help='torch CPU threads')
    k.add_argument('--export', type=Path, help='write the weights file for keyprep here at the end')
    _add_dio_parser(sub)
    _add_carl_parser(sub)
    return parser


def _add_dio_parser(sub) -> None:
    from ..pipeline.dio.train import RECIPES as DIO_RECIPES
    from ..pipeline.synth.train import HELD_OUT

    d = sub.add_parser('dio', help='the DIO feature network (registration by an iterative '
                       'solver on learned features, trained through its optimum)')
    d.add_argument('--label-maps', type=Path,
                   default=Path('../shared/data/synthseg/training_label_maps'),
                   help='folder of training label maps (*.nii.gz) in SynthSeg generation labels, '
                   'or a label-map bundle (default: %(default)s)')
    d.add_argument('--output', type=Path, required=True, help='run folder (checkpoint, logs)')
    d.add_argument('--recipe', choices=sorted(DIO_RECIPES), default='cpu-2mm',
                   help='cpu-2mm: 64^3 pairs at 2 mm, short inner solves (default); gpu-2mm: '
                   "the paper's inner iterations (200/100/50); cpu-2mm-real: fine-tune of the "
                   'shipped weights with half the steps on pairs of the real ICBM 2009a T1; '
                   'cpu-2mm-real-lncc: the same with the LNCC term weighted 1; cpu-2mm-prompted: '
                   "fine-tune of the shipped weights with the engine's image term in the inner "
                   'solves (training/README.md)')
    d.add_argument('--init-weights', type=Path,
                   help='start a new run from these exported DIO weights (default: the '
                   "recipe's; the cpu-2mm-real* and cpu-2mm-prompted fine-tunes start from the "
                   'shipped ones)')
    d.add_argument('--steps', type=int, help='total optimisation steps (default: the recipe)')
    d.add_argument('--lr', type=float, help='peak learning rate (default: the recipe, 3e-4)')
    d.add_argument('--seed', type=int, help='training seed (default: the recipe)')
    d.add_argument('--implicit', choices=['jfb', 'ift'],
                   help='gradient through the solver: Jacobian-free (default) or exact '
                   'per-voxel IFT')
    d.add_argument('--init-encoder', action='store_true',
                   help="start a new run's encoder from the label network's weights")
    d.add_argument('--label-network', type=Path,
                   help='label-network weights for --init-encoder (default: the shipped ones)')
    d.add_argument('--val-every', type=int, help='validate every N steps (0: never)')
    d.add_argument('--checkpoint-every', type=int, help='checkpoint every N steps')
    d.add_argument('--device', default='auto', help='auto, cpu or cuda[:N]')
    d.add_argument('--held-out', nargs='*', default=list(HELD_OUT),
                   help='label-map names kept out of training for validation')
    d.add_argument('--extra-anatomies', nargs='*', default=[],
                   choices=['colin27', 'jhu189', 'icbm'],
                   help='add label maps built from atlases installed with mricron-data / nilearn')
    d.add_argument('--max-minutes', type=float, help='stop (with a checkpoint) after this long')
    d.add_argument('--threads', type=int, help='torch CPU threads')
    d.add_argument('--export', type=Path,
                   help='write the weights file for keyprep here at the end')


def _add_carl_parser(sub) -> None:
    from ..pipeline.carl.train import RECIPES as CARL_RECIPES
    from ..pipeline.synth.train import HELD_OUT

    c = sub.add_parser('carl', help='CARL: coordinate attention with refinement layers '
                       '(LNCC, diffusion then GradICON, on synthetic pairs)')
    c.add_argument('--label-maps', type=Path, required=True,
                   help='folder of training label maps (*.nii.gz) in SynthSeg generation '
                   'labels, or a label-map bundle (python -m keyprep.pipeline.synth.bundle)')
    c.add_argument('--output', type=Path, required=True, help='run folder (checkpoint, logs)')
    c.add_argument('--recipe', choices=sorted(CARL_RECIPES), default='cpu',
                   help='cpu: 96^3 at 2 mm, attention at 24^3, small U-Nets (default); paper: '
                   "the paper's sizes (176^3, attention at 44^3, 128 features), for a GPU; "
                   'cpu-dice: the cpu network with a soft-Dice term on the synthetic labels '
                   '(not in the paper), to continue a trained network (--init-from); '
                   'cpu-postaffine: cpu-dice on pairs in the post-affine regime the engine '
                   'runs CARL in (at most 3 mm, 3 degrees, 4 %% scaling; a quarter of the '
                   'pairs in two different named contrasts), to fine-tune (--init-from); '
                   'cpu-deployed: that pose on pairs of one contrast (what the engine gives '
                   'the network after its contrast transfer), label term of weight 2 at the '
                   'working resolution, to fine-tune (--init-from)')
    c.add_argument('--dice-weight', type=float,
                   help='weight of the label term (soft Dice of the synthetic pairs\' labels, '
                   'both directions; default: the recipe, 0 for cpu and paper)')
    c.add_argument('--init-from', type=Path,
                   help='start a new run from the network of this training checkpoint (same '
                   'architecture; fresh optimiser, step 0); ignored when --output already '
                   'holds a checkpoint, which resumes')
    c.add_argument('--steps', type=int, help='total optimisation steps (default: the recipe)')
    c.add_argument('--diffusion-steps', type=int,
                   help='steps with the diffusion regulariser before GradICON (default: recipe)')
    c.add_argument('--lr', type=float, help='learning rate (default: the recipe)')
    c.add_argument('--similarity', choices=['lncc', 'lncc2'],
                   help="lncc: the paper's; lncc2: squared, for pairs of different contrasts "
                   '(default: the recipe)')
    c.add_argument('--same-contrast', type=float, dest='p_same_contrast',
                   help='fraction of pairs sharing one named contrast, the others independent '
                   'random contrasts (default: the recipe, 0.5; 1 with --similarity lncc)')
    c.add_argument('--seed', type=int, help='training seed (default: the recipe)')
    c.add_argument('--val-every', type=int, help='validate every N steps (0: never)')
    c.add_argument('--checkpoint-every', type=int, help='checkpoint every N steps')
    c.add_argument('--device', default='auto', help='auto, cpu or cuda[:N]')
    c.add_argument('--held-out', nargs='*', default=list(HELD_OUT),
                   help='label-map names kept out of training for validation')
    c.add_argument('--extra-anatomies', nargs='*', default=[],
                   choices=['colin27', 'jhu189', 'icbm'],
                   help='add label maps built from atlases installed with mricron-data / nilearn')
    c.add_argument('--max-minutes', type=float, help='stop (with a checkpoint) after this long')
    c.add_argument('--threads', type=int, help='torch CPU threads')
    c.add_argument('--precision', choices=['auto', 'bf16', 'fp32'], default='auto',
                   help='bf16: bfloat16 autocast for the convolutions (attention and losses stay '
                   'float32); auto (default): bf16 where the device runs it natively')
    c.add_argument('--export', type=Path, help='write the weights file for keyprep here at the end')


def run_train(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s %(message)s')
    try:
        opts = build_parser().parse_args(argv)
    except SystemExit as exc:
        return EXIT_USAGE if exc.code not in (0, None) else EXIT_OK
    try:
        if opts.model == 'dio':
            return _dio(opts)
        if opts.model == 'carl':
            return _carl(opts)
        return _synthseg(opts) if opts.model == 'synthseg' else _keymorph(opts)
    except KeyprepError as exc:
        LOGGER.error('%s', exc)
        return exc.exit_code
    except FileNotFoundError as exc:
        LOGGER.error('%s', exc)
        return EXIT_NO_INPUT
    except Exception as exc:  # unreadable or wrong label maps (nibabel, numpy, our checks)
        try:  # a machine training from a bundle may have no nibabel
            from nibabel.filebasedimages import ImageFileError
            nib_errors: tuple = (ImageFileError,)
        except ImportError:
            nib_errors = ()
        if not isinstance(exc, (ValueError, OSError, EOFError, *nib_errors)):
            raise
        LOGGER.error('unusable training data: %s', exc)
        return EXIT_DATA


def _synthseg(opts) -> int:
    from ..pipeline.synth.train import RECIPES, export_weights, train

    device = _prepare(opts)
    if device is None:
        return EXIT_NO_INPUT
    cfg = RECIPES[opts.recipe]
    if opts.steps:
        cfg = replace(cfg, steps=opts.steps)
    if opts.seed is not None:
        cfg = replace(cfg, seed=opts.seed)
    for key in ('lr', 'restart_step', 'val_every', 'val_pose'):
        if getattr(opts, key) is not None:
            cfg = replace(cfg, **{key: getattr(opts, key)})
    from ..pipeline.resources import resolve_precision

    cfg = replace(cfg, precision=resolve_precision(opts.precision, device))
    LOGGER.info('precision: %s', cfg.precision)
    ckpt = train(opts.label_maps, opts.output, cfg, device=device, held_out=tuple(opts.held_out),
                 extra_maps=_extra_maps(opts.extra_anatomies, opts.label_maps), log=LOGGER.info,
                 max_minutes=opts.max_minutes)
    if opts.export:
        meta = export_weights(ckpt, opts.export)
        LOGGER.info('weights: %s', json.dumps(meta))
    return EXIT_OK


def _prepare(opts) -> str | None:
    """Checks and settings shared by the trainers: the label-map folder (None when missing,
    logged), torch threads, and the resolved device."""
    import torch

    from ..pipeline.resources import resolve_device, tune_allocator

    tune_allocator()
    if not (opts.label_maps.is_dir() or opts.label_maps.is_file()):
        LOGGER.error('label-map folder (or bundle file) not found: %s', opts.label_maps)
        return None
    if opts.threads:
        torch.set_num_threads(opts.threads)
    return resolve_device(opts.device)


def _extra_maps(names, label_maps: Path | None = None) -> list:
    """The extra anatomies: from ``label_maps`` when it is a bundle holding them (a machine
    without the atlases), else built from the installed atlases."""
    if not names:
        return []
    from ..pipeline.synth.bundle import extra_label_map, load_bundle

    bundle = load_bundle(label_maps) if label_maps is not None and label_maps.is_file() else None
    return [extra_label_map(name, bundle) for name in names]


def _keymorph(opts) -> int:
    from ..pipeline.keymorph.network import DetectorConfig
    from ..pipeline.keymorph.train import PAPER_REG, RECIPES, export_weights, train

    device = _prepare(opts)
    if device is None:
        return EXIT_NO_INPUT
    cfg = RECIPES[opts.recipe]
    changes = dict(PAPER_REG) if opts.spatial_reg else {}
    for key in ('mode', 'unsup_sim', 'pretrain_steps', 'pretrain_ramp', 'steps', 'kl_weight',
                'var_weight', 'rep_weight', 'rep_tau', 'lr', 'seed', 'val_every',
                'checkpoint_every', 'rotation_deg', 'rotation_ramp'):
        value = getattr(opts, key)
        if value is not None:
            changes[key] = value
    det = {}
    if opts.n_keypoints:
        det['n_keypoints'] = opts.n_keypoints
    if opts.weighted:
        det['weighted'] = opts.weighted
    if det:
        changes['detector'] = DetectorConfig(**{**cfg.detector.to_dict(), **det})
    cfg = replace(cfg, **changes)
    ckpt = train(opts.label_maps, opts.output, cfg, device=device, held_out=tuple(opts.held_out),
                 extra_maps=_extra_maps(opts.extra_anatomies, opts.label_maps), log=LOGGER.info,
                 max_minutes=opts.max_minutes, init=opts.init)
    if opts.export:
        meta = export_weights(ckpt, opts.export, card={'recipe': opts.recipe})
        LOGGER.info('weights: %s', json.dumps(meta))
    return EXIT_OK


def _dio(opts) -> int:
    from ..pipeline.dio.train import RECIPES, export_weights, train

    device = _prepare(opts)
    if device is None:
        return EXIT_NO_INPUT
    cfg = RECIPES[opts.recipe]
    changes = {}
    for key in ('steps', 'lr', 'seed', 'implicit', 'val_every', 'checkpoint_every'):
        value = getattr(opts, key)
        if value is not None:
            changes[key] = value
    if opts.init_encoder:
        changes['init_encoder'] = True
    if opts.init_weights is not None:
        if not opts.init_weights.is_file():
            LOGGER.error('--init-weights %s: no such file', opts.init_weights)
            return EXIT_NO_INPUT
        changes['init_weights'] = str(opts.init_weights.resolve())
    cfg = replace(cfg, **changes)
    ckpt = train(opts.label_maps, opts.output, cfg, device=device, held_out=tuple(opts.held_out),
                 extra_maps=_extra_maps(opts.extra_anatomies, opts.label_maps), log=LOGGER.info,
                 max_minutes=opts.max_minutes, label_network=opts.label_network)
    if opts.export:
        meta = export_weights(ckpt, opts.export, card={'recipe': opts.recipe})
        LOGGER.info('weights: %s', json.dumps(meta))
    return EXIT_OK


def _carl(opts) -> int:
    from ..pipeline.carl.train import RECIPES, export_weights, train
    from ..pipeline.resources import resolve_precision

    device = _prepare(opts)
    if device is None:
        return EXIT_NO_INPUT
    cfg = RECIPES[opts.recipe]
    changes = {}
    for key in ('steps', 'diffusion_steps', 'lr', 'similarity', 'p_same_contrast', 'seed',
                'val_every', 'checkpoint_every', 'dice_weight'):
        value = getattr(opts, key)
        if value is not None:
            changes[key] = value
    if opts.init_from is not None:
        if not opts.init_from.is_file():
            LOGGER.error('--init-from %s: no such file', opts.init_from)
            return EXIT_NO_INPUT
        changes['init_from'] = str(opts.init_from.resolve())
    changes['precision'] = resolve_precision(opts.precision, device)
    cfg = replace(cfg, **changes)
    LOGGER.info('precision: %s', cfg.precision)
    ckpt = train(opts.label_maps, opts.output, cfg, device=device, held_out=tuple(opts.held_out),
                 extra_maps=_extra_maps(opts.extra_anatomies, opts.label_maps), log=LOGGER.info,
                 max_minutes=opts.max_minutes)
    if opts.export:
        meta = export_weights(ckpt, opts.export, recipe=opts.recipe)
        LOGGER.info('weights: %s', json.dumps(meta))
    return EXIT_OK


def main() -> None:
    sys.exit(run_train(sys.argv[1:]))


if __name__ == '__main__':  # ``python -m keyprep.bids_app.train`` (no entry point installed)
    main()
