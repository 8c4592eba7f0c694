"""Train the label network on synthetic images only (``keyprep train synthseg``).

Every step draws a fresh batch from :class:`~.generator.Synthesizer`, seeded by
``(seed, step)``, so an interrupted run resumed from its checkpoint sees exactly the batches it
would have seen. Curves go to ``train_log.tsv`` (every step) and ``val_log.tsv`` (held-out
synthetic volumes, every ``val_every`` steps); the checkpoint is written atomically.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..resources import PRECISIONS, autocast
from .generator import LabelMap, SynthConfig, Synthesizer, load_label_map
from .labels import OUTPUT_LABELS
from .unet import UNet3D, UNetConfig

__all__ = ['TrainConfig', 'RECIPES', 'soft_dice_loss', 'dice_per_class', 'train', 'train_step',
           'load_training_maps', 'HELD_OUT', 'export_weights']

#: SynthSeg training maps kept out of training for evaluation.
HELD_OUT: tuple[str, ...] = ('training_seg_14', 'training_seg_15', 'training_seg_16')


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 20000
    batch_size: int = 1
    lr: float = 1e-3
    lr_final: float = 1e-4
    warmup: int = 50
    dice_weight: float = 1.0
    ce_weight: float = 1.0
    seed: int = 1234
    checkpoint_every: int = 50
    val_every: int = 250
    synth: SynthConfig = field(default_factory=SynthConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    #: unused since validation goes through the deployment path (kept to read old checkpoints)
    val_shape: tuple[int, int, int] = (96, 112, 96)
    #: learning-rate schedule: warm-up over ``warmup`` steps from ``restart_step``, then held
    #: at ``lr`` for ``hold_fraction`` of the remaining steps, then a cosine to ``lr_final`` at
    #: ``steps`` (``hold_fraction=0``, ``restart_step=0``: the plain warm-up + cosine)
    hold_fraction: float = 0.0
    restart_step: int = 0
    #: validation: the held-out maps x these contrasts x with/without skull, at 1 mm, labelled
    #: by ``LabelNetwork.predict`` with this pose mode (:mod:`.validation`)
    val_contrasts: tuple[str, ...] = ('t1', 't2', 'pd', 'flair')
    val_pose: str = 'auto'
    #: the 1 mm grid the validation volumes are synthesised on (SynthSeg's cropped 1 mm field
    #: of view; tests use a small one)
    val_grid: tuple[int, int, int] = (176, 208, 176)
    #: 'bf16' runs the forward pass under bfloat16 autocast (about 2x faster on CPUs with
    #: AVX512-BF16 or AMX, and on recent GPUs; losses and weights stay float32). The command
    #: line's default ('auto') picks it where the hardware runs it natively.
    precision: str = 'fp32'

    def to_dict(self) -> dict:
        d = asdict(self)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> 'TrainConfig':
        d = dict(d)
        d['synth'] = SynthConfig.from_dict(d['synth'])
        d['unet'] = UNetConfig(**d['unet'])
        d['val_shape'] = tuple(d['val_shape'])
        if 'val_contrasts' in d:
            d['val_contrasts'] = tuple(d['val_contrasts'])
        if 'val_grid' in d:
            d['val_grid'] = tuple(d['val_grid'])
        d.setdefault('precision', 'fp32')  # checkpoints written before the option were fp32
        if d['precision'] not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {d['precision']!r}")
        return cls(**d)


#: Named recipes: the CPU one is what ships; the GPU one is SynthSeg-sized.
RECIPES: dict[str, TrainConfig] = {
    # translations of +-20 mm keep the brain in the 64^3 crop (+26 % brain voxels per step);
    # the rate is held high while the loss falls and decays over the last 20 %
    'cpu-2mm': TrainConfig(steps=25_000, lr=8e-4, warmup=200, hold_fraction=0.8, val_every=1000,
                           synth=SynthConfig(translation_mm=20.0)),
    'gpu-1mm': TrainConfig(
        steps=100_000, batch_size=1, lr=1e-4, lr_final=1e-5, checkpoint_every=500, val_every=2000,
        synth=SynthConfig(shape=(160, 160, 160), res_mm=1.0, max_iso_res_mm=4.0, max_slice_mm=9.0,
                          nonlin_std_mm=4.0),
        unet=UNetConfig(features=24, levels=5, max_features=384), val_shape=(192, 224, 192)),
}


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """1 - mean soft Dice over classes (``logits [B, C, ...]``, ``target [B, ...]`` indices)."""
    probs = logits.softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(probs.dtype)
    dims = (0,) + tuple(range(2, probs.ndim))
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    return 1 - ((2 * inter + eps) / (denom + eps)).mean()


def dice_per_class(pred: torch.Tensor, target: torch.Tensor, n_classes: int) -> np.ndarray:
    """Hard Dice per class (NaN where the class is absent from both)."""
    out = np.full(n_classes, np.nan)
    for c in range(n_classes):
        p, t = pred == c, target == c
        denom = int(p.sum() + t.sum())
        if denom:
            out[c] = 2 * int((p & t).sum()) / denom
    return out


def load_training_maps(folder: str | Path, held_out: Sequence[str] = HELD_OUT
                       ) -> tuple[list[LabelMap], list[LabelMap]]:
    """Read every ``*.nii.gz`` label map of ``folder`` (or the maps of a label-map bundle file,
    :mod:`.bundle`): (training maps, held-out maps)."""
    folder = Path(folder)
    if folder.is_file():
        from .bundle import load_bundle

        maps = load_bundle(folder).maps
    else:
        files = sorted(folder.glob('*.nii.gz'))
        if not files:
            raise FileNotFoundError(f'no label maps (*.nii.gz) in {folder}')
        maps = [load_label_map(f) for f in files]
    train = [m for m in maps if m.name not in held_out]
    test = [m for m in maps if m.name in held_out]
    return train, test


def _lr(cfg: TrainConfig, step: int) -> float:
    """Learning rate of ``step`` (0-based): warm-up, hold, cosine (see :class:`TrainConfig`).

    >>> cfg = TrainConfig(steps=1000, lr=1e-3, lr_final=1e-4, warmup=10, hold_fraction=0.8,
    ...                   restart_step=500)
    >>> [round(_lr(cfg, s), 6) for s in (500, 509, 510, 899, 1000)]
    [0.0001, 0.001, 0.001, 0.001, 0.0001]
    """
    s0 = cfg.restart_step
    if step < s0 + cfg.warmup:
        return cfg.lr * (max(0, step - s0) + 1) / cfg.warmup
    decay_start = max(s0 + cfg.warmup, s0 + cfg.hold_fraction * (cfg.steps - s0))
    if step < decay_start:
        return cfg.lr
    t = min(1.0, (step - decay_start) / max(1, cfg.steps - decay_start))
    return cfg.lr_final + 0.5 * (cfg.lr - cfg.lr_final) * (1 + math.cos(math.pi * t))


def train_step(model: UNet3D, optimiser: torch.optim.Optimizer, batch: dict, cfg: TrainConfig,
               device: torch.device) -> dict[str, float]:
    """One optimisation step on a synthetic batch; returns the loss terms."""
    model.train()
    image = batch['image'].to(device)
    target = batch['labels'].to(device)
    with autocast(device, cfg.precision):
        logits = model(image)
    logits = logits.float()
    dice = soft_dice_loss(logits, target)
    ce = F.cross_entropy(logits, target)
    loss = cfg.dice_weight * dice + cfg.ce_weight * ce
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()
    return {'loss': float(loss.detach()), 'dice_loss': float(dice.detach()), 'ce': float(ce.detach())}


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + '.tmp')
    torch.save(obj, tmp)
    os.replace(tmp, path)


def validation_network(model: UNet3D, cfg: TrainConfig, step: int, device) -> 'LabelNetwork':
    """The model in training, wrapped as the labeller users run (same inference path)."""
    from .labeller import LabelNetwork

    return LabelNetwork.from_model(model, cfg.synth.res_mm, cfg.synth.shape, step=step,
                                   device=str(device), precision=cfg.precision)


@torch.no_grad()
def evaluate(model: UNet3D, volumes: list, cfg: TrainConfig, step: int, device, log=None) -> dict:
    """Held-out mean structure Dice through :meth:`LabelNetwork.predict` (deployment path)."""
    from .validation import score_volumes

    was_training = model.training
    model.eval()
    try:
        return score_volumes(validation_network(model, cfg, step, device), volumes,
                             pose=cfg.val_pose, log=log)
    finally:
        model.train(was_training)


def train(label_maps: str | Path, out_dir: str | Path, cfg: TrainConfig = TrainConfig(),
          device: str = 'cpu', held_out: Sequence[str] = HELD_OUT, extra_maps: Sequence[LabelMap] = (),
          log=print, max_minutes: float | None = None) -> Path:
    """Train (or resume) the label network; returns the checkpoint path."""
    dev = torch.device(device)
    train_maps, test_maps = load_training_maps(label_maps, held_out)
    train_maps = train_maps + list(extra_maps)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log(f'training maps: {", ".join(m.name for m in train_maps)}')
    log(f'held-out maps: {", ".join(m.name for m in test_maps)}')
    synth = Synthesizer(train_maps, cfg.synth, device=dev)
    torch.manual_seed(cfg.seed)
    model = UNet3D(cfg.unet).to(dev)
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    ckpt_path = out / 'checkpoint.pt'
    step = 0
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=dev, weights_only=True)
        if TrainConfig.from_dict(ckpt['config']).unet != cfg.unet:
            raise ValueError(f'{ckpt_path} was trained with another architecture')
        model.load_state_dict(ckpt['model'])
        optimiser.load_state_dict(ckpt['optimiser'])
        step = int(ckpt['step'])
        log(f'resumed from {ckpt_path} at step {step}')
        for name in ('train_log.tsv', 'val_log.tsv'):  # drop rows written after the checkpoint
            path = out / name
            if path.exists():
                rows = path.read_text().splitlines()
                kept = rows[:1] + [r for r in rows[1:] if r and int(r.split('\t')[0]) <= step]
                path.write_text('\n'.join(kept) + '\n')
    (out / 'train_config.json').write_text(json.dumps(cfg.to_dict(), indent=1))
    if test_maps and cfg.val_every:
        from .validation import heldout_volumes

        val_items = heldout_volumes(test_maps, contrasts=cfg.val_contrasts, shape=cfg.val_grid)
        log(f'validation set: {len(val_items)} held-out volumes at 1 mm')
    else:
        val_items = []
    tlog = out / 'train_log.tsv'
    vlog = out / 'val_log.tsv'
    if not tlog.exists():
        tlog.write_text('step\tloss\tdice_loss\tce\tlr\tsynth_s\tstep_s\n')
    if not vlog.exists():
        vlog.write_text('step\tval_dice\tworst\tval_s\n')
    t_start = time.time()

    def save():
        _atomic_save({'model': model.state_dict(), 'optimiser': optimiser.state_dict(), 'step': step,
                      'config': cfg.to_dict(), 'train_maps': [m.name for m in train_maps],
                      'held_out': [m.name for m in test_maps]}, ckpt_path)

    while step < cfg.steps:
        for group in optimiser.param_groups:
            group['lr'] = _lr(cfg, step)
        t0 = time.time()
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        batch = synth.sample(cfg.batch_size, gen)
        t1 = time.time()
        terms = train_step(model, optimiser, batch, cfg, dev)
        t2 = time.time()
        step += 1
        with open(tlog, 'a') as fh:
            fh.write(f"{step}\t{terms['loss']:.5f}\t{terms['dice_loss']:.5f}\t{terms['ce']:.5f}\t"
                     f"{_lr(cfg, step - 1):.3g}\t{t1 - t0:.3f}\t{t2 - t1:.3f}\n")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save()
        if val_items and (step % cfg.val_every == 0 or step == cfg.steps):
            tv = time.time()
            res = evaluate(model, val_items, cfg, step, dev)
            worst = ';'.join(f'{n}={d:.3f}' for n, d in res['worst'])
            with open(vlog, 'a') as fh:
                fh.write(f"{step}\t{res['mean_dice']:.4f}\t{worst}\t{time.time() - tv:.0f}\n")
            (out / f'val_step{step}.json').write_text(json.dumps(res, indent=1))
            # the weights this number belongs to (model only, not committed): what to export
            _atomic_save({'model': model.state_dict(), 'step': step, 'config': cfg.to_dict(),
                          'val_dice': res['mean_dice']}, out / 'validated.pt')
            log(f"step {step}: loss {terms['loss']:.4f}, held-out Dice {res['mean_dice']:.4f} "
                f"(worst {worst})")
        if max_minutes is not None and (time.time() - t_start) > 60 * max_minutes:
            save()
            log(f'stopping after {max_minutes} min at step {step} (resume to continue)')
            break
    return ckpt_path


def export_weights(checkpoint: str | Path, out_path: str | Path, half: bool = True) -> dict:
    """Write the shipped weights (state dict, float16 by default) and return their metadata."""
    from ..weights import sha256_file

    ckpt = torch.load(checkpoint, map_location='cpu', weights_only=True)
    state = {k: (v.half() if half and v.is_floating_point() else v) for k, v in ckpt['model'].items()}
    cfg = TrainConfig.from_dict(ckpt['config'])
    payload = {'state_dict': state, 'unet': cfg.unet.to_dict(), 'res_mm': cfg.synth.res_mm,
               'labels': list(OUTPUT_LABELS), 'step': int(ckpt['step']),
               'crop_shape': list(cfg.synth.shape)}
    out_path = Path(out_path)
    _atomic_save(payload, out_path)
    sha = sha256_file(out_path)
    return {'path': str(out_path), 'sha256': sha, 'step': int(ckpt['step']),
            'bytes': out_path.stat().st_size}
