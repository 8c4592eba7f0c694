"""SynthSeg-style synthesis engine: random images (and image pairs) from label maps.

The generative model follows SynthSeg (Billot et al., MedIA 2023) and SynthMorph (Hoffmann et
al., TMI 2022); see ``anchors_registration.md`` §6 for the parameters we start from. For
each sample, in torch, batched, on any device and seeded through a ``torch.Generator``:

1. **Spatial**: pick a label map, an output grid (``shape`` voxels of ``res_mm``, centred on
   the brain plus a random translation), a random affine (rotation, scaling, shear; an
   optional left/right flip that also swaps left/right labels) and a smooth diffeomorphic
   deformation (a stationary velocity field drawn on a coarse grid, upsampled and integrated
   by scaling and squaring). Generation labels are resampled by nearest neighbour.
2. **Intensities**: one Gaussian per generation class (left/right homologues share it), means
   and standard deviations uniform in ``mean_range``/``std_range``, or a fixed contrast.
3. **Bias field**: exp of a smooth random field.
4. **Normalisation and gamma**: clip, min-max to [0, 1], ``x ** exp(N(0, gamma_std))``.
5. **Resolution**: blur with a Gaussian matching a random (isotropic or one-axis thick-slice)
   acquisition resolution, downsample to it and resample back.
6. **Noise**: additive Gaussian, then a final min-max normalisation.

Skull stripping is mimicked by removing the extra-cerebral classes (``skull_strip_prob``).

Pairs (:meth:`Synthesizer.sample_pair`) are two independent spatial transforms and contrasts
of one anatomy, with the exact dense correspondence between them, or two anatomies (no
transform, labels only).

Coordinates: every synthetic image lives on an axis-aligned RAS grid whose centre voxel sits at
world (0, 0, 0); :func:`grid_affine` gives its voxel-to-world matrix.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .labels import (
    GENERATION_LABELS, GENERATION_TO_OUTPUT, OUTPUT_LABELS, TISSUE_OF_GENERATION, flip_lut,
    generation_classes,
)

__all__ = [
    'SynthConfig', 'LabelMap', 'Synthesizer', 'load_label_map', 'grid_affine', 'integrate_svf',
    'CONTRASTS', 'gaussian_blur', 'identity_grid', 'sample_field', 'label_map_from_array',
    'RealImage',
]


#: Tissue intensities (0-255 scale) of fixed contrasts used for held-out evaluation.
CONTRASTS: dict[str, dict[str, float]] = {
    't1': {'background': 0, 'wm': 110, 'gm': 75, 'pallidum': 95, 'csf': 30},
    't2': {'background': 0, 'wm': 60, 'gm': 90, 'pallidum': 65, 'csf': 200},
    'pd': {'background': 0, 'wm': 85, 'gm': 110, 'pallidum': 95, 'csf': 140},
    'flair': {'background': 0, 'wm': 90, 'gm': 125, 'pallidum': 100, 'csf': 15},
}


@dataclass(frozen=True)
class SynthConfig:
    """Parameters of the generative model (defaults: keyprep's 2 mm CPU recipe)."""

    shape: tuple[int, int, int] = (64, 64, 64)
    res_mm: float = 2.0
    # spatial
    rotation_deg: float = 20.0
    scaling: float = 0.15
    shear: float = 0.012
    translation_mm: float = 20.0
    flip_prob: float = 0.5
    nonlin_std_mm: float = 3.0
    nonlin_spacing_mm: float = 24.0
    svf_steps: int = 7
    # intensities
    mean_range: tuple[float, float] = (0.0, 255.0)
    std_range: tuple[float, float] = (0.0, 25.0)
    contrast: str | None = None  # None: random GMM; else a key of CONTRASTS
    bias_std: float = 0.5
    bias_spacing_mm: float = 48.0
    clip: float = 300.0
    gamma_std: float = 0.4
    # acquisition resolution
    res_prob: float = 0.75
    max_iso_res_mm: float = 4.0
    max_slice_mm: float = 8.0
    aniso_prob: float = 0.5
    fixed_res_mm: tuple[float, float, float] | None = None  # force one acquisition resolution
    noise_std: float = 0.03
    skull_strip_prob: float = 0.3

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> 'SynthConfig':
        d = dict(d)
        for key in ('shape', 'mean_range', 'std_range', 'fixed_res_mm'):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)

    def evaluation(self, contrast: str | None = None,
                   fixed_res_mm: tuple[float, float, float] | None = None) -> 'SynthConfig':
        """A copy without spatial augmentation (for held-out evaluation at a known pose)."""
        return replace(self, rotation_deg=0.0, scaling=0.0, shear=0.0, translation_mm=0.0,
                       flip_prob=0.0, nonlin_std_mm=0.0, contrast=contrast,
                       fixed_res_mm=fixed_res_mm, res_prob=1.0 if fixed_res_mm else 0.0,
                       skull_strip_prob=0.0)


