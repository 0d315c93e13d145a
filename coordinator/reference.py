"""The center's update rules (docs/algorithm.md), streaming: memory grows with the model, not
with the number of workers.

``SyncMean`` keeps a float64 running sum as reports arrive, so the mean does not depend on the order
in which workers report (float32 inputs add exactly in float64 for weights of similar magnitude) and
resumed runs reproduce uninterrupted ones bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor


class SyncMean:
    """xbar_next = mean of the reported coupled averages, plus their spread around it."""

    def __init__(self) -> None:
        self._sum: Tensor | None = None
        self._sq_norms = 0.0
        self._dtype = torch.float32
        self.count = 0

    def add(self, mu: Tensor) -> None:
        mu64 = mu.detach().reshape(-1).to(torch.float64, copy=self._sum is None)  # one conversion per report
        if self._sum is None:
            self._sum, self._dtype = mu64, mu.dtype
        else:
            self._sum.add_(mu64)
        self._sq_norms += float(mu64.dot(mu64))
        self.count += 1

    def finish(self) -> tuple[Tensor, float]:
        """The mean (in the reports' dtype) and the consensus distance: the RMS distance of the coupled
        averages to their mean, sqrt(mean ||mu_a||^2 - ||mean||^2). Consumes the sum."""
        if self._sum is None or self.count == 0:
            raise ValueError("no coupled averages were reported for this round")
        mean64 = self._sum.div_(self.count)
        spread = self._sq_norms / self.count - float(mean64.dot(mean64))
        self._sum = None
        return mean64.to(self._dtype), max(spread, 0.0) ** 0.5


def easgd_center_step_(center: Tensor, x: Tensor, alpha: float) -> Tensor:
    """Async (EASGD): ``diff = alpha (x - center); center += diff``. Returns the center as it was before, which
    the worker needs to apply the same force to itself (``x -= diff``)."""
    before = center.clone()
    center.lerp_(x.reshape(-1).to(center.dtype), alpha)
    return before
