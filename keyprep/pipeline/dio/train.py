"""Train DIO's feature network on synthetic pairs (``keyprep train dio``).

Every step (``paper_dio.md`` §1.5, §2.2, adapted to synthetic data):

1. a pair of **two different anatomies** with independent random contrasts from keyprep's
   synthesis engine (:meth:`~keyprep.pipeline.synth.generator.Synthesizer.sample_pair`,
   ``same_anatomy=False``, skull removed), a mild random pose each (the engine's affine
   pre-alignment leaves little), intensities normalised as :func:`.register.register_arrays`
   does at deployment;
2. features of each image (with ``single_side``, the default, a coin flip chooses which image's
   features get a gradient this step, as the authors' code does to halve memory);
3. the free-form solver (:mod:`.solver`, ``'ffd'``, Adam, smoothing) at each active scale,
   coarse to fine (scales are switched on at ``level_steps``), without a graph;
4. each level's optimum made differentiable in the features by implicit differentiation
   (:mod:`.implicit`, ``'jfb'`` by default or the exact per-voxel ``'ift'``);
5. outer loss, averaged over the active levels: ``dice_weight * (1 - soft Dice)`` of the
   moving one-hot labels warped trilinearly (full grid, structures present in the fixed image,
   background excluded) + ``img_weight * (1 - LNCC^2)`` (window 7) of the warped moving image;
6. Adam (lr 3e-4 after a short warm-up, polynomial decay with power 0.9), gradient-norm clip 10.

With ``real_prob > 0`` (recipe ``cpu-2mm-real``, keyprep's addition) that fraction of the
steps registers two independently moved and corrupted copies of a *real* image instead
(:meth:`~keyprep.pipeline.synth.generator.Synthesizer.real_pair`: the same spatial and
acquisition models, the image's own intensities and texture; the labels of its anatomy map
move with it, so the Dice term is exact whatever their anatomical accuracy). The real image
is ICBM 2009a (``real_anatomies``): never Colin27, which the benchmarks' real known-truth
pairs use. ``init_weights`` starts a new run from exported weights (``'shipped'``: the
packaged model) instead of a random network.

With ``image_weight > 0`` (recipe ``cpu-2mm-prompted``, keyprep's addition) the inner solves
of step 3 also register the images' local squared NCC (the engine's image prompting,
:func:`.register.register_arrays`), so the outer loss is taken at the optimum the deployed
objective reaches and the features learn what the image term lacks; the implicit gradient of
step 4 is still that of the feature term (the image term does not depend on the features;
it moves the optimum and the curvature, which the Jacobian-free gradient ignores). The
validation registrations use the same image term.

The batch of a step comes from ``torch.Generator().manual_seed(seed * 1_000_003 + step)``, so
a run resumed from ``checkpoint.pt`` (written atomically) sees exactly the batches it would
have seen. Curves: ``train_log.tsv`` (every step) and ``val_log.tsv``: fixed pairs of the
held-out maps (training_seg_14-16: never trained on) with fixed, different contrasts,
registered through :func:`.register.register_arrays` (the deployment path) with ``'ffd'`` and
``'diffeo'``: mean structure Dice (nearest-neighbour labels) and % voxels with J <= 0.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..synth.generator import LabelMap, RealImage, SynthConfig, Synthesizer
from ..synth.labels import OUTPUT_LABELS
from ..synth.train import HELD_OUT, _atomic_save, dice_per_class, load_training_maps
from .implicit import MODES, implicit_displacement
from .network import FORMAT, DioConfig, DioFeatureNet, init_from_label_network
from .register import intensity_features, normalise_intensity, register_arrays, warp_array
from .solver import SolverConfig, jacobian_determinant, solve, upsample_field, warp

__all__ = ['DioTrainConfig', 'RECIPES', 'DioTrainer', 'train', 'export_weights',
           'REAL_ANATOMIES', 'load_real_images', 'init_from_weights',
           'TRAIN_LOG_HEADER', 'VAL_LOG_HEADER']

N_LABELS = len(OUTPUT_LABELS)
TRAIN_LOG_HEADER = ('step\tloss\tdice_loss\tlncc_loss\tlevels\tside\tinner_iters\tlr\tsynth_s'
                    '\tstep_s')
VAL_LOG_HEADER = ('step\tdice_identity\tdice_ffd\tdice_diffeo\tfold_pct_ffd\tfold_pct_diffeo'
                  '\tval_s')


def _default_synth() -> SynthConfig:
    return SynthConfig(rotation_deg=8.0, scaling=0.08, shear=0.01, translation_mm=4.0,
                       nonlin_std_mm=3.0, skull_strip_prob=1.0)


@dataclass(frozen=True)
class DioTrainConfig:
    net: DioConfig = field(default_factory=DioConfig)
    synth: SynthConfig = field(default_factory=_default_synth)
    steps: int = 6000
    lr: float = 3e-4
    warmup: int = 20
    lr_power: float = 0.9
    grad_clip: float = 10.0
    seed: int = 1234
    checkpoint_every: int = 25
    val_every: int = 250
    #: step at which each scale (coarsest first) joins the training
    level_steps: tuple[int, ...] = (0, 150, 400)
    #: inner iterations per scale during training (inference uses ``net.iterations``)
    train_iterations: tuple[int, ...] = (60, 30, 15)
    implicit: str = 'jfb'
    single_side: bool = True
    dice_weight: float = 1.0
    img_weight: float = 0.25
    lncc_window: int = 7
    init_encoder: bool = False
    #: solver iterations per scale of the validation registrations (None: the network's
    #: deployment default, ``net.iterations``); the CPU recipe halves them to keep a
    #: validation near a few minutes
    val_iterations: tuple[int, ...] | None = None
    #: fraction of the steps on a real image's pair (:meth:`DioTrainer.batch`)
    real_prob: float = 0.0
    #: the real images of those steps (``'icbm'``: ICBM 2009a T1 with its anatomy map)
    real_anatomies: tuple[str, ...] = ()
    #: a new run starts from these exported weights (``'shipped'``: the packaged model)
    init_weights: str | None = None
    #: image prompting inside training (keyprep's addition): the inner solves register the
    #: images' local squared NCC with this weight alongside the features (the engine's
    #: objective, :func:`.register.register_arrays`), so the features learn what the
    #: deployed objective lacks; the validation registrations use it too. 0: DIO's
    #: features-only inner objective (the paper's)
    image_weight: float = 0.0
    #: the image term's box window, voxels of each level
    image_window: int = 5

    def __post_init__(self):
        object.__setattr__(self, 'real_anatomies', tuple(self.real_anatomies))
        unknown = set(self.real_anatomies) - set(REAL_ANATOMIES)
        if unknown:
            raise ValueError(f'real_anatomies: unknown {sorted(unknown)}; choose from '
                             f'{sorted(REAL_ANATOMIES)}')
        if not 0.0 <= self.real_prob <= 1.0:
            raise ValueError('real_prob must be in [0, 1]')
        if self.real_prob > 0 and not self.real_anatomies:
            raise ValueError('real_prob > 0 needs real_anatomies')
        if self.val_iterations is not None:
            object.__setattr__(self, 'val_iterations',
                               tuple(int(i) for i in self.val_iterations))
        object.__setattr__(self, 'level_steps', tuple(int(s) for s in self.level_steps))
        object.__setattr__(self, 'train_iterations', tuple(int(s) for s in self.train_iterations))
        n = len(self.net.scales)
        if len(self.level_steps) != n or len(self.train_iterations) != n:
            raise ValueError('level_steps and train_iterations need one value per scale')
        if self.level_steps[0] != 0:
            raise ValueError('the coarsest scale trains from step 0')
        if self.implicit not in MODES:
            raise ValueError(f'implicit must be one of {MODES}')
        if any(s % self.net.divisor for s in self.synth.shape):
            raise ValueError(f'the synthetic shape must be divisible by {self.net.divisor}')
        if not 0.0 <= self.image_weight < float('inf'):
            raise ValueError('image_weight must be a finite number >= 0')
        if self.image_window < 1 or self.image_window % 2 == 0:
            raise ValueError('image_window must be an odd number of voxels')
        if abs(self.synth.res_mm - self.net.res_mm) > 1e-9:
            object.__setattr__(self, 'synth', replace(self.synth, res_mm=self.net.res_mm))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> 'DioTrainConfig':
        d = dict(d)
        d['net'] = DioConfig.from_dict(d['net'])
        d['synth'] = SynthConfig.from_dict(d['synth'])
        return cls(**d)


#: real images for ``real_anatomies`` (Colin27 is left out on purpose: the benchmarks' real
#: known-truth pairs are Colin27)
REAL_ANATOMIES = ('icbm',)


def load_real_images(names: Sequence[str]) -> list[tuple[LabelMap, RealImage]]:
    """Each named real image with its anatomy label map (built once, cached by
    :mod:`keyprep.pipeline.synth.anatomies`)."""
    out = []
    for name in names:
        if name == 'icbm':
            import nibabel as nib

            from ..synth.anatomies import icbm_label_map
            from ..synth.anatomies.common import _icbm

            img = nib.as_closest_canonical(nib.load(str(_icbm('T1w'))))
            out.append((icbm_label_map(), RealImage(np.asarray(img.dataobj, np.float32),
                                                    img.affine, 'icbm2009a')))
        else:
            raise ValueError(f'unknown real anatomy {name!r}; choose from {REAL_ANATOMIES}')
    return out


#: ``cpu-2mm``: 64^3 synthetic pairs at 2 mm (128 mm field of view, the brain centred), the
#: label network's encoder widths. ``gpu-2mm``: the same network and data with the paper's
#: inner iterations during training and scales switched on earlier.
RECIPES: dict[str, DioTrainConfig] = {
    'cpu-2mm': DioTrainConfig(val_iterations=(100, 50, 25)),
    'gpu-2mm': DioTrainConfig(steps=20_000, level_steps=(0, 100, 300),
                              train_iterations=(200, 100, 50), checkpoint_every=100,
                              val_every=500),
    # fine-tune of the shipped weights (step 2250 of cpu-2mm): half the steps on real ICBM
    # 2009a pairs, every scale from the start, a lower learning rate
    'cpu-2mm-real': DioTrainConfig(steps=1500, lr=1e-4, warmup=10, level_steps=(0, 0, 0),
                                   val_iterations=(100, 50, 25), val_every=125, seed=2026,
                                   real_prob=0.5, real_anatomies=('icbm',),
                                   init_weights='shipped'),
    # the same with the LNCC term weighted as the Dice term (0.25 above): after 375 steps of
    # cpu-2mm-real the engine's real-field Dice had not moved, and DIO's field there equals
    # the true one smoothed at 8 mm (benchmarks/results/dio-field-diagnosis/): the fine
    # intensity alignment LNCC rewards is what is missing
    'cpu-2mm-real-lncc': DioTrainConfig(steps=1500, lr=1e-4, warmup=10, level_steps=(0, 0, 0),
                                        val_iterations=(100, 50, 25), val_every=125,
                                        seed=2027, real_prob=0.5, real_anatomies=('icbm',),
                                        init_weights='shipped', img_weight=1.0),
    # fine-tune of the shipped weights inside the deployed objective: the inner solves add
    # the images' LNCC at the engine's default weight and window (image prompting), so the
    # outer loss is measured at the optimum the engine reaches; on these weights the image
    # term alone registers as well as features + image (benchmarks/results/dio-image-prompt/)
    'cpu-2mm-prompted': DioTrainConfig(steps=1500, lr=1e-4, warmup=10, level_steps=(0, 0, 0),
                                       val_iterations=(100, 50, 25), val_every=125,
                                       seed=2028, init_weights='shipped', image_weight=4.0,
                                       image_window=5),
}


class DioTrainer:
    """Model, optimiser, data and one step (exposed for tests and scripts)."""

    def __init__(self, train_maps: Sequence[LabelMap], cfg: DioTrainConfig,
                 device: str | torch.device = 'cpu', held_out: Sequence[LabelMap] = (),
                 real: Sequence[tuple[LabelMap, RealImage]] | None = None):
        self.cfg = cfg
        self.dev = torch.device(device)
        self.train_maps = list(train_maps)
        self.held_out = list(held_out)
        torch.manual_seed(cfg.seed)
        self.model = DioFeatureNet(cfg.net).to(self.dev)
        self.optimiser = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.synth = Synthesizer(self.train_maps, cfg.synth, device=self.dev)
        self.val_items: list[dict] | None = None
        self.real_synth, self.real_images = None, {}
        if cfg.real_prob > 0:
            if real is None:
                real = load_real_images(cfg.real_anatomies)
            self.real_synth = Synthesizer([m for m, _ in real], cfg.synth, device=self.dev)
            self.real_images = {i: im for i, (_, im) in enumerate(real)}

    def lr(self, step: int) -> float:
        cfg = self.cfg
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        t = min(1.0, step / max(1, cfg.steps))
        return cfg.lr * (1 - t) ** cfg.lr_power + 1e-7

    def active_levels(self, step: int) -> list[int]:
        return [i for i, s in enumerate(self.cfg.level_steps) if step >= s]

    def solver_config(self) -> SolverConfig:
        return SolverConfig()

    # -------------------------------------------------------------- data
    def batch(self, step: int) -> dict:
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        # the draw is only made when real pairs are on, so older recipes see their batches
        real = cfg.real_prob > 0 and float(torch.rand((), generator=gen)) < cfg.real_prob
        if real:
            pair = self.real_synth.real_pair(self.real_images, gen)
        else:
            pair = self.synth.sample_pair(gen, same_anatomy=False)
        side = float(torch.rand((), generator=gen))
        side = 'both' if not cfg.single_side else ('fixed' if side < 0.5 else 'moving')
        fixed, moving = pair['fixed'], pair['moving']
        return {'fixed': normalise_intensity(fixed['image'][0, 0])[None, None],
                'moving': normalise_intensity(moving['image'][0, 0])[None, None],
                'fixed_labels': fixed['labels'], 'moving_labels': moving['labels'],
                'side': side, 'maps': pair['maps'], 'real': real}

    # -------------------------------------------------------------- step
    def _features(self, image: torch.Tensor, grad: bool) -> list[torch.Tensor]:
        if grad:
            return self.model(image)
        with torch.no_grad():
            return self.model(image)

    def loss(self, step: int, batch: dict) -> tuple[torch.Tensor, dict]:
        """The outer loss of a batch (graph to the network through the implicit layer)."""
        cfg = self.cfg
        net = cfg.net
        shape = batch['fixed'].shape[2:]
        side = batch['side']
        feats_f = self._features(batch['fixed'], side in ('fixed', 'both'))
        feats_m = self._features(batch['moving'], side in ('moving', 'both'))
        onehot_f = F.one_hot(batch['fixed_labels'].long(), N_LABELS).movedim(-1, 1).float()
        onehot_m = F.one_hot(batch['moving_labels'].long(), N_LABELS).movedim(-1, 1).float()
        solver = self.solver_config()
        state = None
        dice_terms, img_terms, iters = [], [], []
        from ..keymorph.losses import lncc_loss, soft_dice_loss

        images = None
        if cfg.image_weight > 0:  # the engine's image pyramids (register_arrays)
            images = [intensity_features(batch[k], net.scales) for k in ('fixed', 'moving')]
        for level in self.active_levels(step):
            ff, fm = feats_f[level], feats_m[level]
            scfg = replace(solver, iterations=(cfg.train_iterations[level],))
            prompt = {}
            if images is not None:
                prompt = {'images': ([images[0][level]], [images[1][level]]),
                          'image_weight': cfg.image_weight, 'image_window': cfg.image_window}
            res = solve([ff.detach()], [fm.detach()], 'ffd', scfg, (net.scales[level],),
                        net.res_mm, init=state, **prompt)
            state = res.final.field
            iters.append(res.final.iterations)
            u = implicit_displacement(state, ff, fm, cfg.implicit)
            disp = upsample_field(u, shape)
            warped_lab = warp(onehot_m, disp, padding_mode='zeros')
            dice_terms.append(soft_dice_loss(warped_lab, onehot_f))
            if cfg.img_weight:
                warped_img = warp(batch['moving'], disp, padding_mode='zeros')
                img_terms.append(lncc_loss(warped_img, batch['fixed'], cfg.lncc_window))
        dice = torch.stack(dice_terms).mean()
        img = torch.stack(img_terms).mean() if img_terms else dice * 0
        loss = cfg.dice_weight * dice + cfg.img_weight * img
        return loss, {'dice_loss': float(dice.detach()), 'lncc_loss': float(img.detach()),
                      'levels': len(dice_terms), 'side': side,
                      'inner_iters': '/'.join(str(i) for i in iters)}

    def step(self, step: int, batch: dict | None = None) -> dict:
        self.model.train()
        batch = batch if batch is not None else self.batch(step)
        for group in self.optimiser.param_groups:
            group['lr'] = self.lr(step)
        loss, terms = self.loss(step, batch)
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimiser.step()
        if batch.get('real'):  # logged in the side column: 'fixed/real', 'moving/real'
            terms['side'] = f"{terms['side']}/real"
        return {'loss': float(loss.detach()), **terms}

    # -------------------------------------------------------------- validation
    def _validation_set(self) -> list[dict]:
        """Fixed held-out pairs: map a -> map b with contrasts (ca, cb), no spatial
        augmentation (the anatomies as they are, centred), skull removed."""
        maps = self.held_out
        if len(maps) < 2:
            return []
        base = replace(self.cfg.synth.evaluation(), skull_strip_prob=1.0)
        plan = [(0, 1, 't1', 't2'), (1, 2, 't2', 't1'), (2, 0, 'pd', 'flair')]
        items = []
        for k, (a, b, ca, cb) in enumerate(plan):
            if max(a, b) >= len(maps):
                continue
            sa = Synthesizer(maps, replace(base, contrast=ca), device='cpu').synthesize(
                a, torch.Generator().manual_seed(50_000 + k))
            sb = Synthesizer(maps, replace(base, contrast=cb), device='cpu').synthesize(
                b, torch.Generator().manual_seed(60_000 + k))
            items.append({'name': f'{maps[a].name}->{maps[b].name}',
                          'fixed': sa['image'].numpy(), 'moving': sb['image'].numpy(),
                          'fixed_labels': sa['labels'].numpy(),
                          'moving_labels': sb['labels'].numpy()})
        return items

    def evaluate(self, iterations=None) -> dict[str, float]:
        """Held-out pairs through :func:`register_arrays` (``'ffd'`` and ``'diffeo'``):
        mean structure Dice and % folding voxels (interior, central differences).
        ``iterations``: solver iterations (default ``cfg.val_iterations``)."""
        if iterations is None:
            iterations = self.cfg.val_iterations
        if self.val_items is None:
            self.val_items = self._validation_set()
        if not self.val_items:
            return {}
        res_mm = self.cfg.net.res_mm
        rows: dict[str, list[float]] = {}
        for it in self.val_items:
            out = register_arrays(it['fixed'], it['moving'], self.model,
                                  representations=('ffd', 'diffeo'), device=self.dev,
                                  iterations=iterations, spacing_mm=(res_mm,) * 3,
                                  image_weight=self.cfg.image_weight,
                                  image_window=self.cfg.image_window)
            rows.setdefault('dice_identity', []).append(
                _mean_dice(it['moving_labels'], it['fixed_labels']))
            for rep in ('ffd', 'diffeo'):
                disp = out[rep]['disp_fwd']
                warped = warp_array(it['moving_labels'], disp, order=0)
                rows.setdefault(f'dice_{rep}', []).append(_mean_dice(warped, it['fixed_labels']))
                jac = jacobian_determinant(torch.as_tensor(disp))
                rows.setdefault(f'fold_pct_{rep}', []).append(
                    100.0 * float((jac <= 0).double().mean()))
        self.model.train()
        return {k: float(np.mean(v)) for k, v in rows.items()}


def init_from_weights(model: DioFeatureNet, weights: str | Path) -> int:
    """Load exported DIO weights (``'shipped'``: the packaged ones) into ``model`` (same
    architecture; the solver iterations they carry are not part of it); returns the number
    of tensors."""
    from .network import default_weights, load_dio

    path = default_weights() if str(weights) == 'shipped' else Path(weights)
    src = load_dio(path)
    if replace(src.config, iterations=model.config.iterations) != model.config:
        raise ValueError(f'{path}: another network architecture than this run\'s')
    state = {k: v.float() for k, v in src.state_dict().items()}
    model.load_state_dict(state)
    return len(state)


def _mean_dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean hard Dice over the structures (not background) present in either map."""
    d = dice_per_class(torch.as_tensor(pred).long(), torch.as_tensor(target).long(), N_LABELS)
    return float(np.nanmean(d[1:]))