@dataclass
class LabelMap:
    """A label map as generation-label indices on a RAS grid (``affine``: voxel to mm)."""

    index: np.ndarray  # uint8, indices into ``labels``
    affine: np.ndarray
    name: str
    labels: tuple[int, ...] = GENERATION_LABELS
    centre_mm: np.ndarray = field(default=None)  # brain centroid in world mm

    def __post_init__(self):
        if self.centre_mm is None:
            brain = np.array([GENERATION_TO_OUTPUT.get(lab, 0) not in (0, 24) for lab in self.labels])
            vox = np.argwhere(brain[self.index])
            c = vox.mean(0) if len(vox) else (np.array(self.index.shape) - 1) / 2
            self.centre_mm = self.affine[:3, :3] @ c + self.affine[:3, 3]


def load_label_map(path: str | Path, labels: Sequence[int] = GENERATION_LABELS,
                   mapping: dict[int, int] | None = None, margin: int = 4) -> LabelMap:
    """Read a label map, reorient it to RAS (exact permutation), crop it to its content.

    ``mapping`` (source label -> generation label) translates other protocols; every value
    present must then be mapped. Values outside ``labels`` raise a ``ValueError``.
    """
    import nibabel as nib

    img = nib.as_closest_canonical(nib.load(str(path)))
    data = np.rint(np.asarray(img.dataobj)).astype(np.int64)
    if mapping is not None:
        from .labels import relabel

        data = relabel(data, mapping)
    return label_map_from_array(data, img.affine, Path(path).name.split('.')[0], labels, margin,
                                source=str(path))


def label_map_from_array(data: np.ndarray, affine: np.ndarray, name: str,
                         labels: Sequence[int] = GENERATION_LABELS, margin: int = 4,
                         source: str | None = None) -> LabelMap:
    """A :class:`LabelMap` from an integer array of generation labels (RAS grid ``affine``),
    cropped to its content plus ``margin`` voxels."""
    data = np.asarray(data).astype(np.int64)
    lut = np.full(max(int(data.max()), max(labels)) + 1, -1, dtype=np.int64)
    lut[list(labels)] = np.arange(len(labels))
    index = lut[data.clip(0)]
    index[data < 0] = -1
    if (index < 0).any():
        bad = sorted(set(np.unique(data[index < 0]).tolist()))
        raise ValueError(f'{source or name}: labels {bad[:10]} are not generation labels')
    nz = np.argwhere(index > 0)
    if not len(nz):
        raise ValueError(f'{source or name}: the label map is empty')
    lo = np.maximum(nz.min(0) - margin, 0)
    hi = np.minimum(nz.max(0) + margin + 1, index.shape)
    index = index[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].astype(np.uint8)
    affine = np.array(affine, dtype=float)
    affine[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    return LabelMap(index=index, affine=affine, name=name, labels=tuple(labels))


@dataclass
class RealImage:
    """A real image (intensities, any grid: ``affine`` voxel to RAS mm) for
    :meth:`Synthesizer.real_pair`; scaled so that its brain's 99.5th percentile is 255 (the
    range of the synthetic intensities)."""

    data: np.ndarray
    affine: np.ndarray
    name: str = 'real'

    def __post_init__(self):
        data = np.asarray(self.data, dtype=np.float32)
        if data.ndim != 3:
            raise ValueError(f'{self.name}: a real image must be 3-D, not {data.shape}')
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)  # no intensity there
        inside = data[data > 0]
        if not inside.size:
            raise ValueError(f'{self.name}: the real image has no positive voxel')
        top = float(np.percentile(inside, 99.5))
        self.data = np.clip(data, 0, None) * (255.0 / max(top, 1e-6))
        self.affine = np.asarray(self.affine, dtype=float)
        if (self.affine.shape != (4, 4) or not np.isfinite(self.affine).all()
                or abs(np.linalg.det(self.affine[:3, :3])) < 1e-9):
            raise ValueError(f'{self.name}: the affine must be an invertible 4x4 matrix')
        self._cache: dict = {}

    def tensor(self, device) -> torch.Tensor:
        key = str(device)
        if key not in self._cache:
            self._cache[key] = torch.as_tensor(self.data, device=device)[None, None]
        return self._cache[key]


