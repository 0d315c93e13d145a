"""One replica's optimizer state and its round, split at the exchange (docs/algorithm.md):

    upload = replica.begin_round(...)          # chain (or gradient); sync: mu_a, async: x_a after its local step
    reply = exchange(upload)                   # whatever transport
    replica.finish_round(reply.reference, ...) # sync: elastic step toward the new center; async: EASGD force

The live weights ``y`` are the model's parameters (a flat view); ``x`` is the replica's anchor, the weights
that count: the job's model is the mean of the replicas' x after their step.
Used by the worker loop and by the ``EntropySGD`` optimizer alike.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from worker.kernels import (
    ChainHyper,
    OuterHyper,
    easgd_exchange_,
    elastic_step_,
    gradient_direction_,
    langevin_step_,
    local_entropy_gradient_,
    start_chain_,
)

# Evaluates the loss at the live weights and leaves grad f_B(y) in the flat gradient buffer.
GradFn = Callable[[], Tensor]


class ReplicaState:
    def __init__(self, live: Tensor, grad: Tensor, chain_steps: int, reset_inner_momentum: bool = True) -> None:
        self.live = live  # y: the model's parameters
        self.grad = grad  # the model's gradients
        self.chain_steps = chain_steps  # L
        self.reset_inner_momentum = reset_inner_momentum
        self.x = live.clone()
        self.mu = torch.zeros_like(live)
        self.inner_buf = torch.zeros_like(live) if chain_steps > 0 else self.mu
        self.outer_buf = torch.zeros_like(live)
        self.outer_steps = 0
        self._direction: Tensor | None = None

    def begin_round(self, grad_fn: GradFn, hp: ChainHyper, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Run the chain from x. Returns (mu, summed loss over the round's mini-batches)."""
        if self.chain_steps == 0:
            loss = grad_fn()  # live == x
            self._direction = gradient_direction_(self.grad, self.x, hp.weight_decay)
            return self.x, loss.detach()
        start_chain_(self.x, self.live, self.mu)
        if self.reset_inner_momentum:
            self.inner_buf.zero_()
        total = torch.zeros((), dtype=torch.float64, device=self.live.device)
        for _ in range(self.chain_steps):
            total += grad_fn().detach()
            langevin_step_(self.live, self.grad, self.x, self.mu, self.inner_buf, hp, generator)
        self._direction = self.mu  # becomes x - mu after the exchange has read mu
        return self.mu, total

    def _take_direction(self) -> Tensor:
        if self._direction is None:
            raise RuntimeError("finish_round called before begin_round")
        direction, self._direction = self._direction, None
        if self.chain_steps > 0:
            local_entropy_gradient_(self.x, direction)  # direction is mu: now x - mu
        return direction

    def finish_round(self, reference: Tensor, hp: OuterHyper) -> None:
        """Sync: the elastic step toward the new center; the live weights follow x."""
        elastic_step_(self.x, self._take_direction(), reference, self.outer_buf, hp)
        self._after_step()

    def local_step(self, hp: OuterHyper) -> Tensor:
        """Async, before the exchange: x takes its step on the chain's result alone (no center yet).
        Returns x, which the exchange uploads."""
        elastic_step_(self.x, self._take_direction(), None, self.outer_buf, hp)
        self._after_step()
        return self.x

    def easgd_exchange(self, center_before: Tensor, alpha: float) -> None:
        """Async, after the exchange: the same elastic force the center received, in the other direction."""
        easgd_exchange_(self.x, center_before, alpha)
        self.live.copy_(self.x)

    def _after_step(self) -> None:
        self.outer_steps += 1
        self.live.copy_(self.x)

    def load_weights(self, flat: Tensor) -> None:
        self.x.copy_(flat.reshape(-1))
        self.live.copy_(self.x)

    def state(self) -> dict[str, Tensor]:
        state = {
            "x": self.x.detach().clone(),
            "outer_buf": self.outer_buf.detach().clone(),
            "outer_steps": torch.tensor([self.outer_steps], dtype=torch.int64),
        }
        if self.chain_steps > 0 and not self.reset_inner_momentum:
            state["inner_buf"] = self.inner_buf.detach().clone()  # it carries over into the next round
        return state

    def load_state(self, state: dict[str, Tensor]) -> None:
        self.load_weights(state["x"].to(self.x.device))
        self.outer_buf.copy_(state["outer_buf"].reshape(-1))
        self.outer_steps = int(state["outer_steps"][0])
        if "inner_buf" in state and self.chain_steps > 0:
            self.inner_buf.copy_(state["inner_buf"].reshape(-1))
