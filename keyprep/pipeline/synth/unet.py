"""A plain 3-D U-Net (SynthSeg's architecture family, sized by its config)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['UNetConfig', 'UNet3D']


@dataclass(frozen=True)
class UNetConfig:
    """Architecture. Defaults: keyprep's small CPU model; SynthSeg uses 5 levels, 24 features."""

    in_channels: int = 1
    out_channels: int = 33
    features: int = 16
    levels: int = 4
    feature_multiplier: int = 2
    max_features: int = 128
    convs_per_level: int = 2

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def divisor(self) -> int:
        """Input sizes must be multiples of this."""
        return 2 ** (self.levels - 1)


class _Block(nn.Sequential):
    def __init__(self, cin: int, cout: int, n: int):
        layers = []
        for i in range(n):
            layers += [nn.Conv3d(cin if i == 0 else cout, cout, 3, padding=1),
                       nn.InstanceNorm3d(cout, affine=True), nn.ELU(inplace=True)]
        super().__init__(*layers)


class UNet3D(nn.Module):
    """Encoder-decoder with skip connections; returns logits ``[B, out_channels, D, H, W]``."""

    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = config
        widths = [min(config.features * config.feature_multiplier ** i, config.max_features)
                  for i in range(config.levels)]
        self.down = nn.ModuleList()
        cin = config.in_channels
        for w in widths:
            self.down.append(_Block(cin, w, config.convs_per_level))
            cin = w
        self.up = nn.ModuleList()
        for w_skip in reversed(widths[:-1]):
            self.up.append(_Block(cin + w_skip, w_skip, config.convs_per_level))
            cin = w_skip
        self.head = nn.Conv3d(cin, config.out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = F.max_pool3d(x, 2)
            x = block(x)
            skips.append(x)
        for block in self.up:
            skip = skips.pop(-2)
            x = F.interpolate(x, size=skip.shape[2:], mode='trilinear', align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)
