"""KeyMorph's keypoint detector, the fixed grid it sees, and the shipped model.

The detector (Wang et al., MedIA 2023, §4; ``paper_keymorph.md`` §2) is a fully convolutional
stack of ``conv 3x3x3 -> InstanceNorm -> ReLU`` blocks with 2x max-pool downsampling, ending in
one block with ``N`` channels, a ReLU and a centre-of-mass (CoM) layer: keypoint ``k`` is the
centre of mass of activation map ``k``. Convolutions and the CoM commute with translations, so
a translated input gives translated keypoints (exactly for shifts by a multiple of the pooling
factor, away from the borders); rotation robustness is learned from augmentation.

Coordinates
-----------
* Inside the network, keypoints are **voxel coordinates (i, j, k) of the input grid**. Heatmap
  cell ``c`` of a map downsampled ``s`` times by 2 covers input voxels ``[2^s c, 2^s (c+1) - 1]``;
  its coordinate is the centre of that block, ``2^s c + (2^s - 1) / 2``, so the CoM is in the
  input frame with no scaling error (the 8/7 pitfall of ``paper_keymorph.md`` §2.4 is avoided).
* Outside, keypoints are world RAS millimetres: :func:`conform` resamples any image onto the
  detector's axis-aligned grid (``vox2ras`` known), and :meth:`Conformed.to_world` maps voxels
  to mm.

Per-keypoint weights (optional, ``DetectorConfig.weighted``): ``'mass'`` uses each map's total
activation (relative to the mean over keypoints), ``'head'`` a small linear head on the
globally pooled features of the last block; both are positive with mean 1 over the keypoints.
The weights of a *pair* are the product of the two images' weights (renormalised to mean 1),
see :func:`pair_weights`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..weights import sha256_file

__all__ = [
    'DetectorConfig', 'KeypointDetector', 'center_of_mass', 'normalise_heatmaps', 'conform',
    'Conformed', 'KeyMorphModel', 'default_weights', 'read_model_card', 'MODEL_DIR',
    'WEIGHTS_NAME', 'pair_weights', 'robust_normalise', 'grid_vox2ras', 'Conformer',
    'intensity_window', 'apply_window',
]

MODEL_DIR = Path(__file__).resolve().parents[2] / 'models' / 'keymorph'
WEIGHTS_NAME = 'keyprep-keymorph-cpu.pt'
FORMAT = 'keyprep-keymorph-1'


def default_weights() -> Path:
    """The weights that ship inside the package (``keyprep/models/keymorph/``)."""
    return MODEL_DIR / WEIGHTS_NAME


def read_model_card(weights: str | Path | None = None, sha256: str | None = None) -> dict:
    """The model card (``<weights>.json``) if it describes this very file, else ``{}``.

    Reads only the JSON and the file's bytes (no torch work); same rule as the label network's
    card (:func:`keyprep.pipeline.synth.labeller.read_model_card`)."""
    from ..synth.labeller import read_model_card as _read

    return _read(Path(weights) if weights is not None else default_weights(), sha256)


# ---------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class DetectorConfig:
    """Architecture and input grid of the keypoint detector.

    ``features``: output channels of the convolution blocks before the keypoint block;
    ``pool_after``: 1-based indices of the blocks followed by a 2x max-pool; ``stem``:
    ``'conv'`` (every block is a 3x3x3 convolution, as the authors' code) or ``'strided'`` (the
    first block is a 2x2x2 convolution of stride 2, the paper's "downsampling via strided
    convolution", which spares the full-resolution layer on a CPU). ``shape`` must be divisible
    by :attr:`stride`. ``weighted``: ``False``/``'none'``, ``True``/``'mass'``
    or ``'head'``. Defaults: keyprep's CPU model (96^3 at 2.5 mm, a 240 mm field of view).
    """

    n_keypoints: int = 128
    features: tuple[int, ...] = (16, 16, 32, 64, 64, 128)
    pool_after: tuple[int, ...] = (2, 4)
    res_mm: float = 2.5
    shape: tuple[int, int, int] = (96, 96, 96)
    weighted: bool | str = False
    in_channels: int = 1
    stem: str = 'strided'

    def __post_init__(self):
        mode = {False: 'none', True: 'mass', None: 'none'}.get(self.weighted, self.weighted)
        if mode not in ('none', 'mass', 'head'):
            raise ValueError(f"weighted must be False, True, 'mass' or 'head', "
                             f"not {self.weighted!r}")
        object.__setattr__(self, 'weighted', mode)
        object.__setattr__(self, 'features', tuple(int(f) for f in self.features))
        object.__setattr__(self, 'pool_after', tuple(int(p) for p in self.pool_after))
        object.__setattr__(self, 'shape', tuple(int(s) for s in self.shape))
        if self.stem not in ('conv', 'strided'):
            raise ValueError(f"stem must be 'conv' or 'strided', not {self.stem!r}")
        if any(p < 1 or p > len(self.features) for p in self.pool_after):
            raise ValueError('pool_after indexes the feature blocks (1-based)')
        if any(s % self.stride for s in self.shape):
            raise ValueError(f'shape {self.shape} must be divisible by {self.stride}')

    @property
    def stride(self) -> int:
        """Input voxels per heatmap cell along each axis."""
        return 2 ** (len(self.pool_after) + (self.stem == 'strided'))

    @property
    def heatmap_shape(self) -> tuple[int, int, int]:
        return tuple(s // self.stride for s in self.shape)

    @property
    def fov_mm(self) -> tuple[float, float, float]:
        return tuple(s * self.res_mm for s in self.shape)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> 'DetectorConfig':
        return cls(**d)


# ---------------------------------------------------------------------------- CoM layer
def normalise_heatmaps(act: torch.Tensor) -> torch.Tensor:
    """Non-negative maps ``[B, N, d, h, w]`` -> spatial distributions (each sums to 1).

    A map that is zero everywhere (a dead channel) becomes uniform, so its keypoint sits at
    the grid centre instead of a corner."""
    flat = act.flatten(2)
    mass = flat.sum(-1, keepdim=True)
    dead = mass <= 1e-12
    prob = torch.where(dead, torch.full_like(flat, 1.0 / flat.shape[-1]),
                       flat / mass.clamp_min(1e-12))
    return prob.view_as(act)


def center_of_mass(heatmaps: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """Centres of mass ``[B, N, 3]`` of non-negative maps ``[B, N, d, h, w]``, in voxel
    coordinates (i, j, k) of the input grid whose ``stride``-fold downsampling the maps are
    (cell ``c`` sits at ``stride * c + (stride - 1) / 2``). The maps need not be normalised."""
    prob = normalise_heatmaps(heatmaps)
    coords = []
    for axis in range(3):
        others = tuple(a for a in range(2, 5) if a != axis + 2)
        marginal = prob.sum(others)  # [B, N, n_axis]
        n = marginal.shape[-1]
        pos = torch.arange(n, device=prob.device, dtype=prob.dtype) * stride + (stride - 1) / 2
        coords.append((marginal * pos).sum(-1))
    return torch.stack(coords, -1)


# ---------------------------------------------------------------------------- network
class _Block(nn.Sequential):
    def __init__(self, cin: int, cout: int, strided: bool = False):
        conv = nn.Conv3d(cin, cout, 2, stride=2) if strided else nn.Conv3d(cin, cout, 3, padding=1)
        super().__init__(conv, nn.InstanceNorm3d(cout), nn.ReLU())


class KeypointDetector(nn.Module):
    """Convolution blocks -> N-channel block -> ReLU -> centre of mass.

    ``forward(x [B, 1, *shape])`` returns ``points [B, N, 3]`` (input-grid voxels i, j, k),
    ``weights [B, N]`` (or ``None``) and ``heatmaps [B, N, d, h, w]`` (each sums to 1)."""

    def __init__(self, cfg: DetectorConfig = DetectorConfig()):
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        cin = cfg.in_channels
        for i, cout in enumerate(cfg.features, start=1):
            layers.append(_Block(cin, cout, strided=(i == 1 and cfg.stem == 'strided')))
            if i in cfg.pool_after:
                layers.append(nn.MaxPool3d(2))
            cin = cout
        self.body = nn.Sequential(*layers)
        # the paper's last block is conv + IN + ReLU with N channels, then the CoM
        self.keypoints = _Block(cin, cfg.n_keypoints)
        self.head = nn.Linear(cin, cfg.n_keypoints) if cfg.weighted == 'head' else None

    def forward(self, x: torch.Tensor) -> dict:
        feats = self.body(x)
        act = F.relu(self.keypoints(feats))  # the block's ReLU, kept explicit for clarity
        heat = normalise_heatmaps(act)
        points = center_of_mass(heat, self.cfg.stride)
        weights = None
        if self.cfg.weighted == 'mass':
            mass = act.flatten(2).sum(-1)
            weights = mass / mass.mean(-1, keepdim=True).clamp_min(1e-12)
        elif self.cfg.weighted == 'head':
            logits = self.head(feats.mean((2, 3, 4)))
            weights = logits.softmax(-1) * self.cfg.n_keypoints
        return {'points': points, 'weights': weights, 'heatmaps': heat}


def pair_weights(w_fixed: torch.Tensor | None,
                 w_moving: torch.Tensor | None) -> torch.Tensor | None:
    """Weights of corresponding keypoints of two images: product, renormalised to mean 1."""
    if w_fixed is None and w_moving is None:
        return None
    w = (w_fixed if w_fixed is not None else 1) * (w_moving if w_moving is not None else 1)
    return w / w.mean(-1, keepdim=True).clamp_min(1e-12)


# ---------------------------------------------------------------------------- conforming
def grid_vox2ras(shape: Sequence[int], res_mm: float, centre_mm: Sequence[float],
                rotation: np.ndarray | None = None) -> np.ndarray:
    """Voxel-to-RAS matrix of an isotropic grid whose centre is ``centre_mm``: axis-aligned,
    or with its axes turned by ``rotation`` (3x3, about the centre)."""
    aff = np.diag([res_mm, res_mm, res_mm, 1.0])
    if rotation is not None:
        aff[:3, :3] = np.asarray(rotation, dtype=float) @ aff[:3, :3]
    half = (np.asarray(shape, dtype=float) - 1) / 2
    aff[:3, 3] = np.asarray(centre_mm, dtype=float) - aff[:3, :3] @ half
    return aff


def intensity_window(x: torch.Tensor, mask: torch.Tensor | None = None,
                     percentiles: tuple[float, float] = (0.5, 99.5),
                     max_samples: int = 500_000) -> tuple[float, float]:
    """The ``percentiles`` of the intensities inside ``mask`` (else of the voxels above the
    image minimum): the window :func:`robust_normalise` maps to [0, 1]."""
    sel = mask > 0.5 if mask is not None else x > x.min()
    vals = x[sel]
    if vals.numel() < 2:
        vals = x.flatten()
    if vals.numel() > max_samples:  # deterministic subsample (torch.quantile's size limit)
        step = int(np.ceil(vals.numel() / max_samples))
        vals = vals[::step]
    q = torch.quantile(vals.float(), torch.tensor([p / 100 for p in percentiles], device=x.device))
    return float(q[0]), float(q[1])


def apply_window(x: torch.Tensor, window: tuple[float, float],
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """Map ``window`` to [0, 1], clip, and zero what is outside ``mask``."""
    lo, hi = window
    out = ((x - lo) / max(hi - lo, 1e-6)).clamp(0, 1)
    if mask is not None:
        out = out * (mask > 0.5)
    return out


def robust_normalise(x: torch.Tensor, mask: torch.Tensor | None = None,
                     percentiles: tuple[float, float] = (0.5, 99.5),
                     max_samples: int = 500_000) -> torch.Tensor:
    """Map the ``percentiles`` of the intensities inside ``mask`` (else of the voxels above the
    image minimum) to [0, 1], clip, and zero what is outside ``mask``. Same on every device;
    used by :func:`conform` and by training, so both see the same intensity range."""
    return apply_window(x, intensity_window(x, mask, percentiles, max_samples), mask)


@dataclass
class Conformed:
    """An image on the detector grid: ``tensor [1, 1, *shape]`` in [0, 1] and its voxel-to-RAS
    matrix (``vox2ras``, 4x4)."""

    tensor: torch.Tensor
    vox2ras: np.ndarray
    centre_mm: np.ndarray = field(default=None)

    def to_world(self, points_vox) -> np.ndarray:
        """Voxel coordinates ``[..., 3]`` (tensor or array) -> RAS mm (float64 numpy)."""
        if hasattr(points_vox, 'detach'):
            points_vox = points_vox.detach().cpu().double().numpy()
        p = np.asarray(points_vox, dtype=float)
        return p @ self.vox2ras[:3, :3].T + self.vox2ras[:3, 3]

    def to_voxel(self, points_mm) -> np.ndarray:
        """RAS mm ``[..., 3]`` -> voxel coordinates of this grid."""
        inv = np.linalg.inv(self.vox2ras)
        p = np.asarray(points_mm, dtype=float)
        return p @ inv[:3, :3].T + inv[:3, 3]


def _prefilter(data: np.ndarray, affine: np.ndarray, res_mm: float, device,
               order: str = 'bilinear') -> torch.Tensor:
    """Native ``data`` as a ``[1, 1, ...]`` tensor, blurred against aliasing when the grid
    (``res_mm``) is coarser than its voxels."""
    from ..synth.generator import gaussian_blur

    vol = torch.as_tensor(np.ascontiguousarray(data, dtype=np.float32), device=device)[None, None]
    if order == 'bilinear':
        zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))
        sig = [0.42 * res_mm / z if res_mm > 1.2 * z else 0.0 for z in zooms]
        vol = gaussian_blur(vol, sig)
    return vol


def _sample(vol: torch.Tensor, affine: np.ndarray, shape, vox2ras: np.ndarray,
            order: str = 'bilinear') -> torch.Tensor:
    """Sample a (prefiltered) native volume on the grid ``vox2ras`` of ``shape``."""
    from ..synth.generator import identity_grid, sample_field

    dev = vol.device
    to_native = torch.as_tensor(np.linalg.inv(affine) @ vox2ras, dtype=torch.float32, device=dev)
    grid = identity_grid(shape, dev)
    coords = torch.einsum('ab,bijk->aijk', to_native[:3, :3], grid) \
        + to_native[:3, 3].view(3, 1, 1, 1)
    return sample_field(vol, coords[None], mode=order, padding_mode='zeros')


def _resample(data: np.ndarray, affine: np.ndarray, shape, vox2ras: np.ndarray, device,
              res_mm: float, order: str = 'bilinear') -> torch.Tensor:
    """Resample native ``data`` onto the grid (anti-aliased when it is coarser)."""
    return _sample(_prefilter(data, affine, res_mm, device, order), affine, shape, vox2ras, order)


class Conformer:
    """One image (and optional brain mask) ready to be resampled onto the detector's grid in
    any orientation about one centre (:meth:`grid`). The centre, the anti-aliasing blur and the
    intensity window are computed once, from the axis-aligned grid, so every orientation sees
    the same intensities (used by the pose search, :mod:`keyprep.pipeline.keymorph.search`).

    The grid is isotropic (``cfg.res_mm``), of ``cfg.shape`` voxels and centred on the
    intensity centre of mass of the brain (``mask`` when given, a nibabel image on any grid;
    else of the whole image above its 0.5th percentile), so translations are handled before
    the network. Intensities: robust min-max (0.5/99.5 percentiles inside the brain) to
    [0, 1]; outside the mask is zero."""

    def __init__(self, img, cfg: DetectorConfig, mask=None,
                 device: str | torch.device = 'cpu'):
        data = np.asarray(img.dataobj, dtype=np.float32)
        if data.ndim > 3:
            data = data[..., 0]
        data = np.nan_to_num(data)
        affine = np.asarray(img.affine, dtype=float)
        mdata = None
        if mask is not None:
            mdata = (np.asarray(mask.dataobj) > 0).astype(np.float32)
            if mdata.ndim > 3:
                mdata = mdata[..., 0]
            if not mdata.any():
                raise ValueError('the brain mask is empty')
        # intensity centre of mass of the brain
        if mdata is not None and mdata.shape == data.shape and np.allclose(mask.affine, affine):
            w = np.clip(data, 0, None) * mdata
        else:
            w = np.clip(data - np.percentile(data, 0.5), 0, None)
            if mdata is not None:  # mask on another grid: use its own centroid
                idx = np.argwhere(mdata > 0).mean(0)
                centre = mask.affine[:3, :3] @ idx + mask.affine[:3, 3]
                w = None
        if w is not None:
            total = w.sum()
            if total <= 0:
                raise ValueError('the image has no positive intensity to centre on')
            idx = [np.arange(n) for n in w.shape]
            c = [float((w.sum(tuple(b for b in range(3) if b != a)) * idx[a]).sum() / total)
                 for a in range(3)]
            centre = affine[:3, :3] @ np.asarray(c) + affine[:3, 3]
        self.cfg = cfg
        self.centre_mm = np.asarray(centre, dtype=float)
        dev = torch.device(device)
        self.affine = affine
        self.volume = _prefilter(data, affine, cfg.res_mm, dev)
        self.mask_affine = np.asarray(mask.affine, dtype=float) if mdata is not None else None
        self.mask_volume = _prefilter(mdata, self.mask_affine, cfg.res_mm, dev) \
            if mdata is not None else None
        vox2ras = grid_vox2ras(cfg.shape, cfg.res_mm, self.centre_mm)
        x, m = self._sample(vox2ras)
        self.window = intensity_window(x, m)
        self._identity = Conformed(tensor=apply_window(x, self.window, m), vox2ras=vox2ras,
                                   centre_mm=self.centre_mm)

    def _sample(self, vox2ras):
        x = _sample(self.volume, self.affine, self.cfg.shape, vox2ras)
        m = None
        if self.mask_volume is not None:
            m = _sample(self.mask_volume, self.mask_affine, self.cfg.shape, vox2ras)
        return x, m

    def grid(self, rotation: np.ndarray | None = None) -> Conformed:
        """The image on the detector grid turned by ``rotation`` (3x3, world RAS, about the
        centre; ``None``: axis-aligned). Keypoints detected on it map to this image's world
        mm through the returned grid's ``vox2ras``, whatever the rotation."""
        if rotation is None:
            return self._identity
        vox2ras = grid_vox2ras(self.cfg.shape, self.cfg.res_mm, self.centre_mm, rotation)
        x, m = self._sample(vox2ras)
        return Conformed(tensor=apply_window(x, self.window, m), vox2ras=vox2ras,
                         centre_mm=self.centre_mm)


def conform(img, cfg: DetectorConfig, mask=None, device: str | torch.device = 'cpu') -> Conformed:
    """Resample a NIfTI image onto the detector's axis-aligned grid (see :class:`Conformer`)."""
    return Conformer(img, cfg, mask, device).grid()


# ---------------------------------------------------------------------------- shipped model
class KeyMorphModel:
    """A trained detector with its grid, loaded from one weights file (state dict + config).

    ``KeyMorphModel.load(path=None, device='cpu')``; ``path=None`` is :func:`default_weights`.
    """

    def __init__(self, detector: KeypointDetector, device: str | torch.device = 'cpu',
                 path: Path | None = None, meta: dict | None = None):
        self.device = torch.device(device)
        self.detector = detector.to(self.device).eval()
        self.cfg = detector.cfg
        self.path = path
        self.meta = dict(meta or {})
        self.sha256 = sha256_file(path) if path is not None and path.is_file() else None
        self.card = read_model_card(path, self.sha256) if path is not None else {}

    @classmethod
    def load(cls, path: str | Path | None = None,
             device: str | torch.device = 'cpu') -> 'KeyMorphModel':
        from ..errors import WeightsError
        from ..weights import load_weights

        path = Path(path) if path is not None else default_weights()
        # weights_only=True: a file crafted to run code when unpickled is refused
        payload = load_weights(path, 'KeyMorph', ('format', 'state_dict', 'detector'),
                               hint=f' (they ship with keyprep in {MODEL_DIR}; reinstall it, '
                                    'or pass weights exported by `keyprep train keymorph '
                                    '--export`)')
        if payload.get('format') != FORMAT:
            raise WeightsError(f'{path} is not a keyprep KeyMorph weights file')
        try:
            cfg = DetectorConfig.from_dict(payload['detector'])
            det = KeypointDetector(cfg)
            det.load_state_dict({k: v.float() for k, v in payload['state_dict'].items()})
        except (TypeError, ValueError, RuntimeError, AttributeError) as exc:
            raise WeightsError(f'KeyMorph weights {path} do not fit the detector they '
                               f'describe ({type(exc).__name__})') from None
        meta = {k: v for k, v in payload.items() if k not in ('state_dict', 'detector')}
        return cls(det, device, path, meta)

    @torch.no_grad()
    def detect_conformed(self, conf: Conformed) -> dict:
        """Keypoints of an already conformed image: voxel and world coordinates, weights and
        heatmaps (numpy)."""
        return self.detect_batch([conf])[0]

    def detect_batch(self, confs: Sequence[Conformed], batch: int = 8) -> list[dict]:
        """:meth:`detect_conformed` for several conformed images of the same grid shape, with
        ``batch`` of them per forward pass (no gradients)."""
        out = []
        with torch.inference_mode():
            for start in range(0, len(confs), batch):
                chunk = confs[start:start + batch]
                res = self.detector(torch.cat([c.tensor for c in chunk]).to(self.device))
                for i, conf in enumerate(chunk):
                    vox = res['points'][i].double().cpu().numpy()
                    w = res['weights']
                    weights = w[i].double().cpu().numpy() if w is not None \
                        else np.ones(vox.shape[0])
                    out.append({'points_vox': vox, 'points_mm': conf.to_world(vox),
                                'weights': weights, 'heatmaps': res['heatmaps'][i].cpu().numpy(),
                                'conformed': conf})
        return out

    def detect(self, img, mask=None) -> tuple[np.ndarray, np.ndarray]:
        """Keypoints of a NIfTI image: ``(points_mm [N, 3] RAS mm, weights [N])`` as float64
        numpy arrays (uniform ones for an unweighted model). ``mask``: brain mask image."""
        res = self.detect_conformed(conform(img, self.cfg, mask, self.device))
        return res['points_mm'], res['weights']