def grid_affine(shape: Sequence[int], res_mm: float) -> np.ndarray:
    """RAS voxel-to-world matrix of a synthetic grid whose centre is the world origin."""
    aff = np.diag([res_mm, res_mm, res_mm, 1.0])
    aff[:3, 3] = -res_mm * (np.asarray(shape, dtype=float) - 1) / 2
    return aff


def identity_grid(shape: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """Voxel coordinates ``[3, D, H, W]`` (channel order i, j, k)."""
    axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing='ij'))


def sample_field(volume: torch.Tensor, coords: torch.Tensor, mode: str = 'bilinear',
                 padding_mode: str = 'zeros') -> torch.Tensor:
    """Sample ``volume [B, C, D, H, W]`` at voxel coordinates ``coords [B, 3, d, h, w]`` (i, j, k)."""
    shape = volume.shape[2:]
    norm = [2 * coords[:, a] / max(shape[a] - 1, 1) - 1 for a in range(3)]
    grid = torch.stack(norm[::-1], dim=-1)  # grid_sample wants (x=k, y=j, z=i)
    return F.grid_sample(volume, grid, mode=mode, padding_mode=padding_mode, align_corners=True)


def integrate_svf(velocity: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Scaling and squaring: displacement (voxels) of exp(v) for ``velocity [B, 3, D, H, W]``."""
    disp = velocity / (2 ** steps)
    base = identity_grid(velocity.shape[2:], velocity.device, velocity.dtype).unsqueeze(0)
    for _ in range(steps):
        disp = disp + sample_field(disp, base + disp, padding_mode='border')
    return disp


def gaussian_blur(x: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur of ``x [B, C, D, H, W]`` with per-axis sigma (voxels)."""
    for axis, sigma in enumerate(sigmas):
        if sigma <= 0.1:
            continue
        radius = max(1, int(math.ceil(3 * sigma)))
        t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
        kernel = torch.exp(-0.5 * (t / sigma) ** 2)
        kernel = kernel / kernel.sum()
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        c = x.shape[1]
        x = F.conv3d(F.pad(x, pad, mode='replicate'), kernel.view(shape).expand(c, 1, *shape[2:]),
                     groups=c)
    return x


def _rotation(angles: torch.Tensor) -> torch.Tensor:
    """Rotation matrix from three angles (radians, about x, y, z)."""
    cx, cy, cz = torch.cos(angles)
    sx, sy, sz = torch.sin(angles)
    one, zero = torch.ones(()), torch.zeros(())
    rx = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx]).view(3, 3)
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy]).view(3, 3)
    rz = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one]).view(3, 3)
    return rz @ ry @ rx


