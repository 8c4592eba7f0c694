"""Train the KeyMorph keypoint detector on synthetic images (``keyprep train keymorph``).

Stages (``paper_keymorph.md`` §3), run one after the other by one command:

1. ``pretrain`` (§3.5, Eq. 12): one reference anatomy (the first training map) is synthesised
   at its canonical pose with a random contrast each step; ``N`` fixed random points inside its
   brain are the targets. The image is warped by a random affine (rotation, scaling, shear,
   translation, magnitudes ramped linearly from 0 to the full augmentation over
   ``pretrain_ramp`` steps) composed with an optional random diffeomorphism (stationary velocity
   field), the points are carried by the exact inverse, and the detector regresses them (MSE in
   KeyMorph's normalised frame). Without this the keypoints collapse to the centre.
2. ``supervised`` (§3.2): pairs of two *different* anatomies from
   :meth:`~keyprep.pipeline.synth.generator.Synthesizer.sample_pair` (``same_anatomy=False``),
   skull removed (keyprep registers brains) and independent random contrasts; the moving image
   is augmented by a random affine (rotation up to +-180 deg about each axis, scaling 0.8-1.2,
   shear +-0.1, translation). The aligner of each step is affine or TPS with ``lambda``
   log-uniform in [1e-3, 10] (KM-LogUnif), so one model serves rigid, affine and every TPS.
   Loss: soft Dice between the fixed one-hot labels and the moving one-hot labels warped
   bilinearly (on a grid ``loss_stride`` times coarser, both one-hots average-pooled).
   ``unsupervised`` (§3.3): image MSE or LNCC on *same-contrast* pairs (a fixed tissue contrast
   drawn per step), alternated step by step with the keypoint-consistency loss on same-anatomy
   pairs of different contrasts and poses (the expected moving keypoints are the fixed ones
   carried by the synthesiser's exact correspondence and the augmentation); or, with
   ``unsup_sim='mi'``, normalised mutual information on pairs of random contrasts.
   The spatial regularisers of Billot et al. (:mod:`.losses`) are switches with weights.

Every step's randomness comes from ``torch.Generator().manual_seed(seed * 1_000_003 + step)``
so a run resumed from its checkpoint (written atomically) sees exactly the batches it would
have seen. Curves: ``train_log.tsv`` (every step) and ``val_log.tsv`` (held-out anatomies:
hard Dice of rigid, affine and TPS registrations of fixed synthetic pairs at rotations of
0, 90 and 180 degrees, keypoint repeatability, heatmap statistics).
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

from ..synth.generator import (
    LabelMap, SynthConfig, Synthesizer, identity_grid, integrate_svf, sample_field,
)
from ..synth.labels import OUTPUT_LABELS
from ..synth.train import HELD_OUT, _atomic_save, dice_per_class, load_training_maps
from .aligners import apply_affine, fit_affine, fit_rigid, fit_tps
from .losses import (
    heatmap_statistics, kl_gaussian_loss, keypoint_spread, lncc_loss, mse_loss,
    mutual_information_loss, repulsion_loss, soft_dice_loss, to_normalised, variance_loss,
)
from .network import FORMAT, DetectorConfig, KeypointDetector, pair_weights, robust_normalise

__all__ = ['KeyMorphTrainConfig', 'RECIPES', 'Trainer', 'train', 'export_weights',
           'random_affine', 'TRAIN_LOG_HEADER']

N_LABELS = len(OUTPUT_LABELS)


@dataclass(frozen=True)
class KeyMorphTrainConfig:
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    synth: SynthConfig = field(default_factory=lambda: SynthConfig(translation_mm=10.0,
                                                                   skull_strip_prob=1.0))
    pretrain_steps: int = 1000
    steps: int = 20000  # after pretraining
    mode: str = 'supervised'  # 'supervised' | 'unsupervised'
    unsup_sim: str = 'mse'  # 'mse' | 'lncc' | 'mi'
    consistency_weight: float = 1.0  # unsupervised: keypoint-consistency steps (0: none)
    lr_pretrain: float = 3e-4
    lr: float = 1e-4
    lr_final: float = 1e-5
    lr_hold: float = 0.0  # fraction of the second stage at ``lr`` before the cosine decay
    warmup: int = 50
    seed: int = 1234
    checkpoint_every: int = 100
    val_every: int = 250
    # augmentation of the moving image (and the pretraining targets)
    rotation_deg: float = 180.0
    scaling: float = 0.2
    shear: float = 0.1
    translation_mm: float = 15.0
    rotation_ramp: int = 0  # second-stage steps to grow the rotation from the pretraining's
    # pretraining
    pretrain_map: int = 0
    pretrain_ramp: int = 400
    pretrain_rotation_deg: float | None = None  # None: rotation_deg
    pretrain_svf_mm: float = 3.0
    pretrain_svf_spacing_mm: float = 40.0
    # 'points': fixed random points of one reference anatomy (the paper's self-supervised
    # pretraining); 'centroids': the centroids of the 32 structures in each sample's own labels,
    # every training anatomy with random contrasts and poses (keypoint k -> structure k mod 32),
    # a target that is anatomically consistent across subjects
    pretrain_target: str = 'points'
    # aligners
    p_affine: float = 0.5
    lambda_range: tuple[float, float] = (1e-3, 10.0)
    tps_kernel: str = 'r2logr'
    loss_stride: int = 2
    # spatial regularisation (Billot et al.): weights 0 = off
    kl_weight: float = 0.0
    var_weight: float = 0.0
    rep_weight: float = 0.0
    rep_tau: float = 0.1
    var_form: str = 'fro'
    rep_form: str = 'log'
    # validation
    val_rotations: tuple[float, ...] = (0.0, 90.0, 180.0)
    val_lambda: float = 1.0
    val_pairs: int = 3  # 3: three anatomy pairs; 9: each with three contrast pairs

    def __post_init__(self):
        det = self.detector
        if tuple(self.synth.shape) != tuple(det.shape) or self.synth.res_mm != det.res_mm:
            object.__setattr__(self, 'synth', replace(self.synth, shape=tuple(det.shape),
                                                      res_mm=det.res_mm))
        if self.mode not in ('supervised', 'unsupervised'):
            raise ValueError(f"mode must be 'supervised' or 'unsupervised', not {self.mode!r}")
        if self.unsup_sim not in ('mse', 'lncc', 'mi'):
            raise ValueError(f'unknown unsupervised similarity {self.unsup_sim!r}')
        if self.pretrain_target not in ('points', 'centroids'):
            raise ValueError(f'unknown pretraining target {self.pretrain_target!r}')
        if self.val_pairs not in (3, 9):
            raise ValueError('val_pairs must be 3 or 9')
        if any(s % self.loss_stride for s in det.shape):
            raise ValueError('the detector shape must be divisible by loss_stride')

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> 'KeyMorphTrainConfig':
        d = dict(d)
        d['detector'] = DetectorConfig.from_dict(d['detector'])
        d['synth'] = SynthConfig.from_dict(d['synth'])
        for key in ('lambda_range', 'val_rotations'):
            d[key] = tuple(d[key])
        return cls(**d)

    @property
    def total_steps(self) -> int:
        return self.pretrain_steps + self.steps

    @property
    def spatial_reg(self) -> bool:
        return bool(self.kl_weight or self.var_weight or self.rep_weight)


#: The paper's spatial-regularisation weights (lambda_KL, lambda_var, lambda_rep), tau = 0.1.
PAPER_REG = {'kl_weight': 1.0, 'var_weight': 1e-2, 'rep_weight': 1e-3, 'rep_tau': 0.1}

#: ``cpu-2.5mm`` ships: 96^3 at 2.5 mm (240 mm field of view), strided stem, widths
#: 16-16-32-64-64-128, 12^3 heatmaps (20 mm cells), 0.85 M parameters. A curriculum for the
#: short CPU budget: pretraining rotations up to 60 deg (with up to 180 deg the keypoints
#: regressed to the centre within a few hundred steps, the MSE-optimal answer to an orientation
#: the network cannot yet tell), then the supervised rotation range grows from 60 to 180 deg
#: over 2000 steps. ``gpu-2mm`` is the paper's network and schedule: 128^3 at 2 mm (its 256 mm
#: field of view downsampled), widths 32...512, four poolings (8^3 heatmaps), 8.8 M parameters.
RECIPES: dict[str, KeyMorphTrainConfig] = {
    'cpu-2.5mm': KeyMorphTrainConfig(pretrain_steps=600, pretrain_ramp=300,
                                     pretrain_rotation_deg=60.0, rotation_ramp=2000),
    # training_diagnosis.md §5: structure-centroid pretraining on every training anatomy
    # (random contrasts, +-45 deg), then the Dice stage at +-45 deg (rotations beyond are the
    # pose search's), lr held for 80 % then cosine, 9 held-out validation pairs at 0 deg
    'cpu-2.5mm-centroids': KeyMorphTrainConfig(
        pretrain_target='centroids', pretrain_steps=3000, pretrain_ramp=500,
        pretrain_rotation_deg=45.0, pretrain_svf_mm=0.0, rotation_deg=45.0, rotation_ramp=0,
        steps=5000, lr=1e-4, lr_hold=0.8, val_rotations=(0.0,), val_pairs=9, val_every=500,
        checkpoint_every=100),
    'gpu-2mm-centroids': KeyMorphTrainConfig(
        detector=DetectorConfig(shape=(128, 128, 128), res_mm=2.0,
                                features=(32, 64, 64, 128, 128, 256, 256, 512),
                                pool_after=(2, 4, 6, 8), stem='conv'),
        pretrain_target='centroids', pretrain_steps=10_000, pretrain_ramp=1000,
        pretrain_rotation_deg=45.0, pretrain_svf_mm=0.0, rotation_deg=45.0, rotation_ramp=0,
        steps=30_000, lr=1e-4, lr_hold=0.8, val_rotations=(0.0,), val_pairs=9,
        checkpoint_every=250, val_every=2000, loss_stride=1),
    'gpu-2mm': KeyMorphTrainConfig(
        detector=DetectorConfig(shape=(128, 128, 128), res_mm=2.0,
                                features=(32, 64, 64, 128, 128, 256, 256, 512),
                                pool_after=(2, 4, 6, 8), stem='conv'),
        pretrain_steps=10_000, steps=64_000, pretrain_ramp=3000, checkpoint_every=500,
        val_every=2000, loss_stride=1),
}

TRAIN_LOG_HEADER = ('step\tstage\tloss\tsim\tkl\tvar\trep\taligner\tlambda\tlr\terr_mm\tspread_mm'
                    '\tsynth_s\tstep_s')


# ---------------------------------------------------------------------------- geometry helpers
def random_affine(gen: torch.Generator, rotation_deg: float, scaling: float, shear: float,
                  translation_mm: float) -> torch.Tensor:
    """A random ``[3, 4]`` affine (mm, about the world origin): rotation uniform in
    ``+-rotation_deg`` about x, y and z, per-axis scale in ``1 +- scaling``, the six shear terms
    in ``+-shear``, translation in ``+-translation_mm``; ``M = R @ Shear @ Scale``."""
    def uni(n):
        return 2 * torch.rand(n, generator=gen, dtype=torch.float64) - 1

    ang = uni(3) * math.radians(rotation_deg)
    scale = 1 + uni(3) * scaling
    sh = torch.eye(3, dtype=torch.float64)
    off = uni(6) * shear
    sh[0, 1], sh[0, 2], sh[1, 0], sh[1, 2], sh[2, 0], sh[2, 1] = off
    c, s = torch.cos(ang), torch.sin(ang)
    rx = torch.tensor([[1, 0, 0], [0, c[0], -s[0]], [0, s[0], c[0]]], dtype=torch.float64)
    ry = torch.tensor([[c[1], 0, s[1]], [0, 1, 0], [-s[1], 0, c[1]]], dtype=torch.float64)
    rz = torch.tensor([[c[2], -s[2], 0], [s[2], c[2], 0], [0, 0, 1]], dtype=torch.float64)
    mat = rz @ ry @ rx @ sh @ torch.diag(scale)
    t = uni(3) * translation_mm
    return torch.cat([mat, t[:, None]], 1)


def _vox_to_mm(points: torch.Tensor, shape, res_mm: float) -> torch.Tensor:
    """Voxel -> mm on a synthetic grid (:func:`grid_affine`: centre voxel at the origin)."""
    half = (torch.as_tensor(shape, dtype=points.dtype, device=points.device) - 1) / 2
    return (points - half) * res_mm


def _mm_to_vox(points: torch.Tensor, shape, res_mm: float) -> torch.Tensor:
    half = (torch.as_tensor(shape, dtype=points.dtype, device=points.device) - 1) / 2
    return points / res_mm + half


def _grid_mm(shape, res_mm: float, stride: int, device) -> torch.Tensor:
    """mm of the centres of the ``stride``-pooled cells of a synthetic grid, ``[M, 3]``
    (C order over the pooled grid)."""
    small = [s // stride for s in shape]
    vox = identity_grid(small, device).reshape(3, -1).T * stride + (stride - 1) / 2
    return _vox_to_mm(vox, shape, res_mm)


def _sample_at_mm(volume: torch.Tensor, points_mm: torch.Tensor, shape, res_mm: float,
                  stride: int, out_shape, mode: str = 'bilinear') -> torch.Tensor:
    """Sample ``volume [1, C, *shape/stride]`` (a ``stride``-pooled synthetic grid) at mm
    points ``[M, 3]`` (C order of ``out_shape``), zeros outside."""
    vox = _mm_to_vox(points_mm, shape, res_mm)
    pooled = (vox - (stride - 1) / 2) / stride
    coords = pooled.T.reshape(1, 3, *out_shape).to(volume.dtype)
    return sample_field(volume, coords, mode=mode, padding_mode='zeros')


def _warp_image(image: torch.Tensor, mat: torch.Tensor, shape, res_mm: float,
                mode: str = 'bilinear') -> torch.Tensor:
    """``image(A(x))`` on the same grid, for an affine ``mat [3, 4]`` in mm."""
    pts = _grid_mm(shape, res_mm, 1, image.device)
    src = apply_affine(mat.to(pts), pts)
    return _sample_at_mm(image, src, shape, res_mm, 1, shape, mode)


def _onehot(labels: torch.Tensor, stride: int) -> torch.Tensor:
    """``[1, *shape]`` label indices -> ``[1, C, *shape/stride]`` average-pooled one-hot (the
    fraction of each label in every ``stride^3`` block), by one scatter-add."""
    shape = labels.shape[1:]
    small = [n // stride for n in shape]
    axes = [torch.arange(n, device=labels.device) // stride for n in shape]
    ci, cj, ck = torch.meshgrid(*axes, indexing='ij')
    cell = (ci * small[1] + cj) * small[2] + ck
    v = small[0] * small[1] * small[2]
    flat = labels[0].long() * v + cell
    out = torch.zeros(N_LABELS * v, device=labels.device)
    out.scatter_add_(0, flat.reshape(-1), torch.full((flat.numel(),), 1.0 / stride ** 3,
                                                     device=labels.device))
    return out.view(1, N_LABELS, *small)


def _svf_pair(vel: torch.Tensor, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """Displacements (voxels of ``shape``) of ``exp(v)`` and ``exp(-v)`` for a coarse velocity
    ``[1, 3, *coarse]`` in voxels of ``shape``: integrated on a grid a quarter of ``shape``
    (the field is smooth there) and upsampled."""
    mid = [max(c, n // 4) for c, n in zip(vel.shape[2:], shape)]
    scale = torch.tensor([(m - 1) / (n - 1) for m, n in zip(mid, shape)], device=vel.device,
                         dtype=vel.dtype).view(1, 3, 1, 1, 1)
    v = F.interpolate(vel, size=mid, mode='trilinear', align_corners=True) * scale
    out = []
    for sign in (1.0, -1.0):
        d = integrate_svf(sign * v) / scale
        out.append(F.interpolate(d, size=tuple(shape), mode='trilinear', align_corners=True))
    return out[0], out[1]


def _affine_inv(mat: torch.Tensor) -> torch.Tensor:
    a = torch.linalg.inv(mat[:, :3])
    return torch.cat([a, -(a @ mat[:, 3:])], 1)


def _dice_mean(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean hard Dice over the structures (not background) present in either map."""
    return float(np.nanmean(dice_per_class(pred.cpu(), target.cpu(), N_LABELS)[1:]))


