"""Test-time optimisers shared by keyprep's instance optimisations (KeyMorph refinement, DIO's
affine solve); torch only.

:class:`Adam` is ``torch.optim.Adam`` (Kingma and Ba 2015; no weight decay, no amsgrad) for
a few tensors, written out because constructing any ``torch.optim`` optimiser imports
``torch._dynamo``: 1.6 s measured in a fresh process, paid by every pipeline node that
registers one pair (a refinement takes about 2 s in all). Training keeps ``torch.optim``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ['Adam']


class Adam:
    """Adam with torch's update rule and defaults (betas 0.9/0.999, eps 1e-8); ``lr`` may be
    changed between steps (``opt.lr = ...``)."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        self.lr, self.betas, self.eps, self.t = float(lr), tuple(betas), float(eps), 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            m.mul_(b1).add_(p.grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            denom = (v / (1 - b2 ** self.t)).sqrt_().add_(self.eps)
            p.addcdiv_(m, denom, value=-self.lr / (1 - b1 ** self.t))