def _truncate_logs(out: Path, step: int) -> None:
    for name in ('train_log.tsv', 'val_log.tsv'):
        path = out / name
        if path.exists():
            rows = path.read_text().splitlines()
            kept = rows[:1] + [r for r in rows[1:] if r and int(r.split('\t')[0]) <= step]
            path.write_text('\n'.join(kept) + '\n')


def _fmt(v) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return str(v)
    return 'nan' if v != v else f'{v:.5g}'


def train(label_maps: str | Path | None, out_dir: str | Path,
          cfg: DioTrainConfig = DioTrainConfig(), device: str = 'cpu',
          held_out: Sequence[str] = HELD_OUT, extra_maps: Sequence[LabelMap] = (),
          maps: tuple[Sequence[LabelMap], Sequence[LabelMap]] | None = None, log=print,
          max_minutes: float | None = None, label_network: str | Path | None = None,
          real: Sequence[tuple[LabelMap, RealImage]] | None = None) -> Path:
    """Train (or resume) the feature network; returns the checkpoint path.

    ``label_maps``: folder (or bundle) of SynthSeg label maps, the ``held_out`` names kept for
    validation; or ``maps=(train, held_out)``. With ``cfg.init_encoder`` a fresh run starts
    its encoder from the label network (``label_network``: its weights, default the shipped
    ones)."""
    dev = torch.device(device)
    if maps is not None:
        train_maps, test_maps = list(maps[0]), list(maps[1])
    else:
        train_maps, test_maps = load_training_maps(label_maps, held_out)
    leaked = {m.name for m in train_maps} & set(held_out)
    if leaked:
        raise ValueError(f'held-out maps in the training set: {sorted(leaked)}')
    train_maps = train_maps + list(extra_maps)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log(f'training maps: {", ".join(m.name for m in train_maps)}')
    log(f'held-out maps: {", ".join(m.name for m in test_maps)}')
    trainer = DioTrainer(train_maps, cfg, dev, test_maps, real=real)
    if cfg.real_prob > 0:
        log(f'real images ({cfg.real_prob:.0%} of the steps): '
            + ', '.join(im.name for im in trainer.real_images.values()))
    ckpt_path = out / 'checkpoint.pt'
    step = 0
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=dev, weights_only=True)
        if DioTrainConfig.from_dict(ckpt['config']).net != cfg.net:
            raise ValueError(f'{ckpt_path} was trained with another network architecture')
        trainer.model.load_state_dict(ckpt['model'])
        trainer.optimiser.load_state_dict(ckpt['optimiser'])
        step = int(ckpt['step'])
        log(f'resumed from {ckpt_path} at step {step}')
        _truncate_logs(out, step)
    elif cfg.init_weights:
        n = init_from_weights(trainer.model, cfg.init_weights)
        log(f'network initialised from {cfg.init_weights} ({n} tensors)')
    elif cfg.init_encoder:
        n = init_from_label_network(trainer.model, label_network)
        log(f'encoder initialised from the label network ({n} tensors)')
    (out / 'train_config.json').write_text(json.dumps(cfg.to_dict(), indent=1))
    tlog, vlog = out / 'train_log.tsv', out / 'val_log.tsv'
    if not tlog.exists():
        tlog.write_text(TRAIN_LOG_HEADER + '\n')
    t_start = time.time()

    def save():
        _atomic_save({'model': trainer.model.state_dict(),
                      'optimiser': trainer.optimiser.state_dict(), 'step': step,
                      'config': cfg.to_dict(), 'train_maps': [m.name for m in train_maps],
                      'held_out': [m.name for m in test_maps]}, ckpt_path)

    def validate():
        tv = time.time()
        res = trainer.evaluate()
        if not res:
            return
        if not vlog.exists():
            vlog.write_text(VAL_LOG_HEADER + '\n')
        keys = VAL_LOG_HEADER.split('\t')[1:-1]
        with open(vlog, 'a') as fh:
            fh.write(f'{step}\t' + '\t'.join(_fmt(res[k]) for k in keys)
                     + f'\t{time.time() - tv:.0f}\n')
        log(f'step {step} validation: {json.dumps({k: round(v, 4) for k, v in res.items()})}')

    while step < cfg.steps:
        t0 = time.time()
        batch = trainer.batch(step)
        t1 = time.time()
        terms = trainer.step(step, batch)
        t2 = time.time()
        step += 1
        row = [step, terms['loss'], terms['dice_loss'], terms['lncc_loss'], terms['levels'],
               terms['side'], terms['inner_iters'], trainer.lr(step - 1), t1 - t0, t2 - t1]
        with open(tlog, 'a') as fh:
            fh.write('\t'.join(_fmt(v) for v in row) + '\n')
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save()
        if cfg.val_every and (step % cfg.val_every == 0 or step == cfg.steps):
            validate()
        if max_minutes is not None and (time.time() - t_start) > 60 * max_minutes:
            save()
            log(f'stopping after {max_minutes} min at step {step} (resume to continue)')
            break
    return ckpt_path


