"""Round clock and schedules (docs/algorithm.md): gamma/rho scoping with caps, lr drops by data pass.

The clock advances once per round. One round is max(L, 1) mini-batches per replica, so the epoch
(data passes of one replica) of round k is k * max(L, 1) / batches_per_epoch. The schedule needs the
training set's size, which comes from the data: the coordinator learns it from the first report.
"""

from __future__ import annotations

import math

from protos.messages import RoundValues
from protos.spec import JobSpec, OptimSpec, batches_per_epoch, batches_per_full_pass, default_growth


def first_values(optim: OptimSpec) -> RoundValues:
    """Round 0's values, which do not depend on the data set's size."""
    lr = optim.lr * optim.lr_drop_factor ** sum(1 for e in optim.lr_drop_epochs if e <= 0)
    return RoundValues(round=0, gamma=optim.gamma0, rho=optim.rho0, lr=lr, epoch=0.0)


class Schedule:
    def __init__(self, spec: JobSpec, train_size: int) -> None:
        optim = spec.optim
        self.optim = optim
        self.train_size = train_size
        self.batches_per_epoch = batches_per_epoch(spec.data, train_size)
        self.steps_per_round = max(optim.L, 1)
        default = default_growth(batches_per_full_pass(spec.data, train_size))
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

    def _scoped(self, start: float, growth: float, cap: float, k: int) -> float:
        # Past the cap the power can overflow: compare in log space first.
        if start <= 0.0 or growth <= 0.0:
            return min(start, cap)
        if math.log(start) + k * math.log1p(growth) >= math.log(cap):
            return cap
        return start * (1.0 + growth) ** k

    def gamma(self, k: int) -> float:
        o = self.optim
        return self._scoped(o.gamma0, self.gamma_growth, o.gamma_max, k)

    def rho(self, k: int) -> float:
        o = self.optim
        return self._scoped(o.rho0, self.rho_growth, o.rho_max, k)

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

    def model_due(self, k: int) -> bool:
        """After round k closes, the model (mean of the replicas' weights) is needed: to evaluate, to
        checkpoint, or because the job ends."""
        return self.eval_due(k) or self.checkpoint_due(k)

    def points_beyond_budget(self) -> list[str]:
        """Schedule points the budget never reaches (so the preset's regime is cut short)."""
        budget = self.epoch(self.total_rounds)
        return [f"optim.lr_drop_epochs: {e:g}" for e in self.optim.lr_drop_epochs if e > budget]
