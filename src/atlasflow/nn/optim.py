"""Adam for the test-time optimisations (affine and velocity refinement).

``torch.optim.Adam`` imports torch's compiler stack the first time an optimiser is built (about
1.3 s per process here), which every short registration job paid. The update below follows the
same formula (no weight decay, no amsgrad) and matches torch's trajectory; training still uses
torch's optimisers, whose one-off import does not matter there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class Adam:
    """Adam (Kingma and Ba 2015) over a few leaf tensors; ``zero_grad``/``step`` as in torch."""

    def __init__(
        self, params: Sequence[torch.Tensor], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
    ) -> None:
        self.params = list(params)
        self.lr, (self.beta1, self.beta2), self.eps = lr, betas, eps
        self.steps = 0
        self.first = [torch.zeros_like(p) for p in self.params]
        self.second = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        correction1 = 1 - self.beta1**self.steps
        correction2_sqrt = (1 - self.beta2**self.steps) ** 0.5
        for p, m, v in zip(self.params, self.first, self.second, strict=True):
            if p.grad is None:
                continue
            m.lerp_(p.grad, 1 - self.beta1)
            v.mul_(self.beta2).addcmul_(p.grad, p.grad, value=1 - self.beta2)
            denom = (v.sqrt() / correction2_sqrt).add_(self.eps)
            p.addcdiv_(m, denom, value=-self.lr / correction1)