#: Solver iterations per scale (1/4, 1/2, full) written into exported weights: the
#: registrations' default. On 4 held-out pairs (``benchmarks/results/dio-solver/``) 20 at full
#: resolution gave the Dice of 40-43 (early-stopped, of at most 50) in half the time.
INFERENCE_ITERATIONS = (200, 100, 20)


def export_weights(checkpoint: str | Path, out_path: str | Path, half: bool = True,
                   card: dict | None = None,
                   iterations: Sequence[int] | str | None = 'inference') -> dict:
    """Write the weights file :func:`~.network.load_dio` reads (``format``, ``state_dict``
    (float16 by default), ``config``, ``step``, ``recipe``); with ``card``, also a JSON model
    card beside it. ``iterations``: the solver iterations per scale the weights carry
    (``'inference'``: :data:`INFERENCE_ITERATIONS` for a network with scales 4, 2, 1, else the
    training configuration's; ``None``: the training configuration's; or one count per
    scale). Returns the metadata (path, sha256, step, bytes)."""
    from ..weights import sha256_file

    ckpt = torch.load(checkpoint, map_location='cpu', weights_only=True)
    cfg = DioTrainConfig.from_dict(ckpt['config'])
    net = cfg.net
    if iterations == 'inference':
        iterations = INFERENCE_ITERATIONS if tuple(net.scales) == (4, 2, 1) else None
    if iterations is not None:
        if len(iterations) != len(net.scales):
            raise ValueError(f'{len(iterations)} iteration counts for {len(net.scales)} scales')
        net = replace(net, iterations=tuple(int(i) for i in iterations))
    state = {k: (v.half() if half and v.is_floating_point() else v)
             for k, v in ckpt['model'].items()}
    payload = {'format': FORMAT, 'state_dict': state, 'config': net.to_dict(),
               'step': int(ckpt['step']), 'recipe': cfg.to_dict()}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save(payload, out_path)
    sha = sha256_file(out_path)
    meta = {'path': str(out_path), 'sha256': sha, 'step': int(ckpt['step']),
            'bytes': out_path.stat().st_size}
    if card is not None:
        full = {'name': out_path.stem, 'file': out_path.name, 'sha256': sha,
                'training_step': int(ckpt['step']), **card}
        tmp = out_path.with_suffix('.json.tmp')
        tmp.write_text(json.dumps(full, indent=1) + '\n')
        os.replace(tmp, out_path.with_suffix('.json'))
    return meta
