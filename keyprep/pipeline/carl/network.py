"""CARL's network: coordinate attention Xi_theta, refinement U-Nets and their composition.

CARL (Greer et al., ``paper_carl.md`` §3) is GradICON's three-step coarse-to-fine network
whose first step is replaced by *coordinate attention*::

    CARL = TwoStep{ Down{ TwoStep{ Down{Xi_theta}, Psi_1 } }, Psi_2 }

* ``Down{Phi}[M, F] = Phi[avgpool2(M), avgpool2(F)]``: Xi_theta runs at 1/4 of the working
  grid, Psi_1 at 1/2, Psi_2 at the full working grid.
* ``TwoStep{Phi, Psi}[M, F] = Phi[M, F] o Psi[M o Phi[M, F], F]`` (the paper's Eq. 14).
* Xi_theta: a same-resolution dilated residual CNN encodes both images, zero-padded by ``P``
  cells; the features are L2-normalised per voxel and multiplied by ``feature_norm`` (4 in
  the paper: logits are 16 x cosine). Every fixed voxel (query, fixed features cropped back to
  the image) attends over all moving voxels of the *padded* grid (keys); the values are the
  coordinates of those moving voxels, so the output is the expected moving coordinate (the
  centre of mass of the attention mask). No positional encoding: the map is
  [W,U]-equivariant to integer translations (Eq. 10). Attention goes through
  :func:`torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels:
  the ``Nq x Nk`` matrix is never stored), always in float32.
* Psi_1, Psi_2: small U-Nets on ``cat(warped moving, fixed)`` predicting a displacement
  increment (last convolution zero-initialised, so each starts as the identity); being
  displacement-predicting convolutional nets they are [U,U]-equivariant (Eq. 13), and the
  TwoStep lemma (Eq. 15) makes the whole composition [W,U]-equivariant.

Coordinates and displacements (the convention of every function here)
---------------------------------------------------------------------
* Positions are **voxel coordinates (i, j, k) of the full-resolution working grid** (array
  index order, the same axes as the arrays; level 0). A cell ``c`` of a grid downsampled
  ``l`` times by 2 (level ``l``, stride ``s = 2**l``) covers full-resolution voxels
  ``[s c, s (c + 1) - 1]`` and sits at their centre ``s c + (s - 1) / 2`` (the convention of
  KeyMorph's centre-of-mass layer). A shift of the input by ``s`` voxels is then exactly a
  shift of one cell at level ``l``: the equivariance of every step is exact for shifts that
  are multiples of 4 voxels (of the LCM of the strides, for the U-Nets), away from the borders.
* A transform is a **displacement field** ``u`` ``[B, 3, *grid_l]`` stored on the cells of
  one level, in full-resolution voxels, and means the map ``phi(x) = x + u(x)`` with ``u``
  interpolated trilinearly (border values outside). ``phi`` maps *fixed* positions to
  *moving* positions (pull-back, the paper's Eq. 1): ``moving(phi(x)) ~ fixed(x)``, and
  ``model(moving, fixed)`` returns it.
* :func:`register_arrays` (what the engine calls) returns the same convention on the caller's
  grid: ``disp_fwd`` in voxels of the given arrays, ``moving(x + disp_fwd(x)) ~ fixed(x)``
  for each voxel ``x`` (index order, channel ``a`` = displacement along array axis ``a``);
  ``disp_inv`` the other direction, ``fixed(y + disp_inv(y)) ~ moving(y)``.

Working grid of :func:`register_arrays`: the pair (already on one grid) is resampled to an
isotropic grid of ``CarlConfig.shape`` voxels of ``res_mm`` (coarser when the brain does not
fit: the grid always covers the union of the two brains' bounding boxes plus a margin),
centred on that bounding box; the displacement comes back by trilinear interpolation,
scaled by the ratio of the voxel sizes.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..synth.generator import gaussian_blur, identity_grid, sample_field

__all__ = [
    'CarlConfig', 'PRESETS', 'CarlNet', 'FeatureEncoder', 'CoordinateAttention', 'RefineUNet',
    'coordinate_attention', 'cell_centres', 'eval_disp', 'warp', 'compose', 'register_arrays',
    'load_carl', 'check_carl_weights', 'default_weights', 'normalise_intensity', 'FORMAT',
    'MODEL_DIR', 'WEIGHTS_NAME', 'label_fractions',
]

MODEL_DIR = Path(__file__).resolve().parents[2] / 'models' / 'carl'
WEIGHTS_NAME = 'keyprep-carl.pt'
FORMAT = 'keyprep-carl-1'


def default_weights() -> Path:
    """The weights that ship inside the package (``keyprep/models/carl/keyprep-carl.pt``)."""
    return MODEL_DIR / WEIGHTS_NAME


# ---------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class CarlConfig:
    """Architecture and working grid of CARL.

    ``shape``: working grid (voxels, each divisible by 4); ``res_mm``: its voxel size (the
    finest; coarser when a brain does not fit). Xi_theta: ``enc_channels`` wide, ``enc_blocks``
    residual blocks (``enc_norm`` at their input) of convolutions with ``dilations``,
    projected to ``feat_dim`` features
    (no projection when equal), L2-normalised and scaled to ``feature_norm``; ``pad`` = P,
    zero padding in cells of the attention grid (``shape / 4``). ``refine1`` / ``refine2``:
    widths of the U-Nets Psi_1 (1/2) and Psi_2 (full) per downsampling level; their outputs
    are multiplied by ``refine_scale`` (full-resolution voxels). ``first``: ``'attention'``
    (CARL) or ``'unet'`` (the displacement-only baseline of the paper's retina experiment,
    a U-Net of widths ``refine1`` at 1/4). ``padding_mode``: of the U-Nets' convolutions
    (``'circular'`` only for exact equivariance tests). ``io_lr``: default learning rate of
    instance optimisation.
    """

    shape: tuple[int, int, int] = (96, 96, 96)
    res_mm: float = 2.0
    enc_channels: int = 32
    enc_blocks: int = 2
    dilations: tuple[int, ...] = (1, 2, 4)
    enc_norm: str = 'instance'
    feat_dim: int = 16
    feature_norm: float = 4.0
    pad: int = 4
    refine1: tuple[int, ...] = (16, 32, 64)
    refine2: tuple[int, ...] = (8, 16, 32)
    refine_scale: float = 1.0
    first: str = 'attention'
    padding_mode: str = 'zeros'
    io_lr: float = 2e-5

    def __post_init__(self):
        for key in ('shape', 'dilations', 'refine1', 'refine2'):
            object.__setattr__(self, key, tuple(int(v) for v in getattr(self, key)))
        if len(self.shape) != 3 or any(s % 4 or s < 8 for s in self.shape):
            raise ValueError(f'shape {self.shape}: three sizes, each a multiple of 4 (>= 8)')
        if self.first not in ('attention', 'unet'):
            raise ValueError(f"first must be 'attention' or 'unet', not {self.first!r}")
        if self.enc_norm not in ('instance', 'none'):
            raise ValueError(f"enc_norm must be 'instance' or 'none', not {self.enc_norm!r}")
        if self.padding_mode not in ('zeros', 'circular'):
            raise ValueError(f"padding_mode must be 'zeros' or 'circular'")
        if self.pad < 0:
            raise ValueError('pad must be >= 0')

    @property
    def attention_shape(self) -> tuple[int, int, int]:
        return tuple(s // 4 for s in self.shape)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> 'CarlConfig':
        return cls(**d)


#: ``cpu``: 96^3 at 2 mm (192 mm field of view), attention at 24^3 (8 mm cells) over
#: (24 + 2 x 4)^3 keys, 32 channels projected to 16 features; Psi_1/Psi_2 small U-Nets
#: (3 levels). ``paper``: the paper's sizes for a GPU: 176^3 (Xi_theta at 44^3, as the
#: authors' code), 128 channels, 3 blocks of dilations 1-2-4, P = 9, U-Nets of GradICON's
#: widths (16-32-64-256-512).
PRESETS: dict[str, CarlConfig] = {
    'cpu': CarlConfig(),
    'paper': CarlConfig(shape=(176, 176, 176), res_mm=1.25, enc_channels=128, enc_blocks=3,
                        dilations=(1, 2, 4), feat_dim=128, pad=9,
                        refine1=(16, 32, 64, 256, 512), refine2=(16, 32, 64, 256, 512)),
}


# ---------------------------------------------------------------------------- geometry
def cell_centres(shape: Sequence[int], level: int, device=None,
                 dtype=torch.float32) -> torch.Tensor:
    """Full-resolution voxel coordinates ``[1, 3, *shape]`` of the cells of a level-``level``
    grid of ``shape`` cells (cell ``c`` at ``2**level * c + (2**level - 1) / 2``)."""
    s = 2 ** level
    return (identity_grid(shape, device, dtype) * s + (s - 1) / 2)[None]


def eval_disp(u: torch.Tensor, level: int, points: torch.Tensor) -> torch.Tensor:
    """Displacement ``u [B, 3, *grid]`` (a level-``level`` field) at full-resolution points
    ``[B, 3, ...]`` (trilinear, border values outside the grid)."""
    s = 2 ** level
    coords = (points - (s - 1) / 2) / s
    if coords.shape[0] != u.shape[0]:
        coords = coords.expand(u.shape[0], *coords.shape[1:])
    return sample_field(u, coords, mode='bilinear', padding_mode='border')


def warp(image: torch.Tensor, image_level: int, u: torch.Tensor, u_level: int) -> torch.Tensor:
    """``image o phi`` on the cells of ``image`` (a level-``image_level`` grid), for the map
    ``phi(x) = x + u(x)`` of a level-``u_level`` displacement (border values outside)."""
    pts = cell_centres(image.shape[2:], image_level, image.device, image.dtype)
    pts = pts + eval_disp(u, u_level, pts)
    s = 2 ** image_level
    return sample_field(image, (pts - (s - 1) / 2) / s, mode='bilinear', padding_mode='border')


def compose(outer: torch.Tensor, outer_level: int, inner: torch.Tensor,
            inner_level: int) -> torch.Tensor:
    """Displacement of ``phi_outer o phi_inner`` on the cells of ``inner``:
    ``u(x) = u_inner(x) + u_outer(x + u_inner(x))``."""
    pts = cell_centres(inner.shape[2:], inner_level, inner.device, inner.dtype)
    return inner + eval_disp(outer, outer_level, pts + inner)


# ---------------------------------------------------------------------------- attention
def coordinate_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         chunk: int | None = None) -> torch.Tensor:
    """``softmax(q k^T) v`` for ``q [B, Nq, d]``, ``k [B, Nk, d]``, ``v [B, Nk, c]`` (scale 1:
    the features carry the temperature), without storing the ``Nq x Nk`` matrix.

    Through :func:`~torch.nn.functional.scaled_dot_product_attention`, whose flash and
    memory-efficient kernels need the values as wide as the keys: ``v`` is zero-padded to
    ``d`` channels (the padding contributes nothing) and the output cut back to ``c``.
    ``chunk``: process that many queries at a time instead (explicit softmax per chunk;
    the fallback when ``c > d``). Runs in float32 whatever the autocast state: coordinates
    of a 100-voxel grid in bfloat16 would be off by half a voxel.
    """
    dev_type = q.device.type
    with torch.autocast(dev_type, enabled=False):
        q, k, v = q.float(), k.float(), v.float()
        c, d = v.shape[-1], q.shape[-1]
        if chunk is None and c <= d:
            vv = F.pad(v, (0, d - c)) if c < d else v
            # contiguous: strided inputs send the CPU dispatcher to the O(Nq Nk) math kernel
            out = F.scaled_dot_product_attention(q[:, None].contiguous(), k[:, None].contiguous(),
                                                 vv[:, None].contiguous(), scale=1.0)
            return out[:, 0, :, :c]
        chunk = chunk or 4096
        outs = []
        for start in range(0, q.shape[1], chunk):
            logits = q[:, start:start + chunk] @ k.transpose(1, 2)
            outs.append(logits.softmax(-1) @ v)
        return torch.cat(outs, 1)


class FeatureEncoder(nn.Module):
    """Xi_theta's encoder: a stem convolution and ReLU, then ``blocks`` residual blocks
    (``norm`` at the block input, convolutions of ``dilations``, ReLU between them), all at
    one resolution (no stride, no pooling: exactly equivariant to integer shifts), then a 1x1
    projection to ``feat_dim`` when it differs from ``channels``.

    ``norm='instance'`` (default) stands for the batch norm of the authors' code (their
    batches are of one pair per GPU): it removes each channel's common level, without which
    the features of all voxels point the same way (mean cosine 0.94 at initialisation on a
    synthetic brain pair, against 0.56 with it) and the untrained attention averages over the
    whole image (output coordinates spread 2 voxels instead of 10 on a 96^3 grid: every voxel
    mapped to the centre). Its statistics are global over the padded grid, so it keeps the
    equivariance under the paper's assumptions. ``'none'``: no normalisation; a zero input
    then gives zero features when the biases are zero, which the exact equivariance tests
    use."""

    def __init__(self, channels: int, blocks: int, dilations: Sequence[int], feat_dim: int,
                 norm: str = 'instance'):
        super().__init__()
        self.stem = nn.Conv3d(1, channels, 3, padding=1)
        self.norms = nn.ModuleList(
            nn.InstanceNorm3d(channels, affine=True) if norm == 'instance' else nn.Identity()
            for _ in range(blocks))
        self.blocks = nn.ModuleList(
            nn.ModuleList(nn.Conv3d(channels, channels, 3, padding=d, dilation=d)
                          for d in dilations) for _ in range(blocks))
        self.proj = nn.Conv3d(channels, feat_dim, 1) if feat_dim != channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        for norm, convs in zip(self.norms, self.blocks):
            x = norm(x)
            y = x
            for i, conv in enumerate(convs):
                y = conv(y)
                if i < len(convs) - 1:
                    y = F.relu(y)
            x = x + y
        return self.proj(x)


class CoordinateAttention(nn.Module):
    """Xi_theta: ``[moving, fixed]`` level-2 images -> level-2 displacement (full-resolution
    voxels). The moving features stay on the padded grid (keys), the fixed ones are cropped
    back (queries); values are the padded moving cells' coordinates (``level``: the grid's
    level, 2 in CARL)."""

    def __init__(self, cfg: CarlConfig, level: int = 2):
        super().__init__()
        self.cfg = cfg
        self.level = level
        self.encoder = FeatureEncoder(cfg.enc_channels, cfg.enc_blocks, cfg.dilations,
                                      cfg.feat_dim, cfg.enc_norm)

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """Zero-padded by P, encoded, unit-normalised per voxel and scaled to
        ``feature_norm`` (``[B, d, *(shape + 2P)]``)."""
        p = self.cfg.pad
        f = self.encoder(F.pad(image, [p] * 6) if p else image).float()
        return self.cfg.feature_norm * f / (1e-3 + f.norm(dim=1, keepdim=True))

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        p = self.cfg.pad
        shape = fixed.shape[2:]
        fm = self.features(moving)
        ff = self.features(fixed)
        if p:
            ff = ff[:, :, p:-p, p:-p, p:-p]
        b = fixed.shape[0]
        q = ff.flatten(2).transpose(1, 2)
        k = fm.flatten(2).transpose(1, 2)
        padded = [n + 2 * p for n in moving.shape[2:]]
        s = 2 ** self.level
        coords = (identity_grid(padded, fixed.device) - p) * s + (s - 1) / 2
        v = coords.flatten(1).T[None].expand(b, -1, -1)
        out = coordinate_attention(q, k, v)  # [B, Nq, 3]
        out = out.transpose(1, 2).reshape(b, 3, *shape)
        return out - cell_centres(shape, self.level, fixed.device)


class RefineUNet(nn.Module):
    """A displacement-predicting U-Net (GradICON's layout, smaller): ``len(widths)`` stride-2
    convolutions down, nearest/trilinear x2 up with skip concatenation, and one convolution at
    the input resolution on ``cat(upsampled features, input)`` to 3 channels, zero-initialised
    (the network starts as the identity) and multiplied by ``scale``. Inputs of any size
    (padded inside to a multiple of ``2**len(widths)``)."""

    def __init__(self, widths: Sequence[int], in_channels: int = 2, scale: float = 1.0,
                 padding_mode: str = 'zeros'):
        super().__init__()
        self.widths = tuple(widths)
        self.scale = scale
        self.mode = 'nearest' if padding_mode == 'circular' else 'trilinear'
        kw = dict(padding=1, padding_mode=padding_mode)
        chans = [in_channels, *self.widths]
        self.down = nn.ModuleList(nn.Conv3d(chans[i], chans[i + 1], 3, stride=2, **kw)
                                  for i in range(len(self.widths)))
        self.same = nn.ModuleList(nn.Conv3d(w, w, 3, **kw) for w in self.widths)
        # decoder: from level L to level 1, concat the skip of the level above
        self.up = nn.ModuleList(nn.Conv3d(chans[i + 2] + chans[i + 1], chans[i + 1], 3, **kw)
                                for i in range(len(self.widths) - 1))
        self.out = nn.Conv3d(chans[1] + in_channels, 3, 3, **kw)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def _upsample(self, x: torch.Tensor, size) -> torch.Tensor:
        if self.mode == 'nearest':
            return F.interpolate(x, size=size, mode='nearest')
        return F.interpolate(x, size=size, mode='trilinear', align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[2:]
        m = 2 ** len(self.widths)
        extra = [(-n) % m for n in shape]
        if any(extra):
            x = F.pad(x, [0, extra[2], 0, extra[1], 0, extra[0]])
        skips = [x]
        h = x
        for down, same in zip(self.down, self.same):
            h = F.leaky_relu(down(h), 0.2)
            h = F.leaky_relu(same(h), 0.2)
            skips.append(h)
        for i in range(len(self.widths) - 1, 0, -1):  # levels L-1 ... 1
            h = self._upsample(h, skips[i].shape[2:])
            h = F.leaky_relu(self.up[i - 1](torch.cat([h, skips[i]], 1)), 0.2)
        h = self._upsample(h, x.shape[2:])
        out = self.out(torch.cat([h, x], 1)) * self.scale
        return out[:, :, :shape[0], :shape[1], :shape[2]]


class CarlNet(nn.Module):
    """``TwoStep{Down{TwoStep{Down{Xi}, Psi_1}}, Psi_2}`` on the working grid.

    ``forward(moving, fixed)`` (``[B, 1, *shape]``, intensities in [0, 1]) returns the
    displacement ``[B, 3, *shape]`` (full-resolution voxels) of ``phi`` with
    ``moving(x + u(x)) ~ fixed(x)``; :meth:`steps` also returns the intermediate fields."""

    def __init__(self, cfg: CarlConfig = CarlConfig()):
        super().__init__()
        self.cfg = cfg
        if cfg.first == 'attention':
            self.first = CoordinateAttention(cfg, level=2)
        else:
            self.first = RefineUNet(cfg.refine1, scale=cfg.refine_scale,
                                    padding_mode=cfg.padding_mode)
        self.refine1 = RefineUNet(cfg.refine1, scale=cfg.refine_scale,
                                  padding_mode=cfg.padding_mode)
        self.refine2 = RefineUNet(cfg.refine2, scale=cfg.refine_scale,
                                  padding_mode=cfg.padding_mode)

    def steps(self, moving: torch.Tensor, fixed: torch.Tensor,
              u2: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The fields of the three stages (``u2`` at 1/4, ``u1`` at 1/2, ``u0`` full); a
        given ``u2`` (the first stage's output for these images) is used instead of running
        the first stage again."""
        m1, f1 = F.avg_pool3d(moving, 2), F.avg_pool3d(fixed, 2)
        m2, f2 = F.avg_pool3d(m1, 2), F.avg_pool3d(f1, 2)
        if u2 is not None:
            pass
        elif self.cfg.first == 'attention':
            u2 = self.first(m2, f2)
        else:
            u2 = self.first(torch.cat([m2, f2], 1)).float()
        psi1 = self.refine1(torch.cat([warp(m1, 1, u2, 2), f1], 1)).float()
        u1 = compose(u2, 2, psi1, 1)
        psi2 = self.refine2(torch.cat([warp(moving, 0, u1, 1), fixed], 1)).float()
        u0 = compose(u1, 1, psi2, 0)
        return {'u2': u2, 'u1': u1, 'u0': u0}

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return self.steps(moving, fixed)['u0']


# ---------------------------------------------------------------------------- weights
def _build_from_payload(payload: dict, path: Path, device='cpu') -> CarlNet:
    from ..errors import WeightsError

    if payload.get('format') != FORMAT:
        raise WeightsError(f'{path} is not a keyprep CARL weights file (format '
                           f'{payload.get("format")!r}, expected {FORMAT!r})')
    try:
        cfg = CarlConfig.from_dict(payload['config'])
        with torch.device(device):
            return CarlNet(cfg)
    except Exception as exc:  # noqa: BLE001 - a configuration that does not build
        raise WeightsError(f'CARL weights {path}: the network they describe cannot be built '
                           f'({type(exc).__name__}: {exc})') from None


def _read(path: Path) -> dict:
    from ..weights import load_weights

    return load_weights(path, 'CARL', ('format', 'state_dict', 'config'),
                        hint=f' (the shipped model is in {MODEL_DIR}; pass weights exported by '
                             '`keyprep train carl --export`)')


def check_carl_weights(path: str | Path | None = None) -> dict:
    """Check a CARL weights file (default: the shipped one) without computing anything (the
    network is built on the ``meta`` device, names and shapes compared); return ``{'path',
    'sha256'}``. Raises :class:`MissingInputError` (66) or :class:`WeightsError` (65)."""
    from ..weights import _compare_state, sha256_file

    path = Path(path) if path is not None else default_weights()
    payload = _read(path)
    model = _build_from_payload(payload, path, device='meta')
    _compare_state(model, payload['state_dict'], 'CARL', path)
    return {'path': str(path), 'sha256': sha256_file(path)}


def load_carl(path: str | Path | None = None,
              device: str | torch.device = 'cpu') -> tuple[CarlNet, dict]:
    """The network of a weights file (``weights_only=True``), in eval mode on ``device``, and
    the file's metadata (everything but the state dict, plus ``path`` and ``sha256``)."""
    from ..errors import WeightsError
    from ..weights import _compare_state, sha256_file

    path = Path(path) if path is not None else default_weights()
    payload = _read(path)
    model = _build_from_payload(payload, path, device='cpu')
    _compare_state(model, payload['state_dict'], 'CARL', path)
    try:
        model.load_state_dict({k: v.float() for k, v in payload['state_dict'].items()})
    except RuntimeError as exc:
        raise WeightsError(f'CARL weights {path} do not fit their network '
                           f'({str(exc).splitlines()[0]})') from None
    meta = {k: v for k, v in payload.items() if k != 'state_dict'}
    meta.update(path=str(path), sha256=sha256_file(path))
    return model.to(device).eval(), meta


# ---------------------------------------------------------------------------- inference
def normalise_intensity(x: np.ndarray, percentiles=(0.5, 99.5),
                        max_samples: int = 500_000) -> np.ndarray:
    """Map the ``percentiles`` of the non-zero voxels (the brain of a brain-masked image) to
    [0, 1], clip; zero stays zero. Any intensity scale; an empty image stays zero."""
    x = np.nan_to_num(np.asarray(x, dtype=np.float32))
    vals = x[x != 0]
    if vals.size < 2:
        return np.zeros_like(x)
    if vals.size > max_samples:  # deterministic subsample
        vals = vals[::int(np.ceil(vals.size / max_samples))]
    lo, hi = np.percentile(vals, percentiles)
    out = np.clip((x - lo) / max(float(hi - lo), 1e-6), 0, 1)
    out[x == 0] = 0
    return out.astype(np.float32)


def _working_grid(fixed: np.ndarray, moving: np.ndarray, spacing: np.ndarray,
                  cfg: CarlConfig) -> tuple[np.ndarray, float]:
    """Centre (input voxels) and voxel size (mm) of the working grid: it covers the union of
    the two brains' bounding boxes plus 4 working voxels on each side."""
    nz = np.argwhere((fixed != 0) | (moving != 0))
    if len(nz):
        lo, hi = nz.min(0), nz.max(0)
    else:
        lo, hi = np.zeros(3), np.asarray(fixed.shape) - 1
    centre = (lo + hi) / 2.0
    extent = (hi - lo + 1) * spacing
    res = max(cfg.res_mm, float(np.max(extent / (np.asarray(cfg.shape) - 8))))
    return centre, res


def _to_working(x: np.ndarray, centre, res: float, spacing, shape, device) -> torch.Tensor:
    """Sample an input array on the working grid (anti-aliased, trilinear, zero outside).

    Anti-aliasing: a box average over ``k = floor(ratio)`` input voxels per axis where the
    working voxels are at least 1.5 times larger (cheap on a 1 mm head, unlike a Gaussian on
    the full grid), then a Gaussian for what remains of the ratio."""
    vol = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32), device=device)[None, None]
    factor = res / np.asarray(spacing, dtype=float)
    k = [int(np.floor(f + 1e-6)) if f >= 1.5 else 1 for f in factor]
    if any(v > 1 for v in k):
        vol = F.avg_pool3d(vol, kernel_size=k, stride=k)
    rest = factor / np.asarray(k)
    vol = gaussian_blur(vol, [0.42 * f if f > 1.2 else 0.0 for f in rest])
    half = (torch.tensor(shape, dtype=torch.float32, device=device) - 1) / 2
    ratio = torch.as_tensor(factor, dtype=torch.float32, device=device).view(3, 1, 1, 1)
    c = torch.as_tensor(centre, dtype=torch.float32, device=device).view(3, 1, 1, 1)
    coords = c + (identity_grid(shape, device) - half.view(3, 1, 1, 1)) * ratio  # input voxels
    kk = torch.as_tensor(k, dtype=torch.float32, device=device).view(3, 1, 1, 1)
    return sample_field(vol, ((coords - (kk - 1) / 2) / kk)[None], padding_mode='zeros')