class Synthesizer:
    """Draw synthetic images with labels (and pairs) from a set of label maps."""

    def __init__(self, label_maps: Sequence[LabelMap], config: SynthConfig = SynthConfig(),
                 device: str | torch.device = 'cpu'):
        if not label_maps:
            raise ValueError('the synthesizer needs at least one label map')
        self.config = config
        self.device = torch.device(device)
        self.maps = list(label_maps)
        self.labels = self.maps[0].labels
        if any(m.labels != self.labels for m in self.maps):
            raise ValueError('all label maps must share one generation label list')
        self._volumes = [torch.as_tensor(m.index).to(self.device) for m in self.maps]
        self.flip = torch.as_tensor(flip_lut(self.labels), device=self.device)
        self.classes = torch.as_tensor(generation_classes(self.labels), device=self.device)
        self.n_classes = int(self.classes.max()) + 1
        out_pos = {lab: i for i, lab in enumerate(OUTPUT_LABELS)}
        self.to_output = torch.as_tensor([out_pos[GENERATION_TO_OUTPUT[lab]] for lab in self.labels],
                                         device=self.device)
        self.extra = torch.as_tensor([TISSUE_OF_GENERATION.get(lab) == 'extra' for lab in self.labels],
                                     device=self.device)
        tissues = [TISSUE_OF_GENERATION.get(lab, 'extra') for lab in self.labels]
        self._tissue = tissues

    # ------------------------------------------------------------------ spatial
    def _uniform(self, gen, lo, hi, size=()):
        return lo + (hi - lo) * torch.rand(size, generator=gen)

    def _spatial(self, gen: torch.Generator, map_id: int, flip: bool | None = None):
        """One random spatial transform: (matrix M, source centre, flip, velocity or None)."""
        cfg = self.config
        angles = self._uniform(gen, -1, 1, (3,)) * math.radians(cfg.rotation_deg)
        scale = 1 + self._uniform(gen, -1, 1, (3,)) * cfg.scaling
        shear = torch.eye(3)
        off = self._uniform(gen, -1, 1, (6,)) * cfg.shear
        shear[0, 1], shear[0, 2], shear[1, 0], shear[1, 2], shear[2, 0], shear[2, 1] = off
        draw = bool(torch.rand((), generator=gen) < cfg.flip_prob)
        flip = draw if flip is None else flip
        mat = _rotation(angles) @ shear @ torch.diag(scale)
        if flip:
            mat = mat @ torch.diag(torch.tensor([-1.0, 1.0, 1.0]))
        centre = torch.as_tensor(self.maps[map_id].centre_mm, dtype=torch.float32)
        centre = centre + self._uniform(gen, -1, 1, (3,)) * cfg.translation_mm
        velocity = None
        if cfg.nonlin_std_mm > 0:
            coarse = [max(2, int(round(n * cfg.res_mm / cfg.nonlin_spacing_mm)) + 1) for n in cfg.shape]
            std = float(self._uniform(gen, 0, cfg.nonlin_std_mm))
            velocity = torch.randn([1, 3, *coarse], generator=gen) * std / cfg.res_mm  # voxels
        return mat.float(), centre, flip, velocity

    def _source_coords(self, map_id: int, mat, centre, disp, affine=None):
        """Voxel coordinates in label map ``map_id`` (or in the grid of ``affine``, voxel to
        world mm) of every output voxel ([1, 3, *shape])."""
        cfg = self.config
        base = identity_grid(cfg.shape, self.device)
        if disp is not None:
            base = base + disp[0]
        half = (torch.tensor(cfg.shape, dtype=torch.float32, device=self.device) - 1) / 2
        x_mm = (base - half.view(3, 1, 1, 1)) * cfg.res_mm  # output mm, grid centre at 0
        world = torch.einsum('ab,bijk->aijk', mat.to(self.device), x_mm) \
            + centre.to(self.device).view(3, 1, 1, 1)
        grid = self.maps[map_id].affine if affine is None else affine
        inv = torch.as_tensor(np.linalg.inv(grid), dtype=torch.float32, device=self.device)
        vox = torch.einsum('ab,bijk->aijk', inv[:3, :3], world) + inv[:3, 3].view(3, 1, 1, 1)
        return vox.unsqueeze(0)

    def _velocity_to_disp(self, velocity, inverse: bool = False):
        """Integrate the velocity on an intermediate grid (a quarter of the control spacing:
        the field is smooth there) and upsample the displacement to the output grid."""
        if velocity is None:
            return None
        cfg = self.config
        mid = [min(n, max(velocity.shape[2 + a], int(math.ceil(n * cfg.res_mm * 4 / cfg.nonlin_spacing_mm))))
               for a, n in enumerate(cfg.shape)]
        vel = F.interpolate(velocity.to(self.device), size=mid, mode='trilinear', align_corners=True)
        scale = torch.tensor([(m - 1) / max(n - 1, 1) for m, n in zip(mid, cfg.shape)],
                             device=self.device).view(1, 3, 1, 1, 1)
        vel = vel * scale  # velocity in voxels of the intermediate grid
        disp = integrate_svf(-vel if inverse else vel, cfg.svf_steps) / scale
        return F.interpolate(disp, size=cfg.shape, mode='trilinear', align_corners=True)

    # ------------------------------------------------------------------ intensities
    def _intensities(self, gen: torch.Generator, gen_idx: torch.Tensor, strip: bool) -> torch.Tensor:
        cfg = self.config
        n = len(self.labels)
        if cfg.contrast is None:
            means_c = self._uniform(gen, *cfg.mean_range, (self.n_classes,))
            stds_c = self._uniform(gen, *cfg.std_range, (self.n_classes,))
            means, stds = means_c[self.classes.cpu()], stds_c[self.classes.cpu()]
        else:
            table = CONTRASTS[cfg.contrast]
            extra = self._uniform(gen, *cfg.mean_range, (n,))
            jitter = self._uniform(gen, -5, 5, (n,))
            means = torch.tensor([table.get(t, float('nan')) for t in self._tissue], dtype=torch.float32)
            means = torch.where(torch.isnan(means), extra, means + jitter)
            stds = torch.full((n,), 6.0)
        if strip:
            means[0], stds[0] = 0.0, 0.0
        self.last_intensities = (means.clone(), stds.clone())
        means, stds = means.to(self.device), stds.to(self.device)
        noise = torch.randn(gen_idx.shape, generator=gen).to(self.device)
        img = means[gen_idx] + stds[gen_idx] * noise
        return self._corrupt(gen, img)

    def _corrupt(self, gen: torch.Generator, img: torch.Tensor) -> torch.Tensor:
        """The acquisition model on an image of intensities (about 0-255): bias field,
        clipping, gamma, resolution, noise; the result rescaled to [0, 1]."""
        cfg = self.config
        # bias field
        if cfg.bias_std > 0:
            coarse = [max(2, int(round(n_ * cfg.res_mm / cfg.bias_spacing_mm)) + 1) for n_ in cfg.shape]
            std = float(self._uniform(gen, 0, cfg.bias_std))
            bias = torch.randn([1, 1, *coarse], generator=gen).to(self.device) * std
            bias = F.interpolate(bias, size=cfg.shape, mode='trilinear', align_corners=True)[0, 0]
            img = img * torch.exp(bias)
        img = img.clamp(0, cfg.clip)
        img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-6)
        if cfg.gamma_std > 0:
            img = img ** float(torch.exp(torch.randn((), generator=gen) * cfg.gamma_std))
        img = self._resolution(gen, img)
        if cfg.noise_std > 0:
            std = float(self._uniform(gen, 0, cfg.noise_std))
            img = img + std * torch.randn(img.shape, generator=gen).to(self.device)
        img = img.clamp_min(0)
        return (img - img.min()) / (img.max() - img.min()).clamp_min(1e-6)

    def _resolution(self, gen, img):
        cfg = self.config
        if cfg.fixed_res_mm is not None:
            lr = np.asarray(cfg.fixed_res_mm, dtype=float)
        elif float(torch.rand((), generator=gen)) < cfg.res_prob:
            if float(torch.rand((), generator=gen)) < cfg.aniso_prob:
                lr = np.full(3, cfg.res_mm)
                axis = int(torch.randint(0, 3, (), generator=gen))
                lr[axis] = float(self._uniform(gen, cfg.res_mm, max(cfg.max_slice_mm, cfg.res_mm)))
            else:
                lr = np.full(3, float(self._uniform(gen, cfg.res_mm, max(cfg.max_iso_res_mm, cfg.res_mm))))
        else:
            return img
        factor = np.maximum(lr / cfg.res_mm, 1.0)
        if np.all(factor <= 1.0):
            return img
        x = gaussian_blur(img[None, None], [0.42 * f if f > 1 else 0.0 for f in factor])
        small = [max(2, int(round(n / f))) for n, f in zip(cfg.shape, factor)]
        x = F.interpolate(x, size=small, mode='trilinear', align_corners=True)
        x = F.interpolate(x, size=cfg.shape, mode='trilinear', align_corners=True)
        return x[0, 0]

    # ------------------------------------------------------------------ public API
    def _placed(self, gen: torch.Generator, map_id: int, flip: bool | None = None) -> dict:
        """One random placement of label map ``map_id`` on the output grid (the spatial
        model): its generation-label indices there (mirrored labels when flipped) and the
        transform (``matrix``, ``centre``, ``disp``, ``velocity``, ``flip``, ``coords``: the
        map's voxel coordinates of every output voxel)."""
        mat, centre, flip, velocity = self._spatial(gen, map_id, flip)
        disp = self._velocity_to_disp(velocity)
        coords = self._source_coords(map_id, mat, centre, disp)
        vol = self._volumes[map_id][None, None].float()
        gen_idx = sample_field(vol, coords, mode='nearest')[0, 0].round().long()
        if flip:
            gen_idx = self.flip[gen_idx]
        return {'generation': gen_idx, 'matrix': mat, 'centre': centre, 'disp': disp,
                'velocity': velocity, 'map': map_id, 'flip': flip, 'coords': coords}

    def _one(self, gen: torch.Generator, map_id: int, flip: bool | None = None):
        out = self._placed(gen, map_id, flip)
        gen_idx = out.pop('generation')
        out.pop('coords')
        strip = float(torch.rand((), generator=gen)) < self.config.skull_strip_prob
        if strip:
            gen_idx = torch.where(self.extra[gen_idx], torch.zeros_like(gen_idx), gen_idx)
        image = self._intensities(gen, gen_idx, strip)
        return {'image': image, 'labels': self.to_output[gen_idx], 'generation': gen_idx, **out}

    def _one_real(self, gen: torch.Generator, map_id: int, image: 'RealImage',
                  flip: bool | None = None):
        """A real image moved like a synthetic one (:meth:`_placed`): the image sampled
        trilinearly on its own grid, its label map's labels moving with it, zero outside the
        brain labels (as a skull-stripped synthetic image), then the acquisition model
        (:meth:`_corrupt`)."""
        out = self._placed(gen, map_id, flip)
        gen_idx = out.pop('generation')
        out.pop('coords')
        coords = self._source_coords(map_id, out['matrix'], out['centre'], out['disp'],
                                     image.affine)
        img = sample_field(image.tensor(self.device), coords)[0, 0]
        gen_idx = torch.where(self.extra[gen_idx], torch.zeros_like(gen_idx), gen_idx)
        img = torch.where(gen_idx > 0, img, torch.zeros_like(img))
        return {'image': self._corrupt(gen, img), 'labels': self.to_output[gen_idx],
                'generation': gen_idx, **out}

    def real_pair(self, images: dict[int, 'RealImage'], generator: torch.Generator) -> dict:
        """Two independently moved and corrupted copies of one real image (a label map of
        this synthesizer with the image on its own grid, ``images``: map index -> image),
        both mirrored or neither; the same keys as :meth:`sample_pair` (with
        ``fixed_to_moving``: the exact correspondence)."""
        ids = sorted(images)
        if not ids:
            raise ValueError('real_pair needs at least one real image')
        map_id = ids[int(torch.randint(0, len(ids), (), generator=generator))]
        fixed = self._one_real(generator, map_id, images[map_id])
        moving = self._one_real(generator, map_id, images[map_id], flip=fixed['flip'])
        return {'fixed': {'image': fixed['image'][None, None], 'labels': fixed['labels'][None]},
                'moving': {'image': moving['image'][None, None], 'labels': moving['labels'][None]},
                'maps': (map_id, map_id), 'fixed_to_moving': self.correspondence(fixed, moving)}

    def sample(self, batch_size: int = 1, generator: torch.Generator | None = None,
               map_ids: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """A batch: ``image [B, 1, *shape]`` (float, [0, 1]) and ``labels [B, *shape]``
        (indices into :data:`OUTPUT_LABELS`), plus the label maps' ids."""
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        if map_ids is None:
            map_ids = torch.randint(0, len(self.maps), (batch_size,), generator=gen).tolist()
        items = [self._one(gen, int(m)) for m in map_ids]
        return {
            'image': torch.stack([it['image'] for it in items])[:, None],
            'labels': torch.stack([it['labels'] for it in items]),
            'map': torch.as_tensor([it['map'] for it in items]),
        }

    def sample_pair(self, generator: torch.Generator | None = None, same_anatomy: bool = True,
                    map_ids: tuple[int, int] | None = None,
                    contrasts: tuple[str | None, str | None] | None = None) -> dict:
        """Two synthetic images for registration (both mirrored or neither).

        ``contrasts``: (fixed, moving) contrast of each image (a key of :data:`CONTRASTS`, or
        ``None`` for a random one); default: the configuration's ``contrast`` for both.

        Returns ``fixed`` and ``moving`` dicts (``image [1, 1, *shape]``, ``labels [1, *shape]``)
        and, for one anatomy, ``fixed_to_moving``: for every fixed voxel the moving voxel
        coordinates of the same anatomical point (``[1, 3, *shape]``, channel order i, j, k),
        so ``sample_field(moving, fixed_to_moving)`` is the moving image registered to the
        fixed one. Both images use :func:`grid_affine`.
        """
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        if map_ids is None:
            a = int(torch.randint(0, len(self.maps), (), generator=gen))
            b = a
            if not same_anatomy and len(self.maps) > 1:
                b = int(torch.randint(0, len(self.maps) - 1, (), generator=gen))
                b = b + (b >= a)
            map_ids = (a, b)
        base = self.config
        try:
            if contrasts is not None:
                self.config = replace(base, contrast=contrasts[0])
            fixed = self._one(gen, map_ids[0])
            if contrasts is not None:
                self.config = replace(base, contrast=contrasts[1])
            # one mirror decision for both: a mirrored copy is not the same anatomy
            moving = self._one(gen, map_ids[1], flip=fixed['flip'])
        finally:
            self.config = base
        out = {'fixed': {'image': fixed['image'][None, None], 'labels': fixed['labels'][None]},
               'moving': {'image': moving['image'][None, None], 'labels': moving['labels'][None]},
               'maps': map_ids, 'fixed_to_moving': None}
        if map_ids[0] == map_ids[1]:
            out['fixed_to_moving'] = self.correspondence(fixed, moving)
        return out

    def correspondence(self, fixed: dict, moving: dict) -> torch.Tensor:
        """Moving-grid voxel coordinates of each fixed voxel (same anatomy, exact up to the
        numerical inverse of the moving deformation)."""
        cfg = self.config
        dev = self.device
        base = identity_grid(cfg.shape, dev)
        if fixed['disp'] is not None:
            base = base + fixed['disp'][0]
        half = (torch.tensor(cfg.shape, dtype=torch.float32, device=dev) - 1) / 2
        x_mm = (base - half.view(3, 1, 1, 1)) * cfg.res_mm
        world = torch.einsum('ab,bijk->aijk', fixed['matrix'].to(dev), x_mm) \
            + fixed['centre'].to(dev).view(3, 1, 1, 1)
        rel = world - moving['centre'].to(dev).view(3, 1, 1, 1)
        y_mm = torch.einsum('ab,bijk->aijk', torch.linalg.inv(moving['matrix']).to(dev), rel)
        y_vox = y_mm / cfg.res_mm + half.view(3, 1, 1, 1)
        inv_disp = self._velocity_to_disp(moving['velocity'], inverse=True)
        if inv_disp is not None:
            y_vox = y_vox + sample_field(inv_disp, y_vox[None], padding_mode='border')[0]
        return y_vox[None]

    def synthesize(self, map_id: int, generator: torch.Generator | None = None) -> dict:
        """One full sample with its spatial parameters (for tests and evaluation)."""
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        return self._one(gen, map_id)
