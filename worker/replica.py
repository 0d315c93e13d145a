"""One replica's optimizer state and its round, split at the exchange (DESIGN.md section 3):

    mu = replica.begin_round(...)       # chain (or gradient), returns the coupled average
    xbar_next = exchange(mu)            # whatever transport
    replica.finish_round(xbar_next, ...) # elastic step

The live weights ``y`` are the model's parameters (a flat view); ``x`` is the replica's anchor.
Used by the worker loop and by the ``EntropySGD`` optimizer alike.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from worker.kernels import (
    ChainHyper,
    OuterHyper,
    elastic_step_,
    gradient_direction_,
    langevin_step_,
    local_entropy_gradient_,
    start_chain_,
)

# Evaluates the loss at the live weights and leaves grad f_B(y) in the flat gradient buffer.
GradFn = Callable[[], Tensor]


class ReplicaState:
    def __init__(self, live: Tensor, grad: Tensor, chain_steps: int) -> None:
        self.live = live  # y: the model's parameters
        self.grad = grad  # the model's gradients
        self.chain_steps = chain_steps  # L
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
        total = torch.zeros((), dtype=torch.float64, device=self.live.device)
        for step in range(self.chain_steps):
            total += grad_fn().detach()
            langevin_step_(self.live, self.grad, self.x, self.mu, self.inner_buf, hp, step == 0, generator)
        self._direction = self.mu  # becomes x - mu after the exchange has read mu
        return self.mu, total

    def finish_round(self, reference: Tensor, hp: OuterHyper) -> None:
        """The elastic step toward the new reference; the live weights follow x."""
        if self._direction is None:
            raise RuntimeError("finish_round called before begin_round")
        if self.chain_steps > 0:
            local_entropy_gradient_(self.x, self.mu)
        elastic_step_(self.x, self._direction, reference, self.outer_buf, hp, self.outer_steps == 0)
        self._direction = None
        self.outer_steps += 1
        self.live.copy_(self.x)

    def load_weights(self, flat: Tensor) -> None:
        self.x.copy_(flat.reshape(-1))
        self.live.copy_(self.x)

    def state(self) -> dict[str, Tensor]:
        return {
            "x": self.x.detach().clone(),
            "outer_buf": self.outer_buf.detach().clone(),
            "outer_steps": torch.tensor([self.outer_steps], dtype=torch.int64),
        }

    def load_state(self, state: dict[str, Tensor]) -> None:
        self.load_weights(state["x"].to(self.x.device))
        self.outer_buf.copy_(state["outer_buf"].reshape(-1))
        self.outer_steps = int(state["outer_steps"][0])
