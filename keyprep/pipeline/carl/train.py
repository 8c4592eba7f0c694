"""Train CARL on synthetic pairs (``keyprep train carl``).

The paper's recipe (``paper_carl.md`` §5) on keyprep's synthesis engine:

* Pairs: :meth:`~keyprep.pipeline.synth.generator.Synthesizer.sample_pair` on the training
  label maps (the held-out ``training_seg_14``-``16`` never enter training), two different
  anatomies, or with probability ``p_same_anatomy`` one anatomy under two independent
  deformations; skull removed and the background zeroed (keyprep registers brains); each
  image on its own grid, centred on its brain plus an independent random translation of up
  to ``synth.translation_mm`` per axis (+-20 mm: relative shifts up to 40 mm, which
  displacement-only networks handle badly and CARL's attention by construction), with the
  synthesiser's rotations, scalings and smooth deformations. Contrasts: independent random
  ones, or with probability ``p_same_contrast`` one named contrast for both images.
  Intensities normalised as :func:`~.network.register_arrays` does (percentiles of the brain
  to [0, 1]).
* Loss per step, both directions of the pair: ``LNCC(A o phi_AB, B) + LNCC(B o phi_BA, A) +
  1.5 reg``, reg = diffusion for ``diffusion_steps`` steps, then GradICON (a fresh Adam at the
  switch, as the authors' code). ``similarity='lncc2'`` (the CPU recipe) squares the local
  correlation so that pairs of different contrasts are usable; ``'lncc'`` is the paper's.
* Adam, learning rate warmed up over ``warmup`` steps at the start of each phase, then
  constant (no schedule, as the paper).

Every step's randomness comes from ``seed * 1_000_003 + step`` (the pair) and a device
generator of the same seed (GradICON's jitter), so a run resumed from ``checkpoint.pt``
(written atomically, every ``checkpoint_every`` steps and when stopping) repeats exactly the
steps it would have made. Curves: ``train_log.tsv`` (every step) and ``val_log.tsv``
(held-out pairs registered through :func:`~.network.register_arrays`, the engine's path:
structure Dice after warping the moving labels, % of folding voxels in the fixed brain,
inverse-consistency error, seconds).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..contrast import apply_contrast_transfer
from ..resources import PRECISIONS, autocast
from ..synth.generator import CONTRASTS, LabelMap, SynthConfig, Synthesizer, identity_grid, \
    sample_field
from ..synth.labels import OUTPUT_LABELS
from ..synth.train import HELD_OUT, _atomic_save, dice_per_class, load_training_maps
from .losses import LAMBDA, folding_fraction, pair_loss
from .network import FORMAT, PRESETS, CarlConfig, CarlNet, register_arrays

__all__ = ['CarlTrainConfig', 'RECIPES', 'Trainer', 'train', 'export_weights',
           'TRAIN_LOG_HEADER']

TRAIN_LOG_HEADER = 'step\tphase\tloss\tsim\treg\tlr\tsynth_s\tstep_s'


def _default_synth() -> SynthConfig:
    return SynthConfig(translation_mm=20.0, skull_strip_prob=1.0, rotation_deg=10.0,
                       scaling=0.08, shear=0.01, nonlin_std_mm=3.0)


@dataclass(frozen=True)
class CarlTrainConfig:
    model: CarlConfig = field(default_factory=CarlConfig)
    synth: SynthConfig = field(default_factory=_default_synth)
    steps: int = 20000
    diffusion_steps: int = 500
    lr: float = 2e-4
    warmup: int = 50
    lam: float = LAMBDA
    sigma: float = 4.0
    similarity: str = 'lncc2'  # 'lncc' (the paper's) | 'lncc2' (squared, any contrasts)
    p_same_anatomy: float = 0.2
    p_same_contrast: float = 0.5
    p_cross_contrast: float = 0.0  # of the other pairs: two different named contrasts
    seed: int = 1234
    checkpoint_every: int = 25
    val_every: int = 250
    val_translation_mm: float = 15.0
    val_symmetric: bool = False  # validate the symmetrised export (the engine's default)
    #: validate cross-contrast pairs as the engine registers them (``--carl-contrast-transfer
    #: auto``: both images re-rendered from their labels in the fixed image's contrast; here
    #: from the synthetic labels, where the engine uses the label network's)
    val_contrast_transfer: bool = False
    precision: str = 'fp32'
    dice_weight: float = 0.0
    label_level: int = 1
    init_from: str | None = None

    def __post_init__(self):
        m = self.model
        if tuple(self.synth.shape) != tuple(m.shape) or self.synth.res_mm != m.res_mm:
            object.__setattr__(self, 'synth', replace(self.synth, shape=tuple(m.shape),
                                                      res_mm=m.res_mm))
        if self.similarity not in ('lncc', 'lncc2'):
            raise ValueError(f"similarity must be 'lncc' or 'lncc2', not {self.similarity!r}")
        if not (self.dice_weight >= 0 and math.isfinite(self.dice_weight)):
            raise ValueError(f'dice_weight must be a finite number >= 0, not {self.dice_weight}')
        if self.precision not in PRECISIONS:
            raise ValueError(f'precision must be one of {PRECISIONS}, not {self.precision!r}')

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> 'CarlTrainConfig':
        d = dict(d)
        d['model'] = CarlConfig.from_dict(d['model'])
        d['synth'] = SynthConfig.from_dict(d['synth'])
        return cls(**d)


#: ``cpu``: the ``cpu`` network (96^3 at 2 mm, attention at 24^3), 500 diffusion steps, lr
#: 2e-4 (a CPU run is short), squared LNCC on pairs of independent contrasts. ``paper``: the
#: paper-size network (176^3 at 1.25 mm, Xi at 44^3, 128 features, GradICON's U-Nets) with the
#: paper's schedule (1500 diffusion steps, lr 1e-4, 50 000 steps in all), for a GPU.
#: ``cpu-dice``: the ``cpu`` network with keyprep's label term (``dice_weight`` 1: soft Dice of
#: the synthetic pairs' own labels, both directions, next to LNCC and GradICON, compared at
#: half the working resolution (``label_level`` 1); not in the paper), GradICON from the first
#: step: meant to continue a GradICON-trained network
#: (``init_from``, the CLI's ``--init-from``) on fresh pairs (another seed).
#: ``cpu-postaffine``: ``cpu-dice`` in the regime the engine deploys CARL in, after keyprep's
#: affine: each image centred on its brain with at most 3 mm, 3 degrees and 4 % scaling of
#: its own (instead of 20 mm, 10 degrees, 8 %), a quarter of the pairs in two different named
#: contrasts (T2, PD or FLAIR against T1, ...: the pairs on which ``cpu-dice`` fell below its
#: affine start), lr 1e-4, validated every 125 steps on untranslated held-out pairs through
#: the symmetrised export (the engine's default); meant to fine-tune a ``cpu-dice`` network
#: (``--init-from``, a training checkpoint or a weights file such as the shipped one).
#: ``cpu-deployed``: ``cpu-postaffine``'s pose, on the pairs the engine now gives the network:
#: two images of one contrast (across contrasts the engine paints both in the fixed image's
#: contrast from their labels, ``--carl-contrast-transfer auto``), and a stronger label term,
#: compared at the working resolution (``dice_weight`` 2, ``label_level`` 0: the network's
#: warps were about half as rough as antsSyN's, and the label term at half resolution
#: rewards only coarse alignment); meant to fine-tune the shipped network (``--init-from``).
#: Its validation re-renders the cross-contrast held-out pairs as the engine does
#: (``val_contrast_transfer``; the trainer uses the synthetic labels, the engine the label
#: network's).
RECIPES: dict[str, CarlTrainConfig] = {
    'cpu': CarlTrainConfig(),
    'paper': CarlTrainConfig(model=PRESETS['paper'], steps=51_500, diffusion_steps=1500,
                             lr=1e-4, checkpoint_every=100, val_every=1000),
    'cpu-dice': CarlTrainConfig(dice_weight=1.0, diffusion_steps=0, seed=4321),
    'cpu-postaffine': CarlTrainConfig(
        synth=SynthConfig(translation_mm=3.0, skull_strip_prob=1.0, rotation_deg=3.0,
                          scaling=0.04, shear=0.01, nonlin_std_mm=3.0),
        dice_weight=1.0, diffusion_steps=0, lr=1e-4, seed=2468, p_cross_contrast=0.5,
        val_translation_mm=0.0, val_symmetric=True, val_every=125),
    'cpu-deployed': CarlTrainConfig(
        synth=SynthConfig(translation_mm=3.0, skull_strip_prob=1.0, rotation_deg=3.0,
                          scaling=0.04, shear=0.01, nonlin_std_mm=3.0),
        dice_weight=2.0, label_level=0, diffusion_steps=0, lr=1e-4, seed=97531,
        p_same_contrast=1.0, val_translation_mm=0.0, val_symmetric=True,
        val_contrast_transfer=True, val_every=125),
}


def _dice_mean(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean hard Dice over the structures (not background) present in either map."""
    return float(np.nanmean(dice_per_class(pred.cpu(), target.cpu(), len(OUTPUT_LABELS))[1:]))