# ---------------------------------------------------------------------------- trainer
class Trainer:
    """Model, optimiser, data and one step of each stage (exposed for tests and scripts)."""

    def __init__(self, train_maps: Sequence[LabelMap], cfg: KeyMorphTrainConfig,
                 device: str | torch.device = 'cpu', held_out: Sequence[LabelMap] = ()):
        self.cfg = cfg
        self.dev = torch.device(device)
        self.train_maps = list(train_maps)
        self.held_out = list(held_out)
        torch.manual_seed(cfg.seed)
        self.model = KeypointDetector(cfg.detector).to(self.dev)
        self.optimiser = self._new_optimiser(0)
        self.synth = Synthesizer(self.train_maps, cfg.synth, device=self.dev)
        ref = self.train_maps[cfg.pretrain_map % len(self.train_maps)]
        canon = replace(cfg.synth, rotation_deg=0.0, scaling=0.0, shear=0.0, translation_mm=0.0,
                        flip_prob=0.0, nonlin_std_mm=0.0)
        self.reference = Synthesizer([ref], canon, device=self.dev)
        self.p0 = self._pretrain_points()
        self.val_items: list[dict] | None = None

    # -------------------------------------------------------------- setup
    def _new_optimiser(self, step: int) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.parameters(), lr=self.lr(step))

    def stage(self, step: int) -> str:
        return 'pretrain' if step < self.cfg.pretrain_steps else self.cfg.mode

    def lr(self, step: int) -> float:
        cfg = self.cfg
        if step < cfg.pretrain_steps:
            return cfg.lr_pretrain * min(1.0, (step + 1) / cfg.warmup)
        s = step - cfg.pretrain_steps
        if s < cfg.warmup:
            return cfg.lr * (s + 1) / cfg.warmup
        span = max(1, cfg.steps - cfg.warmup)
        hold = cfg.lr_hold * span
        t = min(1.0, max(0.0, (s - cfg.warmup - hold) / max(1.0, span - hold)))
        return cfg.lr_final + 0.5 * (cfg.lr - cfg.lr_final) * (1 + math.cos(math.pi * t))

    def _pretrain_points(self) -> torch.Tensor:
        """N fixed random points (voxels of the canonical grid) inside the reference brain."""
        gen = torch.Generator().manual_seed(self.cfg.seed + 7)
        labels = self.reference.synthesize(0, torch.Generator().manual_seed(0))['labels']
        brain = torch.nonzero(labels.cpu() > 0).double()
        n = self.cfg.detector.n_keypoints
        pick = torch.randint(0, brain.shape[0], (n,), generator=gen)
        jitter = torch.rand(n, 3, generator=gen, dtype=torch.float64) - 0.5
        return (brain[pick] + jitter).float().to(self.dev)

    # -------------------------------------------------------------- data
    def _normalise(self, image: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return robust_normalise(image, (labels > 0).float()[:, None])

    def pretrain_batch(self, step: int) -> dict:
        cfg = self.cfg
        det = cfg.detector
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        valid = None
        if cfg.pretrain_target == 'centroids':
            idx = int(torch.randint(0, len(self.train_maps), (), generator=gen))
            sample = self.synth.synthesize(idx, gen)
            points, valid = self._centroid_targets(sample['labels'])
        else:
            sample = self.reference.synthesize(0, gen)
            points = self.p0
        ramp = min(1.0, (step + 1) / max(1, cfg.pretrain_ramp))
        mat = random_affine(gen, self.pretrain_rotation * ramp, cfg.scaling * ramp,
                            cfg.shear * ramp, cfg.translation_mm * ramp).float().to(self.dev)
        shape, res = det.shape, det.res_mm
        # output voxel x -> canonical mm A(phi(x)), phi = exp(v) (voxels)
        disp = inv = None
        if cfg.pretrain_svf_mm > 0:
            coarse = [max(2, int(round(n * res / cfg.pretrain_svf_spacing_mm)) + 1) for n in shape]
            std = float(torch.rand((), generator=gen)) * cfg.pretrain_svf_mm * ramp
            vel = torch.randn([1, 3, *coarse], generator=gen) * std / res
            disp, inv = _svf_pair(vel.to(self.dev), shape)
        base = identity_grid(shape, self.dev)
        if disp is not None:
            base = base + disp[0]
        src_mm = apply_affine(mat, _vox_to_mm(base.reshape(3, -1).T, shape, res))
        src_vox = _mm_to_vox(src_mm, shape, res).T.reshape(1, 3, *shape)
        image = sample_field(sample['image'][None, None], src_vox, padding_mode='zeros')
        brain = sample_field((sample['labels'] > 0).float()[None, None], src_vox)
        image = robust_normalise(image, brain)
        # targets: phi^-1(A^-1(p0)), phi^-1 = exp(-v)
        q = _mm_to_vox(apply_affine(_affine_inv(mat), _vox_to_mm(points, shape, res)), shape, res)
        if inv is not None:
            q = q + sample_field(inv, q.T.reshape(1, 3, -1, 1, 1), padding_mode='border'
                                 ).reshape(3, -1).T
        out = {'image': image, 'target': q[None], 'ramp': ramp}
        if valid is not None:
            out['valid'] = valid[None]
            out['labels'] = sample_field(sample['labels'].float()[None, None], src_vox,
                                         mode='nearest').round().long()[0, 0]
        return out

    def _centroid_targets(self, labels: torch.Tensor, min_voxels: int = 8
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keypoint targets (voxels) from a label map of output indices: keypoint ``k`` is the
        centroid of structure ``1 + k mod 32``; structures with fewer than ``min_voxels``
        voxels (absent, or cut by the field of view) are marked invalid."""
        lab = labels.reshape(-1).long()
        counts = torch.bincount(lab, minlength=N_LABELS).double()
        grid = identity_grid(tuple(labels.shape), labels.device).reshape(3, -1).double()
        sums = torch.stack([torch.bincount(lab, weights=g, minlength=N_LABELS) for g in grid], 1)
        cent = sums / counts.clamp(min=1)[:, None]
        k = torch.arange(self.cfg.detector.n_keypoints, device=labels.device) % (N_LABELS - 1) + 1
        return cent[k].float().to(self.dev), (counts[k] >= min_voxels).to(self.dev)

    @property
    def pretrain_rotation(self) -> float:
        cfg = self.cfg
        return cfg.rotation_deg if cfg.pretrain_rotation_deg is None else cfg.pretrain_rotation_deg

    def rotation(self, step: int) -> float:
        """Rotation range of the moving image's augmentation at a second-stage ``step``: grows
        linearly from the pretraining's range to ``rotation_deg`` over ``rotation_ramp`` steps."""
        cfg = self.cfg
        if cfg.rotation_ramp <= 0:
            return cfg.rotation_deg
        t = min(1.0, (step - cfg.pretrain_steps + 1) / cfg.rotation_ramp)
        start = min(self.pretrain_rotation, cfg.rotation_deg)
        return start + t * (cfg.rotation_deg - start)

    def pair_batch(self, step: int) -> dict:
        """The data of one supervised/unsupervised step (deterministic in ``step``)."""
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        kind = 'dice'
        if cfg.mode == 'unsupervised':
            s = step - cfg.pretrain_steps
            kind = 'consistency' if cfg.consistency_weight > 0 and s % 2 == 1 else 'image'
        contrast = None
        if kind == 'image' and cfg.unsup_sim in ('mse', 'lncc'):
            from ..synth.generator import CONTRASTS

            names = sorted(CONTRASTS)
            contrast = names[int(torch.randint(0, len(names), (), generator=gen))]
        self.synth.config = replace(cfg.synth, contrast=contrast)
        pair = self.synth.sample_pair(gen, same_anatomy=(kind == 'consistency'))
        self.synth.config = cfg.synth
        aug = random_affine(gen, self.rotation(step), cfg.scaling, cfg.shear,
                            cfg.translation_mm).float().to(self.dev)
        use_affine = float(torch.rand((), generator=gen)) < cfg.p_affine
        lo, hi = cfg.lambda_range
        u = float(torch.rand((), generator=gen))
        lam = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
        fixed, moving = pair['fixed'], pair['moving']
        shape, res = cfg.detector.shape, cfg.detector.res_mm
        img_f = self._normalise(fixed['image'], fixed['labels'])
        img_m = self._normalise(moving['image'], moving['labels'])
        out = {'kind': kind, 'fixed': img_f, 'moving': _warp_image(img_m, aug, shape, res),
               'moving_raw': img_m, 'aug': aug, 'aligner': 'affine' if use_affine else 'tps',
               'lambda': float('nan') if use_affine else lam,
               'fixed_labels': fixed['labels'], 'moving_labels': moving['labels'],
               'fixed_to_moving': pair['fixed_to_moving']}
        return out

    # -------------------------------------------------------------- steps
    def _regularisers(self, heat: torch.Tensor, points: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        det = cfg.detector
        zero = heat.sum() * 0
        out = {'kl': zero, 'var': zero, 'rep': zero}
        if cfg.kl_weight:
            out['kl'] = kl_gaussian_loss(heat)
        if cfg.var_weight:
            out['var'] = variance_loss(heat, det.stride, det.shape, cfg.var_form)
        if cfg.rep_weight:
            out['rep'] = repulsion_loss(to_normalised(points, det.shape), cfg.rep_tau, cfg.rep_form)
        return out

    def _total(self, sim: torch.Tensor, reg: dict) -> torch.Tensor:
        cfg = self.cfg
        return (sim + cfg.kl_weight * reg['kl'] + cfg.var_weight * reg['var']
                + cfg.rep_weight * reg['rep'])

    def _update(self, loss: torch.Tensor, step: int) -> None:
        for group in self.optimiser.param_groups:
            group['lr'] = self.lr(step)
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        self.optimiser.step()

    def pretrain_step(self, step: int, batch: dict | None = None) -> dict:
        self.model.train()
        batch = batch if batch is not None else self.pretrain_batch(step)
        det = self.cfg.detector
        out = self.model(batch['image'])
        pred = out['points']
        err = to_normalised(pred, det.shape) - to_normalised(batch['target'], det.shape)
        valid = batch.get('valid')
        if valid is None:
            valid = torch.ones(pred.shape[:2], dtype=torch.bool, device=pred.device)
        sim = (err ** 2).sum(-1)[valid].mean()
        reg = self._regularisers(out['heatmaps'], pred)
        loss = self._total(sim, reg)
        self._update(loss, step)
        with torch.no_grad():
            err_mm = float(((pred - batch['target']) ** 2).sum(-1)[valid].mean().sqrt()) * det.res_mm
            spread = keypoint_spread(pred * det.res_mm)['spread_mm']
        return {'loss': float(loss.detach()), 'sim': float(sim.detach()),
                **{k: float(v.detach()) for k, v in reg.items()}, 'aligner': '-',
                'lambda': float('nan'), 'err_mm': err_mm, 'spread_mm': spread}

    def _transform(self, pf_mm, pm_mm, weights, aligner: str, lam: float, pts_mm):
        """Map fixed mm points ``[M, 3]`` to moving mm with the keypoint fit."""
        if aligner == 'affine':
            mat = fit_affine(pf_mm, pm_mm, weights)
            return apply_affine(mat, pts_mm[None])[0]
        if aligner == 'rigid':
            mat = fit_rigid(pf_mm, pm_mm, weights)
            return apply_affine(mat, pts_mm[None])[0]
        fit = fit_tps(pf_mm, pm_mm, [lam], weights, kernel=self.cfg.tps_kernel)
        return fit.evaluate(pts_mm[None])[0, 0]

    def pair_step(self, step: int, batch: dict | None = None) -> dict:
        cfg = self.cfg
        det = cfg.detector
        shape, res, s = det.shape, det.res_mm, cfg.loss_stride
        self.model.train()
        batch = batch if batch is not None else self.pair_batch(step)
        out = self.model(torch.cat([batch['fixed'], batch['moving']]))
        pts = out['points']
        pf_mm = _vox_to_mm(pts[:1], shape, res)
        pm_mm = _vox_to_mm(pts[1:], shape, res)
        aug = batch['aug']
        reg = self._regularisers(out['heatmaps'], pts)
        if batch['kind'] == 'consistency':
            # expected moving keypoints: the fixed ones carried by the exact correspondence
            corr = batch['fixed_to_moving']  # [1, 3, *shape] moving voxels of each fixed voxel
            c = pts[0].T.reshape(1, 3, -1, 1, 1)
            m_vox = sample_field(corr, c, padding_mode='border').reshape(3, -1).T
            m_aug = apply_affine(_affine_inv(aug), _vox_to_mm(m_vox, shape, res)[None])
            err = (to_normalised(_mm_to_vox(m_aug, shape, res), shape)
                   - to_normalised(pts[1:], shape))
            sim = cfg.consistency_weight * (err ** 2).sum(-1).mean()
        else:
            weights = pair_weights(out['weights'][:1], out['weights'][1:]) \
                if out['weights'] is not None else None
            grid = _grid_mm(shape, res, s, self.dev)
            small = [n // s for n in shape]
            mapped = self._transform(pf_mm, pm_mm, weights, batch['aligner'], batch['lambda'], grid)
            mapped = apply_affine(aug, mapped[None])[0]  # augmented moving mm -> moving mm
            if batch['kind'] == 'dice':
                target = _onehot(batch['fixed_labels'], s)
                warped = _sample_at_mm(_onehot(batch['moving_labels'], s), mapped, shape, res, s,
                                       small)
                sim = soft_dice_loss(warped, target)
            else:
                pool = (lambda x: F.avg_pool3d(x, s)) if s > 1 else (lambda x: x)
                fixed_img = pool(batch['fixed'])
                warped = _sample_at_mm(pool(batch['moving_raw']), mapped, shape, res, s, small)
                if cfg.unsup_sim == 'mse':
                    sim = mse_loss(warped, fixed_img)
                elif cfg.unsup_sim == 'lncc':
                    sim = lncc_loss(warped, fixed_img)
                else:
                    sim = mutual_information_loss(warped, fixed_img)
        loss = self._total(sim, reg)
        self._update(loss, step)
        spread = keypoint_spread(pf_mm.detach())['spread_mm']
        return {'loss': float(loss.detach()), 'sim': float(sim.detach()),
                **{k: float(v.detach()) for k, v in reg.items()},
                'aligner': batch['aligner'] if batch['kind'] != 'consistency' else 'consistency',
                'lambda': batch['lambda'], 'err_mm': float('nan'), 'spread_mm': spread}

    def step(self, step: int) -> dict:
        return self.pretrain_step(step) if self.stage(step) == 'pretrain' else self.pair_step(step)

    # -------------------------------------------------------------- validation
    def _validation_set(self) -> list[dict]:
        """Fixed held-out pairs (anatomy a fixed, b moving, fixed contrasts), the moving image
        rotated about a seeded random axis by each of ``val_rotations``."""
        from ..perturb import random_axis, rotation_about_axis

        cfg = self.cfg
        maps = self.held_out
        if len(maps) < 2:
            return []
        base = replace(cfg.synth.evaluation(), skull_strip_prob=1.0)
        plan = [(0, 1, 't1', 't2'), (1, 2, 't2', 't1'), (2, 0, 'pd', None)]
        if cfg.val_pairs == 9:  # each anatomy pair with a same-contrast and two cross-contrast pairs
            plan = [(a, b, ca, cb) for a, b in ((0, 1), (1, 2), (2, 0))
                    for ca, cb in (('t1', 't1'), ('t1', 't2'), ('pd', 'flair'))]
        items = []
        for k, (a, b, ca, cb) in enumerate(plan):
            if max(a, b) >= len(maps):
                continue
            sa = Synthesizer(maps, replace(base, contrast=ca), device=self.dev).synthesize(
                a, torch.Generator().manual_seed(20_000 + k))
            sb = Synthesizer(maps, replace(base, contrast=cb), device=self.dev).synthesize(
                b, torch.Generator().manual_seed(30_000 + k))
            fixed = self._normalise(sa['image'][None, None], sa['labels'][None])
            moving = self._normalise(sb['image'][None, None], sb['labels'][None])
            axis = random_axis(np.random.default_rng(40_000 + k))
            for theta in cfg.val_rotations:
                rot = torch.as_tensor(rotation_about_axis(axis, theta), dtype=torch.float32)
                mat = torch.cat([rot, torch.zeros(3, 1)], 1).to(self.dev)
                items.append({'name': f'{maps[a].name}->{maps[b].name}', 'theta': float(theta),
                              'fixed': fixed, 'fixed_labels': sa['labels'][None],
                              'moving': _warp_image(moving, mat, cfg.detector.shape,
                                                    cfg.detector.res_mm),
                              'moving_raw': moving, 'moving_labels': sb['labels'][None],
                              'aug': mat})
        return items

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Hard Dice (full grid, nearest-neighbour labels) of rigid/affine/TPS registrations of
        the held-out pairs per rotation, keypoint repeatability under rotation (mm), heatmap
        statistics."""
        cfg = self.cfg
        det = cfg.detector
        shape, res = det.shape, det.res_mm
        if self.val_items is None:
            self.val_items = self._validation_set()
        if not self.val_items:
            return {}
        self.model.eval()
        grid = _grid_mm(shape, res, 1, self.dev)
        rows: dict[str, list[float]] = {}
        ref_pts: dict[str, torch.Tensor] = {}
        stats = []
        for it in self.val_items:
            out = self.model(torch.cat([it['fixed'], it['moving']]))
            pts = out['points']
            stats.append(heatmap_statistics(out['heatmaps'], det.stride, res))
            pf_mm = _vox_to_mm(pts[:1], shape, res)
            pm_mm = _vox_to_mm(pts[1:], shape, res)
            w = None if out['weights'] is None else pair_weights(out['weights'][:1],
                                                                 out['weights'][1:])
            tag = int(round(it['theta']))
            # repeatability: keypoints of the rotated image vs the rotated keypoints
            orig_mm = apply_affine(it['aug'], pm_mm)  # rotated-image mm -> original mm
            if tag == 0:
                ref_pts[it['name']] = orig_mm
            elif it['name'] in ref_pts:
                d = (orig_mm - ref_pts[it['name']]).norm(dim=-1).mean()
                rows.setdefault(f'repeat_mm_{tag}', []).append(float(d))
            if tag == 0:
                ident = _dice_mean(it['moving_labels'][0], it['fixed_labels'][0])
                rows.setdefault('dice_identity', []).append(ident)
            for aligner in ('rigid', 'affine', 'tps'):
                mapped = self._transform(pf_mm.double(), pm_mm.double(), w, aligner,
                                         cfg.val_lambda, grid.double()).float()
                mapped = apply_affine(it['aug'], mapped[None])[0]
                warped = _sample_at_mm(it['moving_labels'][None].float(), mapped, shape, res, 1,
                                       shape, mode='nearest')[0, 0].round().long()
                rows.setdefault(f'dice_{aligner}_{tag}', []).append(
                    _dice_mean(warped, it['fixed_labels'][0]))
        res_d = {k: float(np.mean(v)) for k, v in rows.items()}
        for key in stats[0]:
            res_d[key] = float(np.mean([s[key] for s in stats]))
        return res_d


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
          cfg: KeyMorphTrainConfig = KeyMorphTrainConfig(), device: str = 'cpu',
          held_out: Sequence[str] = HELD_OUT, extra_maps: Sequence[LabelMap] = (),
          maps: tuple[Sequence[LabelMap], Sequence[LabelMap]] | None = None, log=print,
          max_minutes: float | None = None, init: str | Path | None = None) -> Path:
    """Train (or resume) the detector; returns the checkpoint path.

    ``label_maps``: folder of SynthSeg label maps (``held_out`` names kept for validation), or
    ``maps=(train, held_out)`` given directly. ``init``: start from another run's checkpoint
    weights (e.g. a shared pretraining) when this run has no checkpoint yet."""
    dev = torch.device(device)
    if maps is not None:
        train_maps, test_maps = list(maps[0]), list(maps[1])
    else:
        train_maps, test_maps = load_training_maps(label_maps, held_out)
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
        if KeyMorphTrainConfig.from_dict(ckpt['config']).detector != cfg.detector:
            raise ValueError(f'{ckpt_path} was trained with another detector architecture')
        trainer.model.load_state_dict(ckpt['model'])
        step = int(ckpt['step'])
        trainer.optimiser = trainer._new_optimiser(step)
        trainer.optimiser.load_state_dict(ckpt['optimiser'])
        log(f'resumed from {ckpt_path} at step {step} ({trainer.stage(step)})')
        _truncate_logs(out, step)
    elif init is not None:  # e.g. several ablation runs from one pretraining
        state = torch.load(init, map_location=dev, weights_only=True)['model']
        trainer.model.load_state_dict(state)
        # the centroid pretraining refines any detector; the random-point one is skipped
        step = 0 if cfg.pretrain_target == 'centroids' else cfg.pretrain_steps
        trainer.optimiser = trainer._new_optimiser(step)
        log(f'initialised from {init}; starting at step {step} ({trainer.stage(step)})')
    (out / 'train_config.json').write_text(json.dumps(cfg.to_dict(), indent=1))
    tlog, vlog = out / 'train_log.tsv', out / 'val_log.tsv'
    if not tlog.exists():
        tlog.write_text(TRAIN_LOG_HEADER + '\n')
    t_start = time.time()

    def save(path: Path = ckpt_path):
        _atomic_save({'model': trainer.model.state_dict(),
                      'optimiser': trainer.optimiser.state_dict(), 'step': step,
                      'stage': trainer.stage(max(step - 1, 0)), 'config': cfg.to_dict(),
                      'train_maps': [m.name for m in train_maps],
                      'held_out': [m.name for m in test_maps]}, path)

    def validate():
        res = trainer.evaluate()
        if not res:
            return
        keys = sorted(res)
        if not vlog.exists():
            vlog.write_text('step\tstage\t' + '\t'.join(keys) + '\n')
        header = vlog.read_text().splitlines()[0].split('\t')[2:]
        with open(vlog, 'a') as fh:
            values = '\t'.join(_fmt(res.get(k, float('nan'))) for k in header)
            fh.write(f'{step}\t{trainer.stage(step - 1)}\t{values}\n')
        brief = {k: round(v, 3) for k, v in res.items() if k.startswith(('dice_affine', 'dice_tps',
                                                                         'spread', 'repeat'))}
        log(f'step {step} validation: {json.dumps(brief)}')

    while step < cfg.total_steps:
        if step == cfg.pretrain_steps and cfg.pretrain_steps > 0 and \
                trainer.optimiser.param_groups[0].get('stage') != 'main':
            trainer.optimiser = trainer._new_optimiser(step)  # fresh Adam for the second stage
        for group in trainer.optimiser.param_groups:
            group['stage'] = 'pretrain' if step < cfg.pretrain_steps else 'main'
        t0 = time.time()
        stage = trainer.stage(step)
        batch = trainer.pretrain_batch(step) if stage == 'pretrain' else trainer.pair_batch(step)
        t1 = time.time()
        if stage == 'pretrain':
            terms = trainer.pretrain_step(step, batch)
        else:
            terms = trainer.pair_step(step, batch)
        t2 = time.time()
        step += 1
        row = [step, stage, terms['loss'], terms['sim'], terms['kl'], terms['var'], terms['rep'],
               terms['aligner'], terms['lambda'], trainer.lr(step - 1), terms['err_mm'],
               terms['spread_mm'], t1 - t0, t2 - t1]
        with open(tlog, 'a') as fh:
            fh.write('\t'.join(_fmt(v) for v in row) + '\n')
        if step == cfg.pretrain_steps:
            save()
            save(out / 'pretrained.pt')
            log(f'pretraining done at step {step}: keypoint error {terms["err_mm"]:.2f} mm, '
                f'spread {terms["spread_mm"]:.1f} mm')
        elif step % cfg.checkpoint_every == 0 or step == cfg.total_steps:
            save()
        if cfg.val_every and (step % cfg.val_every == 0 or step == cfg.total_steps
                              or step == cfg.pretrain_steps):
            validate()
        if max_minutes is not None and (time.time() - t_start) > 60 * max_minutes:
            save()
            log(f'stopping after {max_minutes} min at step {step} (resume to continue)')
            break
    return ckpt_path


def export_weights(checkpoint: str | Path, out_path: str | Path, half: bool = True,
                   card: dict | None = None) -> dict:
    """Write the shipped weights file (state dict, float16 by default, and the detector's
    config) that :meth:`~.network.KeyMorphModel.load` reads; with ``card``, also the JSON model
    card beside it (``<name>.json``, with the file's sha256). Returns the metadata."""
    from ..weights import sha256_file

    ckpt = torch.load(checkpoint, map_location='cpu', weights_only=True)
    cfg = KeyMorphTrainConfig.from_dict(ckpt['config'])
    state = {k: (v.half() if half and v.is_floating_point() else v)
             for k, v in ckpt['model'].items()}
    payload = {'format': FORMAT, 'state_dict': state, 'detector': cfg.detector.to_dict(),
               'step': int(ckpt['step']), 'stage': ckpt.get('stage'), 'mode': cfg.mode,
               'spatial_reg': {k: getattr(cfg, k) for k in ('kl_weight', 'var_weight', 'rep_weight',
                                                            'rep_tau')}}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save(payload, out_path)
    sha = sha256_file(out_path)
    meta = {'path': str(out_path), 'sha256': sha, 'step': int(ckpt['step']),
            'stage': ckpt.get('stage'), 'bytes': out_path.stat().st_size}
    if card is not None:
        full = {'name': out_path.stem, 'file': out_path.name, 'sha256': sha,
                'training_step': int(ckpt['step']), 'stage': ckpt.get('stage'), **card}
        tmp = out_path.with_suffix('.json.tmp')
        tmp.write_text(json.dumps(full, indent=1) + '\n')
        os.replace(tmp, out_path.with_suffix('.json'))
    return meta