def _to_input(u: torch.Tensor, centre, res: float, spacing, in_shape) -> torch.Tensor:
    """A working-grid displacement ``[1, 3, *shape]`` (working voxels) on the input grid, in
    input voxels: trilinear, scaled by the ratio of the voxel sizes, border values outside."""
    dev = u.device
    shape = u.shape[2:]
    half = (torch.tensor(shape, dtype=torch.float32, device=dev) - 1) / 2
    ratio = torch.as_tensor(res / spacing, dtype=torch.float32, device=dev).view(1, 3, 1, 1, 1)
    c = torch.as_tensor(centre, dtype=torch.float32, device=dev).view(3, 1, 1, 1)
    out = torch.empty((1, 3, *in_shape), dtype=torch.float32, device=dev)
    for i0 in range(0, in_shape[0], 32):  # slabs: a 1 mm head without a 3 GB coordinate grid
        n0 = min(32, in_shape[0] - i0)
        grid = identity_grid((n0, *in_shape[1:]), dev)
        grid[0] += i0
        w = half.view(3, 1, 1, 1) + (grid - c) / ratio[0]
        out[:, :, i0:i0 + n0] = sample_field(u, w[None], padding_mode='border') * ratio
    return out


def label_fractions(fixed_labels: np.ndarray, moving_labels: np.ndarray, centre, res: float,
                    spacing, shape, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The structure maps of a prompted instance optimisation on the working grid: for every
    label present in both maps (0 is background), the fraction of each working voxel it
    covers (resampled like the images), after a background channel (1 - their sum).
    Returns fixed and moving ``[1, 1 + K, *shape]`` and ``K``."""
    fixed_labels = np.rint(np.asarray(fixed_labels)).astype(np.int64)
    moving_labels = np.rint(np.asarray(moving_labels)).astype(np.int64)
    if fixed_labels.shape != moving_labels.shape:
        raise ValueError(f'label maps {fixed_labels.shape} and {moving_labels.shape} must be '
                         'on one grid')
    ids = sorted((set(np.unique(fixed_labels).tolist())
                  & set(np.unique(moving_labels).tolist())) - {0})
    out = []
    for arr in (fixed_labels, moving_labels):
        chans = [_to_working((arr == k).astype(np.float32), centre, res, spacing, shape, device)
                 for k in ids]
        fg = torch.cat(chans, 1).clamp(0, 1) if chans else \
            torch.zeros((1, 0, *shape), device=device)
        bg = (1 - fg.sum(1, keepdim=True)).clamp(0, 1)
        out.append(torch.cat([bg, fg], 1))
    return out[0], out[1], len(ids)


def _label_term(labels: tuple[torch.Tensor, torch.Tensor] | None,
                weight: float) -> dict:
    """The label term's arguments of :func:`~.losses.pair_loss` for instance optimisation of
    the batch ``(cat[m, f], cat[f, m])``: the structure maps ``labels = (fixed, moving)``
    both ways, compared at half resolution; empty without maps or at weight 0."""
    if labels is None or not weight > 0:
        return {}
    lf, lm = labels
    return {'onehot_moving': torch.cat([lm, lf]), 'onehot_fixed': torch.cat([lf, lm]),
            'dice_weight': float(weight), 'label_level': 1}


def _io_copy(model: CarlNet, m: torch.Tensor, f: torch.Tensor, steps: int, lr: float,
             seed: int, precision: str = 'fp32', similarity: str = 'lncc',
             labels: tuple[torch.Tensor, torch.Tensor] | None = None,
             label_weight: float = 0.0, train: str = 'all',
             u2: torch.Tensor | None = None) -> tuple[CarlNet, list[float]]:
    """Instance optimisation: Adam on a deep copy of the weights for ``steps`` steps on this
    pair's loss (``similarity`` both ways + GradICON, plus ``label_weight`` times the soft
    Dice of the structure maps ``labels = (fixed, moving)`` when given, compared at half the
    working resolution); the given model is left untouched. ``train``: ``'all'`` the
    weights (the paper's), or ``'refine'`` those of the refinement networks only (the
    coordinate-attention step stays as trained: its output is computed once, or given as
    ``u2``, the first stage's output for ``(cat[m, f], cat[f, m])``)."""
    from ..resources import autocast
    from .losses import pair_loss

    if train not in ('all', 'refine'):
        raise ValueError(f"io train must be 'all' or 'refine', not {train!r}")
    net = copy.deepcopy(model)
    net.train()
    for name, p in net.named_parameters():
        p.requires_grad_(train == 'all' or not name.startswith('first.'))
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator(device=m.device).manual_seed(int(seed))
    prompt = _label_term(labels, label_weight)
    losses = []
    moving, fixed = torch.cat([m, f]), torch.cat([f, m])
    if train != 'refine':
        u2 = None
    elif u2 is None:  # the first stage is frozen: its output is computed once
        with torch.no_grad(), autocast(m.device, precision):
            u2 = net.steps(moving, fixed)['u2'].float()
    for _ in range(steps):
        with autocast(m.device, precision):
            u = net.steps(moving, fixed, u2)['u0']
        terms = pair_loss(moving, fixed, u.float(), phase='gradicon',
                          generator=gen, squared=similarity == 'lncc2', **prompt)
        opt.zero_grad(set_to_none=True)
        terms['loss'].backward()
        opt.step()
        losses.append(float(terms['loss'].detach()))
    net.eval()
    return net, losses


def refine_field(u: torch.Tensor, m: torch.Tensor, f: torch.Tensor, steps: int,
                 lr: float = 0.1, level: int = 2, seed: int = 0, similarity: str = 'lncc',
                 labels: tuple[torch.Tensor, torch.Tensor] | None = None,
                 label_weight: float = 0.0) -> tuple[torch.Tensor, list[float]]:
    """Field-space instance optimisation (keyprep's, not the paper's): Adam on a correction
    of both of the network's fields ``u = [phi_mf, phi_fm]`` (``[2, 3, *shape]``, voxels),
    itself a displacement on the level-``level`` grid upsampled trilinearly (level 2, the
    default: a quarter of the working resolution, one value per 8 mm at the 2 mm working grid;
    level 1 was rougher on a 1 mm inter-subject pair: 0.15-0.22 % folding voxels in 20 steps),
    for ``steps`` steps of ``lr`` voxels on the network's own loss (``similarity`` both ways +
    GradICON between the two fields, plus ``label_weight`` times the soft Dice of the
    structure maps ``labels = (fixed, moving)`` at half resolution). The network's weights
    are not touched: this optimises the displacement itself, starting from the network's
    answer, at about 1 s per step at 96^3 on one CPU thread (a weight-space step: 5-10 s).
    Returns the refined pair and the loss before each step."""
    from .losses import pair_loss

    if steps <= 0:
        return u, []
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f'field lr must be a finite number > 0, not {lr!r}')
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or level < 0:
        raise ValueError(f'field level must be an integer >= 0, not {level!r}')
    shape = tuple(u.shape[2:])
    coarse = tuple(max(1, n // 2 ** level) for n in shape)
    base = u.detach().float()
    r = torch.zeros((u.shape[0], 3, *coarse), device=u.device, requires_grad=True)
    opt = torch.optim.Adam([r], lr=lr)
    gen = torch.Generator(device=u.device).manual_seed(int(seed))
    prompt = _label_term(labels, label_weight)
    moving, fixed = torch.cat([m, f]).float(), torch.cat([f, m]).float()
    losses = []

    def field():
        if level == 0:
            return base + r
        return base + F.interpolate(r, size=shape, mode='trilinear', align_corners=False)

    with torch.enable_grad():
        for _ in range(int(steps)):
            terms = pair_loss(moving, fixed, field(), phase='gradicon', generator=gen,
                              squared=similarity == 'lncc2', **prompt)
            opt.zero_grad(set_to_none=True)
            terms['loss'].backward()
            opt.step()
            losses.append(float(terms['loss'].detach()))
    with torch.no_grad():
        return field(), losses


def invert_field(u: torch.Tensor, iterations: int = 20) -> torch.Tensor:
    """Fixed-point inverse (Chen et al. 2008) of a full-resolution displacement
    ``u [B, 3, *grid]`` (voxels): ``v(y) = -u(y + v(y))``, iterated from ``v = 0``."""
    pts = cell_centres(u.shape[2:], 0, u.device, u.dtype)
    v = torch.zeros_like(u)
    for _ in range(iterations):
        v = -eval_disp(u, 0, pts + v)
    return v


def symmetrise(u_fwd: torch.Tensor, u_inv: torch.Tensor, iterations: int = 20
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Average the two estimates of one mapping that a network run both ways gives: the
    forward field and the inverse of the backward field; the backward field becomes the
    inverse of that average. Exactly the identity for two identical images (the network's
    two passes are then the same field ``w``, and the average of ``w`` and ``w^-1`` is the
    identity to second order), which the raw passes are not: an undertrained network moves
    an image registered to itself by a millimetre or two (measured on the shipped CARL
    weights). Keyprep's, not the paper's."""
    a = 0.5 * (u_fwd + invert_field(u_inv, iterations))
    return a, invert_field(a, iterations)


def _first_stage_key(model: nn.Module, f: torch.Tensor, m: torch.Tensor,
                     precision: str) -> tuple:
    """What the first stage's output depends on: the model object (its weights are never
    changed in place here: IO adapts a copy), the precision and the two working-grid images
    (SHA-1 of their bytes)."""
    import hashlib

    h = hashlib.sha1()
    for t in (f, m):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return (id(model), precision, h.hexdigest())


def register_arrays(fixed: np.ndarray, moving: np.ndarray, model_or_weights=None, *,
                    device: str | torch.device = 'cpu', io_steps: int = 0,
                    io_lr: float | None = None, seed: int = 0,
                    spacing_mm: Sequence[float] | None = None,
                    precision: str = 'fp32', io_similarity: str = 'lncc',
                    labels: tuple[np.ndarray, np.ndarray] | None = None,
                    io_label_weight: float = 0.0, symmetric: bool = False,
                    io_train: str = 'all', passes: int = 1,
                    first_stage: dict | None = None, field_steps: int = 0,
                    field_lr: float = 0.1, field_level: int = 2,
                    field_label_weight: float = 0.0,
                    field_images: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """Register ``moving`` to ``fixed`` (3-D arrays on the same grid, brain-masked, any
    intensity scale) with CARL.

    ``model_or_weights``: a :class:`CarlNet`, or a weights path (``None``: the shipped
    weights). ``spacing_mm``: the grid's voxel size (default 1 mm). ``io_steps > 0``: instance
    optimisation on a copy of the weights (``io_lr``, default the model's ``io_lr``), reset
    per call, with ``io_similarity`` (``'lncc'``, the paper's, or ``'lncc2'``, squared: the
    similarity a network trained on pairs of different contrasts was trained with; plain LNCC
    pulls a T2 towards an inverted T1), and with ``labels`` (fixed and moving structure label
    maps on the same grid) and ``io_label_weight > 0``, label prompting: the soft Dice of the
    structures labelled in both maps joins IO's loss (keyprep's, not the paper's; the
    network pass itself never sees labels).
    ``io_train``: the weights instance optimisation adapts (``'all'``, the paper's, or
    ``'refine'``: the refinement networks only, about 30 % faster per step on a CPU).
    ``symmetric``: the exported pair is :func:`symmetrise` of the network's two passes
    (keyprep's, not the paper's).
    ``passes``: how many times the network runs (keyprep's cascade, in the paper's own algebra
    ``TwoStep{CARL, CARL}``): each pass registers the moving image warped by the fields so
    far (on the working grid) to the fixed one, and the fields compose, forward
    ``phi_1 o phi_2 o ...`` and inverse ``... o phi_2^-1 o phi_1^-1`` (each pass symmetrised
    first when ``symmetric``).
    ``first_stage``: a dict shared by calls on the same images with the same ``model`` (the
    carl engine's two variants): the frozen first stage's output (coordinate attention,
    both directions, first pass) is kept there and reused by later calls whose working-grid
    images are identical (compared by checksum). Only the network pass without IO and the
    one after ``io_train='refine'`` use it (and IO ``'refine'`` itself): IO on all weights
    changes the first stage. The fields are the same with or without it.
    ``field_steps > 0``: :func:`refine_field` (keyprep's field-space instance optimisation,
    ``field_lr`` voxels per step on a level-``field_level`` correction) on the last pass's
    two fields, after the weight-space IO and before the symmetrisation, with the same
    similarity and label maps as the weight-space IO and its own label weight
    ``field_label_weight``; ``field_images`` (fixed, moving; the grid of ``fixed``): other
    images of the same pair for the refinement's similarity (the originals, when the network
    is given re-rendered ones).

    Returns ``disp_fwd`` ``(3, X, Y, Z)`` float32 in voxels of the given grid with
    ``moving(x + disp_fwd(x)) ~ fixed(x)``; ``disp_inv`` (the network run with the images
    swapped: ``fixed(y + disp_inv(y)) ~ moving(y)``); ``inverse_consistency_vox`` (mean norm,
    in voxels of the given grid, of ``phi_fwd(phi_inv(y)) - y`` over the brains on the working
    grid); ``io_losses``; ``label_channels`` (the prompt's structures, 0 unprompted);
    ``field_losses`` (:func:`refine_field`'s, before each step); ``timings`` (s;
    ``first_stage_s``: the part of ``total_s`` spent on the shared first stage when this
    call computed it; ``field_s``: the field refinement's, inside ``network_s``) and
    ``working_grid``.
    """
    from ..resources import autocast

    t0 = time.time()
    fixed = np.asarray(fixed)
    moving = np.asarray(moving)
    label_channels = 0
    if isinstance(passes, bool) or not isinstance(passes, (int, np.integer)) or passes < 1:
        raise ValueError(f'passes must be an integer >= 1, not {passes!r}')
    if fixed.ndim != 3 or fixed.shape != moving.shape:
        raise ValueError(f'fixed {fixed.shape} and moving {moving.shape} must be 3-D arrays '
                         'of one shape')
    dev = torch.device(device)
    if isinstance(model_or_weights, nn.Module):
        model = model_or_weights
    else:
        model, _ = load_carl(model_or_weights, dev)
    cfg = model.cfg
    torch.manual_seed(seed)
    spacing = np.asarray(spacing_mm if spacing_mm is not None else (1.0, 1.0, 1.0), dtype=float)
    fn, mn = normalise_intensity(fixed), normalise_intensity(moving)
    centre, res = _working_grid(fn, mn, spacing, cfg)
    was_training = model.training
    model_dev = next(model.parameters()).device
    model.to(dev).eval()
    try:
        f = _to_working(fn, centre, res, spacing, cfg.shape, dev).clamp(0, 1)
        m = _to_working(mn, centre, res, spacing, cfg.shape, dev).clamp(0, 1)
        f_field, m_field = f, m
        if field_images is not None and field_steps > 0:
            if any(np.shape(x) != fixed.shape for x in field_images):
                raise ValueError(f'field_images must be on the grid of fixed {fixed.shape}')
            f_field, m_field = (_to_working(normalise_intensity(np.asarray(x)), centre, res,
                                            spacing, cfg.shape, dev).clamp(0, 1)
                                for x in field_images)
        t1 = time.time()
        net, io_losses = model, []
        # the first stage's output of the first pass, shared by the calls on these images
        frozen_first = io_steps == 0 or io_train == 'refine'
        key = _first_stage_key(model, f, m, precision) if first_stage is not None else None
        u2_first = first_stage.get(key) if key is not None else None
        t_first = 0.0

        def first_u2():
            nonlocal u2_first, t_first
            if u2_first is None:
                ts = time.time()
                with torch.no_grad(), autocast(dev, precision):
                    u2_first = model.steps(torch.cat([m, f]), torch.cat([f, m]))['u2'].float()
                t_first = time.time() - ts
                if key is not None:
                    first_stage.clear()  # one pair at a time
                    first_stage[key] = u2_first
            return u2_first

        if isinstance(field_steps, bool) or not isinstance(field_steps, (int, np.integer)) \
                or field_steps < 0:
            raise ValueError(f'field_steps must be an integer >= 0, not {field_steps!r}')
        prompt = None
        if io_steps > 0 or field_steps > 0:
            if io_similarity not in ('lncc', 'lncc2'):
                raise ValueError(f"io_similarity must be 'lncc' or 'lncc2', not {io_similarity!r}")
            for name, w in (('io_label_weight', io_label_weight),
                            ('field_label_weight', field_label_weight)):
                if not (w >= 0 and math.isfinite(w)):
                    raise ValueError(f'{name} must be a finite number >= 0, not {w!r}')
            if labels is not None and (io_label_weight > 0 and io_steps > 0
                                       or field_label_weight > 0 and field_steps > 0):
                lf, lm, label_channels = label_fractions(labels[0], labels[1], centre, res,
                                                         spacing, cfg.shape, dev)
                prompt = (lf, lm) if label_channels else None
        field_losses, t_field = [], 0.0
        if io_steps > 0:
            net, io_losses = _io_copy(model, m, f, io_steps, io_lr or cfg.io_lr, seed, precision,
                                      io_similarity, prompt, io_label_weight, io_train,
                                      u2=first_u2() if io_train == 'refine' else None)
        t2 = time.time()
        ic = None
        with torch.no_grad():
            u_fwd = u_inv = None
            for k_pass in range(passes):
                mp = m if u_fwd is None else warp(m, 0, u_fwd, 0)
                with autocast(dev, precision):
                    if u_fwd is None and frozen_first and (
                            key is not None or (io_steps > 0 and io_train == 'refine')):
                        u = net.steps(torch.cat([mp, f]), torch.cat([f, mp]),
                                      first_u2())['u0'].float()
                    else:
                        u = net(torch.cat([mp, f]), torch.cat([f, mp])).float()
                a, b = u[:1], u[1:]
                if ic is None:  # the network's own inverse consistency, on its first pass
                    pts = cell_centres(cfg.shape, 0, dev)
                    resid = b + eval_disp(a, 0, pts + b)  # phi_fwd(phi_inv(y)) - y
                    scale = torch.as_tensor(res / spacing, dtype=torch.float32, device=dev)
                    brain = ((f > 0) | (m > 0))[0, 0]
                    norm = (resid[0] * scale.view(3, 1, 1, 1)).norm(dim=0)
                    ic = float(norm[brain].mean()) if bool(brain.any()) else float(norm.mean())
                if field_steps > 0 and k_pass == passes - 1:  # the last pass
                    ts = time.time()
                    lab = prompt
                    if prompt is not None and u_fwd is not None:  # moving maps warped so far
                        lab = (prompt[0], warp(prompt[1], 0, u_fwd, 0))
                    mpf = m_field if u_fwd is None else warp(m_field, 0, u_fwd, 0)
                    u, field_losses = refine_field(torch.cat([a, b]), mpf, f_field, field_steps,
                                                   field_lr, field_level, seed, io_similarity,
                                                   lab, field_label_weight)
                    t_field = time.time() - ts
                    a, b = u[:1], u[1:]
                if symmetric:  # after measuring the network's own inverse consistency
                    a, b = symmetrise(a, b)
                if u_fwd is None:
                    u_fwd, u_inv = a, b
                else:
                    u_fwd, u_inv = compose(u_fwd, 0, a, 0), compose(b, 0, u_inv, 0)
        t3 = time.time()
        with torch.no_grad():
            disp_fwd = _to_input(u_fwd, centre, res, spacing, fixed.shape)[0].cpu().numpy()
            disp_inv = _to_input(u_inv, centre, res, spacing, fixed.shape)[0].cpu().numpy()
    finally:
        model.to(model_dev).train(was_training)
    t4 = time.time()
    return {'disp_fwd': disp_fwd.astype(np.float32), 'disp_inv': disp_inv.astype(np.float32),
            'inverse_consistency_vox': ic, 'io_losses': io_losses,
            'label_channels': label_channels, 'field_losses': field_losses,
            'timings': {'resample_s': t1 - t0, 'io_s': t2 - t1, 'network_s': t3 - t2,
                        'upsample_s': t4 - t3, 'total_s': t4 - t0,
                        # of which: the shared first stage, when this call computed it
                        'first_stage_s': t_first, 'field_s': t_field},
            'working_grid': {'shape': list(cfg.shape), 'res_mm': res,
                             'centre_vox': [float(c) for c in centre]}}