def warp_labels(labels: torch.Tensor, disp: torch.Tensor) -> torch.Tensor:
    """Labels ``[X, Y, Z]`` (moving) pulled back by a displacement ``[3, X, Y, Z]`` (voxels,
    ``moving(x + d(x))``), nearest neighbour, background outside."""
    coords = identity_grid(labels.shape, labels.device) + disp.to(labels.device)
    out = sample_field(labels[None, None].float(), coords[None], mode='nearest')
    return out[0, 0].round().long()


class Trainer:
    """Model, optimiser, data and one step (exposed for tests and scripts)."""

    def __init__(self, train_maps: Sequence[LabelMap], cfg: CarlTrainConfig,
                 device: str | torch.device = 'cpu', held_out: Sequence[LabelMap] = ()):
        self.cfg = cfg
        self.dev = torch.device(device)
        self.train_maps = list(train_maps)
        self.held_out = list(held_out)
        torch.manual_seed(cfg.seed)
        self.model = CarlNet(cfg.model).to(self.dev)
        self.optimiser = self.new_optimiser(0)
        self.synth = Synthesizer(self.train_maps, cfg.synth, device=self.dev)
        self.val_items: list[dict] | None = None

    def phase(self, step: int) -> str:
        return 'diffusion' if step < self.cfg.diffusion_steps else 'gradicon'

    def lr(self, step: int) -> float:
        cfg = self.cfg
        start = 0 if step < cfg.diffusion_steps else cfg.diffusion_steps
        return cfg.lr * min(1.0, (step - start + 1) / max(1, cfg.warmup))

    def new_optimiser(self, step: int) -> torch.optim.Optimizer:
        opt = torch.optim.Adam(self.model.parameters(), lr=self.lr(step))
        for group in opt.param_groups:
            group['phase'] = self.phase(step)
        return opt

    # -------------------------------------------------------------- data
    @staticmethod
    def _brain(sample: dict) -> torch.Tensor:
        """The brain-masked image of a synthetic sample, normalised like register_arrays."""
        from ..keymorph.network import robust_normalise

        mask = (sample['labels'] > 0).float()[:, None]
        return robust_normalise(sample['image'] * mask, mask)

    def pair_batch(self, step: int) -> dict:
        """The pair of ``step`` (deterministic in ``seed`` and ``step``)."""
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        same_anatomy = float(torch.rand((), generator=gen)) < cfg.p_same_anatomy
        contrast, contrasts = None, None
        names = sorted(CONTRASTS)
        if float(torch.rand((), generator=gen)) < cfg.p_same_contrast:
            contrast = names[int(torch.randint(0, len(names), (), generator=gen))]
        # drawn only when the recipe asks for it, so older recipes resume on the same pairs
        elif cfg.p_cross_contrast > 0 and float(torch.rand((), generator=gen)) < cfg.p_cross_contrast:
            i = int(torch.randint(0, len(names), (), generator=gen))
            j = int(torch.randint(0, len(names) - 1, (), generator=gen))
            contrasts = (names[i], names[j + (j >= i)])  # (fixed, moving), different
        self.synth.config = replace(cfg.synth, contrast=contrast)
        try:
            pair = self.synth.sample_pair(gen, same_anatomy=same_anatomy, contrasts=contrasts)
        finally:
            self.synth.config = cfg.synth
        label = contrast or ('<-'.join(contrasts) if contrasts else 'random')
        return {'a': self._brain(pair['moving']), 'b': self._brain(pair['fixed']),
                'la': pair['moving']['labels'], 'lb': pair['fixed']['labels'],
                'maps': pair['maps'], 'contrast': label}

    @staticmethod
    def onehot(labels: torch.Tensor) -> torch.Tensor:
        """Label indices ``[B, *shape]`` -> one-hot ``[B, C, *shape]`` (float32)."""
        n = len(OUTPUT_LABELS)
        return torch.nn.functional.one_hot(labels.long(), n).movedim(-1, 1).float()

    # -------------------------------------------------------------- step
    def step(self, step: int, batch: dict | None = None) -> dict:
        cfg = self.cfg
        batch = batch if batch is not None else self.pair_batch(step)
        a, b = batch['a'].to(self.dev), batch['b'].to(self.dev)
        moving, fixed = torch.cat([a, b]), torch.cat([b, a])
        self.model.train()
        for group in self.optimiser.param_groups:
            group['lr'] = self.lr(step)
        gen = torch.Generator(device=self.dev).manual_seed(cfg.seed * 1_000_003 + step)
        with autocast(self.dev, cfg.precision):
            u = self.model(moving, fixed)
        labels = {}
        if cfg.dice_weight > 0:
            la, lb = self.onehot(batch['la'].to(self.dev)), self.onehot(batch['lb'].to(self.dev))
            labels = {'onehot_moving': torch.cat([la, lb]), 'onehot_fixed': torch.cat([lb, la]),
                      'dice_weight': cfg.dice_weight, 'label_level': cfg.label_level}
        terms = pair_loss(moving, fixed, u.float(), phase=self.phase(step), lam=cfg.lam,
                          sigma=cfg.sigma, squared=cfg.similarity == 'lncc2', generator=gen,
                          **labels)
        self.optimiser.zero_grad(set_to_none=True)
        terms['loss'].backward()
        self.optimiser.step()
        out = {'loss': float(terms['loss'].detach()), 'sim': float(terms['sim']),
               'reg': float(terms['reg'])}
        if 'dice' in terms:
            out['dice'] = float(terms['dice'])
        return out

    # -------------------------------------------------------------- validation
    def _validation_set(self) -> list[dict]:
        """Fixed held-out pairs (anatomy a fixed, b moving, named contrasts), each image
        translated independently (seeded, up to ``val_translation_mm``); cross-contrast pairs
        re-rendered as the engine's contrast transfer ``auto`` does when
        ``val_contrast_transfer``."""
        cfg = self.cfg
        maps = self.held_out
        if len(maps) < 2:
            return []
        base = replace(cfg.synth.evaluation(), skull_strip_prob=1.0,
                       translation_mm=cfg.val_translation_mm)
        plan = [(0, 1, 't1', 't1'), (1, 2, 't2', 't1'), (2, 0, 't1', 'pd')]
        items = []
        for k, (a, b, ca, cb) in enumerate(plan):
            if max(a, b) >= len(maps):
                continue
            sa = Synthesizer(maps, replace(base, contrast=ca), device='cpu').synthesize(
                a, torch.Generator().manual_seed(50_000 + k))
            sb = Synthesizer(maps, replace(base, contrast=cb), device='cpu').synthesize(
                b, torch.Generator().manual_seed(60_000 + k))
            fixed = (sa['image'] * (sa['labels'] > 0)).numpy()
            moving = (sb['image'] * (sb['labels'] > 0)).numpy()
            if cfg.val_contrast_transfer and ca != cb:
                fixed, moving = apply_contrast_transfer(fixed, moving, sa['labels'].numpy(),
                                                        sb['labels'].numpy(), 'both')
            items.append({'name': f'{maps[a].name}<-{maps[b].name} {ca}<-{cb}',
                          'fixed': fixed, 'moving': moving,
                          'fixed_labels': sa['labels'], 'moving_labels': sb['labels']})
        return items

    def evaluate(self) -> dict:
        """Held-out pairs through :func:`register_arrays` (the engine's path): mean structure
        Dice (before: ``dice_identity``), % folding voxels in the fixed brain, inverse
        consistency (voxels), seconds per pair."""
        if self.val_items is None:
            self.val_items = self._validation_set()
        if not self.val_items:
            return {}
        res_mm = self.cfg.model.res_mm
        rows: dict[str, list[float]] = {}
        for it in self.val_items:
            out = register_arrays(it['fixed'], it['moving'], self.model, device=self.dev,
                                  spacing_mm=(res_mm,) * 3, precision=self.cfg.precision,
                                  symmetric=self.cfg.val_symmetric)
            disp = torch.as_tensor(out['disp_fwd'])
            warped = warp_labels(it['moving_labels'], disp)
            brain = (it['fixed_labels'] > 0).float()
            rows.setdefault('dice', []).append(_dice_mean(warped, it['fixed_labels']))
            rows.setdefault('dice_identity', []).append(
                _dice_mean(it['moving_labels'], it['fixed_labels']))
            rows.setdefault('fold_pct', []).append(100 * folding_fraction(disp[None], brain))
            rows.setdefault('ic_vox', []).append(out['inverse_consistency_vox'])
            rows.setdefault('seconds', []).append(out['timings']['total_s'])
        result = {k: float(np.mean(v)) for k, v in rows.items()}
        result['per_pair'] = {it['name']: round(d, 4) for it, d in zip(self.val_items,
                                                                        rows['dice'])}
        return result


