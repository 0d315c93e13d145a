"""``EntropySGD``: Entropy-SGD as a drop-in ``torch.optim.Optimizer`` for your own training loop.

It is the worker's algorithm with one replica and no coupling to a reference (rho = 0), sharing the
same kernels (``worker.kernels``) and replica state (``worker.replica``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from worker.flat import FlatParameters
from worker.kernels import ChainHyper, OuterHyper
from worker.replica import ReplicaState


def _check(name: str, value: float, low: float, *, strict: bool = False, high: float = math.inf) -> None:
    ok = (value > low if strict else value >= low) and value < high
    if not ok or math.isnan(value):
        bound = f"> {low}" if strict else f">= {low}"
        extra = "" if high == math.inf else f" and < {high}"
        raise ValueError(f"EntropySGD: {name} must be {bound}{extra} (got {value!r})")


class EntropySGD(torch.optim.Optimizer):
    r"""Entropy-SGD (Chaudhari et al., 2017) with scoping: the trainer's algorithm with n = 1 (docs/algorithm.md).

    Each ``step(closure)`` runs a Langevin chain of ``L`` steps anchored at the weights x::

        y = x; mu = x
        if inner_momentum_reset: inner buffer = 0
        repeat L times:                       # closure() draws a fresh mini-batch at y
            scope "gradient": g = nesterov(grad f(y), inner_momentum) + wd y + gamma (y - x)
            scope "all":      g = nesterov(grad f(y) + wd y + gamma (y - x), inner_momentum)
            y -= inner_lr g + noise sqrt(2 inner_lr) N(0, I)
            mu = beta1 mu + (1 - beta1) y
        d = momentum(x - mu);  x -= lr d;  gamma = min(gamma (1 + gamma_growth), gamma_max)

    The defaults are those of the authors' ``entropyoptim.lua`` (``optim.entropysgd``): momentum on the raw
    gradient, its buffer reset at every step, beta1 0.75, noise 1e-4, no outer momentum.

    With ``L = 0`` it is ``torch.optim.SGD(lr, momentum, nesterov, weight_decay)``: one closure call and
    a plain gradient step. The closure must call ``zero_grad()`` and ``backward()`` and return the loss;
    ``step`` returns the loss of the first call (at the weights before the step).

    All parameters (one parameter group, one dtype and device) are moved into one flat buffer and the
    model's parameters become views into it: one fused op per update instead of one per tensor.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        L: int = 20,
        gamma: float = 1e-4,
        gamma_growth: float = 1e-3,
        gamma_max: float = float("inf"),
        inner_lr: float = 0.1,
        inner_momentum: float = 0.9,
        noise: float = 1e-4,
        beta1: float = 0.75,
        inner_momentum_scope: str = "gradient",
        inner_momentum_reset: bool = True,
    ) -> None:
        _check("lr", lr, 0.0, strict=True)
        _check("momentum", momentum, 0.0, high=1.0)
        _check("weight_decay", weight_decay, 0.0)
        if not isinstance(L, int) or L < 0:
            raise ValueError(f"EntropySGD: L must be an integer >= 0 (got {L!r})")
        _check("gamma", gamma, 0.0)
        _check("gamma_growth", gamma_growth, 0.0)
        if gamma_max < gamma:
            raise ValueError(f"EntropySGD: gamma_max must be >= gamma (got {gamma_max!r} < {gamma!r})")
        _check("inner_lr", inner_lr, 0.0, strict=True)
        _check("inner_momentum", inner_momentum, 0.0, high=1.0)
        _check("noise", noise, 0.0)
        _check("beta1", beta1, 0.0, high=1.0)
        if inner_momentum_scope not in ("all", "gradient"):
            raise ValueError(
                f"EntropySGD: inner_momentum_scope must be 'all' or 'gradient' (got {inner_momentum_scope!r})"
            )
        if nesterov and momentum <= 0:
            raise ValueError("EntropySGD: nesterov=True requires momentum > 0")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            L=L,
            gamma=gamma,
            gamma_growth=gamma_growth,
            gamma_max=gamma_max,
            inner_lr=inner_lr,
            inner_momentum=inner_momentum,
            noise=noise,
            beta1=beta1,
            inner_momentum_scope=inner_momentum_scope,
        )
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError(f"EntropySGD: params must form one parameter group (got {len(self.param_groups)})")
        self._flat = FlatParameters(self.param_groups[0]["params"])
        self._replica = ReplicaState(self._flat.data, self._flat.grad, L, inner_momentum_reset)
        group = self.param_groups[0]
        group.setdefault("current_gamma", gamma)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat gradient buffer (gradients stay views into it, whatever ``set_to_none``)."""
        self._flat.zero_grad()

    def _grad_fn(self, closure: Callable[[], Any]) -> Callable[[], Tensor]:
        def grad_at_live_weights() -> Tensor:
            with torch.enable_grad():
                loss = closure()
            self._flat.collect_grads()
            return torch.as_tensor(loss, dtype=torch.float64).detach()

        return grad_at_live_weights

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if closure is None:
            raise ValueError("EntropySGD.step needs a closure that draws a mini-batch and calls backward()")
        group = self.param_groups[0]
        replica = self._replica
        if group["L"] != replica.chain_steps:
            raise ValueError("EntropySGD: L cannot change after construction")
        first_loss: list[Tensor] = []
        grad_fn = self._grad_fn(closure)

        def recording() -> Tensor:
            loss = grad_fn()
            if not first_loss:
                first_loss.append(loss)
            return loss

        hp = ChainHyper(
            gamma=group["current_gamma"],
            inner_lr=group["inner_lr"],
            inner_momentum=group["inner_momentum"],
            noise=group["noise"],
            beta1=group["beta1"],
            weight_decay=group["weight_decay"],
            momentum_on_gradient_only=group["inner_momentum_scope"] == "gradient",
        )
        replica.x.copy_(replica.live)  # the user may have changed the weights since the last step
        # Langevin noise comes from torch's global RNG, like dropout: torch.manual_seed makes runs repeatable.
        mu, _ = replica.begin_round(recording, hp, None)
        outer = OuterHyper(lr=group["lr"], rho=0.0, momentum=group["momentum"], nesterov=group["nesterov"])
        replica.finish_round(mu, outer)
        if group["L"] > 0:
            group["current_gamma"] = min(group["current_gamma"] * (1 + group["gamma_growth"]), group["gamma_max"])
        return first_loss[0].item() if first_loss else None

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["entropy_sgd"] = {k: v for k, v in self._replica.state().items() if k != "x"}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        extra = state_dict.get("entropy_sgd")
        clean = {k: v for k, v in state_dict.items() if k != "entropy_sgd"}
        super().load_state_dict(clean)
        if extra is not None:
            self._replica.outer_buf.copy_(extra["outer_buf"])
            self._replica.outer_steps = int(extra["outer_steps"][0])
            if "inner_buf" in extra:
                self._replica.inner_buf.copy_(extra["inner_buf"])
