"""The worker's half of the algorithm (docs/algorithm.md) as pure, in-place functions over flat tensors.

Every state (replica x, live weights y, coupled average mu, momentum buffers, gradient) is one flat
contiguous tensor, so each rule below is a handful of fused ops regardless of how many parameter
tensors the model has. Both the worker loop and the ``EntropySGD`` optimizer call these kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from worker.noise import add_normal_


@dataclass(frozen=True)
class ChainHyper:
    """Hyperparameters of one Langevin chain (gamma is this round's scoped value)."""

    gamma: float
    inner_lr: float
    inner_momentum: float
    noise: float
    beta1: float
    weight_decay: float
    momentum_on_gradient_only: bool = False  # scope "gradient" (entropyoptim.lua); else "all" (Parle)


@dataclass(frozen=True)
class OuterHyper:
    """Hyperparameters of the replica's elastic step (rho and lr are this round's values)."""

    lr: float
    rho: float
    momentum: float
    nesterov: bool


def momentum_(direction: Tensor, buf: Tensor, momentum: float, nesterov: bool) -> Tensor:
    """torch.optim.SGD's momentum with dampening 0, in place on ``direction``.

    ``buf = m * buf + d``; Nesterov returns ``d + m * buf``, heavy ball returns ``buf``. A buffer starts
    at zero, which makes the first step ``buf = d`` exactly, as torch's does.
    """
    if momentum == 0.0:
        return direction
    torch.add(direction, buf, alpha=momentum, out=buf)  # one pass over memory instead of two
    if nesterov:
        return direction.add_(buf, alpha=momentum)
    return direction.copy_(buf)


def start_chain_(x: Tensor, y: Tensor, mu: Tensor) -> None:
    """y = x, mu = x: the chain is anchored at the replica's weights."""
    y.copy_(x)
    mu.copy_(x)


def langevin_step_(
    y: Tensor,
    grad: Tensor,
    x: Tensor,
    mu: Tensor,
    inner_buf: Tensor,
    hp: ChainHyper,
    generator: torch.Generator | None = None,
) -> None:
    """One inner step. ``grad`` holds grad f_B(y) on entry and is used as scratch. ``generator``: the
    noise's source (a ``worker.noise.NoiseStream`` for the fast CPU path; None: torch's global RNG).

    scope "all" (Parle):           g = nesterov(grad + wd * y + gamma * (y - x))
    scope "gradient" (Lua):        g = nesterov(grad) + wd * y + gamma * (y - x)
    y -= inner_lr * g - noise * sqrt(2 inner_lr) * N(0, I)
    mu = beta1 * mu + (1 - beta1) * y
    """
    g = grad
    if hp.momentum_on_gradient_only:
        g = momentum_(g, inner_buf, hp.inner_momentum, nesterov=True)
    coupling = hp.weight_decay + hp.gamma
    if coupling != 0.0:
        g.add_(y, alpha=coupling)
    if hp.gamma != 0.0:
        g.sub_(x, alpha=hp.gamma)
    if not hp.momentum_on_gradient_only:
        g = momentum_(g, inner_buf, hp.inner_momentum, nesterov=True)
    y.sub_(g, alpha=hp.inner_lr)
    if hp.noise > 0.0:
        # A NoiseStream on CPU draws and adds in one pass (worker/noise.py); else torch.randn, then add_.
        add_normal_(y, hp.noise * math.sqrt(2.0 * hp.inner_lr), generator)
    mu.lerp_(y, 1.0 - hp.beta1)


def local_entropy_gradient_(x: Tensor, mu: Tensor) -> Tensor:
    """``x - mu`` written into ``mu`` (the local-entropy gradient divided by gamma)."""
    return torch.sub(x, mu, out=mu)


def gradient_direction_(grad: Tensor, x: Tensor, weight_decay: float) -> Tensor:
    """The L = 0 path: ``grad f_B(x) + wd * x`` in place on ``grad``."""
    if weight_decay != 0.0:
        grad.add_(x, alpha=weight_decay)
    return grad


def elastic_step_(x: Tensor, local: Tensor, xbar: Tensor | None, outer_buf: Tensor, hp: OuterHyper) -> None:
    """``d = local + rho (x - xbar); d = momentum(d); x -= lr d``. ``local`` is overwritten.
    ``xbar`` None: the local step alone (async, before the exchange)."""
    d = local
    if hp.rho != 0.0 and xbar is not None:
        d.add_(x, alpha=hp.rho).sub_(xbar, alpha=hp.rho)
    d = momentum_(d, outer_buf, hp.momentum, hp.nesterov)
    x.sub_(d, alpha=hp.lr)


def easgd_exchange_(x: Tensor, center_before: Tensor, alpha: float) -> None:
    """The worker's half of the EASGD exchange: ``x -= alpha (x - center)``, with the center as it was before
    the coordinator applied the same force to it."""
    x.lerp_(center_before, alpha)