# ---------------------------------------------------------------------------- the loop
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
    return 'nan' if v != v else f'{v:.5g}'


def train(label_maps: str | Path | None, out_dir: str | Path,
          cfg: CarlTrainConfig = CarlTrainConfig(), device: str = 'cpu',
          held_out: Sequence[str] = HELD_OUT, extra_maps: Sequence[LabelMap] = (),
          maps: tuple[Sequence[LabelMap], Sequence[LabelMap]] | None = None, log=print,
          max_minutes: float | None = None) -> Path:
    """Train (or resume from ``<out_dir>/checkpoint.pt``) CARL; returns the checkpoint path.

    ``label_maps``: folder of SynthSeg label maps or a label-map bundle (``held_out`` names
    kept for validation), or ``maps=(train, held_out)`` given directly."""
    dev = torch.device(device)
    if maps is not None:
        train_maps, test_maps = list(maps[0]), list(maps[1])
    else:
        train_maps, test_maps = load_training_maps(label_maps, held_out)
    leaked = sorted({m.name for m in train_maps} & set(held_out))
    if leaked:
        raise ValueError(f'held-out label maps among the training maps: {leaked}')
    train_maps = train_maps + list(extra_maps)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log(f'training maps: {", ".join(m.name for m in train_maps)}')
    log(f'held-out maps: {", ".join(m.name for m in test_maps)}')
    trainer = Trainer(train_maps, cfg, dev, test_maps)
    ckpt_path = out / 'checkpoint.pt'
    step = 0
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=dev, weights_only=True)
        if CarlTrainConfig.from_dict(ckpt['config']).model != cfg.model:
            raise ValueError(f'{ckpt_path} was trained with another CARL architecture')
        trainer.model.load_state_dict(ckpt['model'])
        step = int(ckpt['step'])
        trainer.optimiser = trainer.new_optimiser(step)
        trainer.optimiser.load_state_dict(ckpt['optimiser'])
        log(f'resumed from {ckpt_path} at step {step} ({trainer.phase(step)})')
        _truncate_logs(out, step)
    elif cfg.init_from:
        init = torch.load(cfg.init_from, map_location=dev, weights_only=True)
        if 'format' in init:  # an exported weights file (the shipped one, for example)
            from .network import load_carl

            net, meta = load_carl(cfg.init_from, dev)
            if net.cfg != cfg.model:
                raise ValueError(f'{cfg.init_from} holds another CARL architecture')
            state, what = net.state_dict(), f'weights file, sha256 {meta["sha256"][:12]}'
        else:
            if CarlTrainConfig.from_dict(init['config']).model != cfg.model:
                raise ValueError(f'{cfg.init_from} was trained with another CARL architecture')
            state, what = init['model'], 'training checkpoint'
        trainer.model.load_state_dict(state)
        log(f'network initialised from {cfg.init_from} ({what}, its step '
            f'{int(init["step"])}); fresh optimiser, step 0')
    (out / 'train_config.json').write_text(json.dumps(cfg.to_dict(), indent=1))
    tlog, vlog = out / 'train_log.tsv', out / 'val_log.tsv'
    header = TRAIN_LOG_HEADER + ('\tdice' if cfg.dice_weight > 0 else '')
    if not tlog.exists():
        tlog.write_text(header + '\n')
    t_start = time.time()

    def save():
        _atomic_save({'model': trainer.model.state_dict(),
                      'optimiser': trainer.optimiser.state_dict(), 'step': step,
                      'phase': trainer.phase(max(step - 1, 0)), 'config': cfg.to_dict(),
                      'train_maps': [m.name for m in train_maps],
                      'held_out': [m.name for m in test_maps]}, ckpt_path)

    def validate():
        res = trainer.evaluate()
        if not res:
            return
        keys = ['dice', 'dice_identity', 'fold_pct', 'ic_vox', 'seconds']
        if not vlog.exists():
            vlog.write_text('step\t' + '\t'.join(keys) + '\tper_pair\n')
        with open(vlog, 'a') as fh:
            fh.write(f'{step}\t' + '\t'.join(_fmt(res[k]) for k in keys)
                     + '\t' + json.dumps(res['per_pair']) + '\n')
        log(f'step {step} validation: ' + json.dumps({k: round(res[k], 4) for k in keys}))

    if step == 0 and cfg.init_from and cfg.val_every:
        validate()  # the starting network's score on this recipe's validation pairs
    while step < cfg.steps:
        if trainer.optimiser.param_groups[0].get('phase') != trainer.phase(step):
            trainer.optimiser = trainer.new_optimiser(step)  # fresh Adam for GradICON
            log(f'step {step}: {trainer.phase(step)} phase, new optimiser')
        t0 = time.time()
        batch = trainer.pair_batch(step)
        t1 = time.time()
        terms = trainer.step(step, batch)
        t2 = time.time()
        if not math.isfinite(terms['loss']):  # stop before a bad step is checkpointed
            raise FloatingPointError(f'non-finite loss at step {step + 1}: the last checkpoint '
                                     f'({ckpt_path}) is intact; resume with a lower --lr')
        step += 1
        row = [step, trainer.phase(step - 1), terms['loss'], terms['sim'], terms['reg'],
               trainer.lr(step - 1), t1 - t0, t2 - t1]
        if cfg.dice_weight > 0:
            row.append(terms['dice'])
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


