"""Round clock and schedules (DESIGN.md section 3): gamma/rho scoping with caps, lr drops by epoch.

The clock advances once per round. One round is max(L, 1) mini-batches per replica, so the epoch
(data passes of one replica) of round k is k * max(L, 1) / batches_per_epoch.
"""

from __future__ import annotations

import math

from protos.messages import RoundValues
from protos.spec import JobSpec, batches_per_epoch, default_growth


class Schedule:
    def __init__(self, spec: JobSpec) -> None:
        optim = spec.optim
        self.optim = optim
        self.batches_per_epoch = batches_per_epoch(spec.data)
        self.steps_per_round = max(optim.L, 1)
        default = default_growth(self.batches_per_epoch)
        self.gamma_growth = default if optim.gamma_growth is None else optim.gamma_growth
        self.rho_growth = default if optim.rho_growth is None else optim.rho_growth
        rounds = math.ceil(spec.epochs * self.batches_per_epoch / self.steps_per_round)
        self.total_rounds = max(1, min(rounds, spec.max_rounds or rounds))
        self.eval_every = spec.eval.every_epochs
        self.checkpoint_every = spec.checkpoint.every_rounds or max(
            1, round(self.batches_per_epoch / self.steps_per_round)
        )

    def epoch(self, k: int) -> float:
        return k * self.steps_per_round / self.batches_per_epoch

    def gamma(self, k: int) -> float:
        o = self.optim
        return min(o.gamma0 * (1.0 + self.gamma_growth) ** k, o.gamma_max)

    def rho(self, k: int) -> float:
        o = self.optim
        return min(o.rho0 * (1.0 + self.rho_growth) ** k, o.rho_max)

    def lr(self, k: int) -> float:
        epoch = self.epoch(k)
        drops = sum(1 for e in self.optim.lr_drop_epochs if epoch >= e)
        return self.optim.lr * self.optim.lr_drop_factor**drops

    def values(self, k: int) -> RoundValues:
        return RoundValues(round=k, gamma=self.gamma(k), rho=self.rho(k), lr=self.lr(k), epoch=self.epoch(k))

    def is_last(self, k: int) -> bool:
        return k + 1 >= self.total_rounds

    def eval_due(self, k: int) -> bool:
        """After round k closes: an eval period boundary was crossed, or the job ends."""
        before = math.floor(self.epoch(k) / self.eval_every + 1e-9)
        after = math.floor(self.epoch(k + 1) / self.eval_every + 1e-9)
        return after > before or self.is_last(k)

    def checkpoint_due(self, k: int) -> bool:
        return (k + 1) % self.checkpoint_every == 0 or self.is_last(k)
