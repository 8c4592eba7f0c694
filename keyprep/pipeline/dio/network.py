"""DIO's feature network: one image in, dense features at 1/4, 1/2 and full resolution out.

DIO (Jena et al., ``paper_dio.md`` §1.2) registers *feature images* instead of intensities: a
network ``g`` maps each image separately (no channel concatenation, so fixed and moving may
come from different grids) to multi-scale features, and an iterative solver
(:mod:`.solver`) registers them. Here ``g`` is a small 3-D U-Net:

* encoder: ``levels`` blocks of two ``conv 3x3x3 -> InstanceNorm (affine) -> ELU`` with 2x
  max-pooling between them, widths ``features * 2^l`` capped at ``max_features``. With the
  defaults this is exactly the encoder of keyprep's label network
  (:class:`keyprep.pipeline.synth.unet.UNet3D`, 16-32-64-128), so it can start from the label
  network's weights (:func:`init_from_label_network`), whose features are already
  contrast-invariant;
* decoder: trilinear upsampling, concatenation skip, one block per level;
* heads: one ``conv 3x3x3`` to ``out_channels`` (16) on the decoder output at each scale of
  ``scales`` (default 4, 2, 1: 1/4, 1/2 and full resolution), coarsest first.

Inputs must be divisible by :attr:`DioConfig.divisor` (``2^(levels-1)``); the engine-facing
:func:`keyprep.pipeline.dio.register.register_arrays` pads for it. The network is trained at
``res_mm`` (2 mm isotropic); registration resamples any input onto that resolution first.

Weights file (``format = 'keyprep-dio-1'``): a dictionary with ``format``, ``state_dict``
(float16 by default), ``config`` (:meth:`DioConfig.to_dict`), ``step`` and ``recipe`` (the
training configuration), read only through :func:`keyprep.pipeline.weights.load_weights`
(``torch.load(weights_only=True)``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import WeightsError

__all__ = ['DioConfig', 'DioFeatureNet', 'load_dio', 'check_dio_weights', 'default_weights',
           'init_from_label_network', 'FORMAT', 'MODEL_DIR', 'WEIGHTS_NAME']

MODEL_DIR = Path(__file__).resolve().parents[2] / 'models' / 'dio'
WEIGHTS_NAME = 'keyprep-dio.pt'
FORMAT = 'keyprep-dio-1'


def default_weights() -> Path:
    """The weights that ship inside the package (``keyprep/models/dio/keyprep-dio.pt``)."""
    return MODEL_DIR / WEIGHTS_NAME


@dataclass(frozen=True)
class DioConfig:
    """Architecture of the feature network and the resolution it works at.

    ``scales``: downsampling factors of the returned feature maps, coarsest first (each a
    power of two below ``2^levels``); ``iterations``: the inner solver's default iterations at
    each scale (inference); ``res_mm``: the isotropic voxel size the network is trained and
    run at."""

    in_channels: int = 1
    out_channels: int = 16
    features: int = 16
    levels: int = 4
    feature_multiplier: int = 2
    max_features: int = 128
    convs_per_level: int = 2
    scales: tuple[int, ...] = (4, 2, 1)
    res_mm: float = 2.0
    iterations: tuple[int, ...] = (200, 100, 50)

    def __post_init__(self):
        object.__setattr__(self, 'scales', tuple(int(s) for s in self.scales))
        object.__setattr__(self, 'iterations', tuple(int(i) for i in self.iterations))
        if list(self.scales) != sorted(self.scales, reverse=True):
            raise ValueError(f'scales must be coarsest first, not {self.scales}')
        for s in self.scales:
            if s < 1 or s & (s - 1) or s >= 2 ** self.levels:
                raise ValueError(f'scale {s} is not a power of two below 2^levels')
        if len(self.iterations) != len(self.scales):
            raise ValueError('one iteration count per scale')

    @property
    def divisor(self) -> int:
        """Input sizes must be multiples of this."""
        return 2 ** (self.levels - 1)

    @property
    def widths(self) -> list[int]:
        return [min(self.features * self.feature_multiplier ** i, self.max_features)
                for i in range(self.levels)]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> 'DioConfig':
        d = dict(d)
        for key in ('scales', 'iterations'):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


class _Block(nn.Sequential):
    """``n`` x (conv 3x3x3 -> InstanceNorm(affine) -> ELU): the label network's block, so its
    encoder weights load by name."""

    def __init__(self, cin: int, cout: int, n: int):
        layers = []
        for i in range(n):
            layers += [nn.Conv3d(cin if i == 0 else cout, cout, 3, padding=1),
                       nn.InstanceNorm3d(cout, affine=True), nn.ELU(inplace=True)]
        super().__init__(*layers)


class DioFeatureNet(nn.Module):
    """``forward(x [B, C_in, D, H, W])`` -> list of features ``[B, out_channels, D/s, H/s,
    W/s]`` for ``s`` in ``config.scales`` (coarsest first)."""

    def __init__(self, config: DioConfig = DioConfig()):
        super().__init__()
        self.config = config
        widths = config.widths
        self.down = nn.ModuleList()
        cin = config.in_channels
        for w in widths:
            self.down.append(_Block(cin, w, config.convs_per_level))
            cin = w
        self.up = nn.ModuleList()
        self.heads = nn.ModuleDict()
        bottom = 2 ** (config.levels - 1)
        if bottom in config.scales:  # features straight from the deepest encoder block
            self.heads[str(bottom)] = nn.Conv3d(cin, config.out_channels, 3, padding=1)
        for level, w_skip in reversed(list(enumerate(widths[:-1]))):
            self.up.append(_Block(cin + w_skip, w_skip, config.convs_per_level))
            cin = w_skip
            if 2 ** level in config.scales:
                self.heads[str(2 ** level)] = nn.Conv3d(w_skip, config.out_channels, 3,
                                                        padding=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        div = self.config.divisor
        if any(n % div for n in x.shape[2:]):
            raise ValueError(f'input size {tuple(x.shape[2:])} is not divisible by {div}')
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = F.max_pool3d(x, 2)
            x = block(x)
            skips.append(x)
        out: dict[int, torch.Tensor] = {}
        level = len(skips) - 1
        if str(2 ** level) in self.heads:
            out[2 ** level] = self.heads[str(2 ** level)](x)
        for block in self.up:
            skip = skips.pop(-2)
            level -= 1
            x = F.interpolate(x, size=skip.shape[2:], mode='trilinear', align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
            if str(2 ** level) in self.heads:
                out[2 ** level] = self.heads[str(2 ** level)](x)
        return [out[s] for s in self.config.scales]


def init_from_label_network(model: DioFeatureNet, path: str | Path | None = None) -> int:
    """Copy the label network's encoder (``down.*``) into ``model``'s; returns the number of
    tensors copied. The encoders must have the same architecture (the defaults do)."""
    from ..weights import load_weights

    # the shipped label network (keyprep.pipeline.synth.labeller.default_weights, not imported:
    # it needs nibabel, which a training machine may not have)
    path = Path(path) if path is not None else \
        MODEL_DIR.parent / 'synthseg' / 'keyprep-synthseg-2mm.pt'
    payload = load_weights(path, 'label-network', ('state_dict', 'unet'))
    own = model.state_dict()
    copied = {}
    for key, value in payload['state_dict'].items():
        if key.startswith('down.'):
            if key not in own or tuple(own[key].shape) != tuple(value.shape):
                raise ValueError(f'the label network encoder tensor {key} does not fit this '
                                 'DIO network (build it with the default widths)')
            copied[key] = value.to(own[key].dtype)
    model.load_state_dict(copied, strict=False)
    return len(copied)


def load_dio(path: str | Path | None = None, device: str | torch.device = 'cpu'
             ) -> DioFeatureNet:
    """The feature network of a DIO weights file (default: the shipped one), in eval mode
    and float32 on ``device``. Raises :class:`MissingInputError` / :class:`WeightsError`."""
    from ..weights import load_weights

    path = Path(path) if path is not None else default_weights()
    payload = load_weights(path, 'DIO', ('format', 'state_dict', 'config'),
                           hint=f' (the shipped model is in {MODEL_DIR})')
    if payload.get('format') != FORMAT:
        raise WeightsError(f'{path} is not a keyprep DIO weights file (format '
                           f'{payload.get("format")!r}, expected {FORMAT!r})')
    try:
        model = DioFeatureNet(DioConfig.from_dict(payload['config']))
        model.load_state_dict({k: v.float() for k, v in payload['state_dict'].items()})
    except Exception as exc:  # noqa: BLE001 - a description or state that does not fit
        raise WeightsError(f'DIO weights {path} do not build their network '
                           f'({type(exc).__name__}: {str(exc)[:200]})') from None
    return model.to(device).eval()


def check_dio_weights(path: str | Path | None = None) -> dict:
    """Check a DIO weights file (default: the shipped one) without computing anything (the
    model is built on the ``meta`` device); return ``{'path', 'sha256'}``. Raises
    :class:`MissingInputError` (no file) or :class:`WeightsError` (unreadable, wrong format,
    or tensors that do not fit the described network)."""
    from ..weights import _compare_state, load_weights, sha256_file

    path = Path(path) if path is not None else default_weights()
    payload = load_weights(path, 'DIO', ('format', 'state_dict', 'config'),
                           hint=f' (the shipped model is in {MODEL_DIR})')
    if payload.get('format') != FORMAT:
        raise WeightsError(f'{path} is not a keyprep DIO weights file (format '
                           f'{payload.get("format")!r}, expected {FORMAT!r})')
    try:
        cfg = DioConfig.from_dict(payload['config'])
        with torch.device('meta'):
            model = DioFeatureNet(cfg)
    except Exception as exc:  # noqa: BLE001 - a network description that does not build
        raise WeightsError(f'DIO weights {path}: the network they describe cannot be built '
                           f'({type(exc).__name__}: {exc})') from None
    _compare_state(model, payload['state_dict'], 'DIO', path)
    return {'path': str(path), 'sha256': sha256_file(path)}