def export_weights(checkpoint: str | Path, out_path: str | Path, half: bool = True,
                   recipe: str | None = None) -> dict:
    """Write the weights file :func:`~.network.load_carl` reads: ``format``, ``state_dict``
    (float16 by default), ``config`` (the network's), ``step``, ``phase`` and ``recipe`` (the
    training configuration, with the recipe's name when given). Returns path, sha256, step
    and size."""
    from ..weights import sha256_file

    ckpt = torch.load(checkpoint, map_location='cpu', weights_only=True)
    cfg = CarlTrainConfig.from_dict(ckpt['config'])
    state = {k: (v.half() if half and v.is_floating_point() else v)
             for k, v in ckpt['model'].items()}
    recipe_d = cfg.to_dict()
    recipe_d.pop('model')
    recipe_d['name'] = recipe
    payload = {'format': FORMAT, 'state_dict': state, 'config': cfg.model.to_dict(),
               'step': int(ckpt['step']), 'phase': ckpt.get('phase'), 'recipe': recipe_d,
               'train_maps': list(ckpt.get('train_maps', [])),
               'held_out': list(ckpt.get('held_out', []))}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save(payload, out_path)
    return {'path': str(out_path), 'sha256': sha256_file(out_path), 'step': int(ckpt['step']),
            'bytes': out_path.stat().st_size}
