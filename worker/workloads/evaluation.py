"""Loss and error of a model on a split, and BatchNorm re-estimation before the reference is evaluated.

BN running statistics are buffers, never averaged across replicas (docs/algorithm.md), so the
reference's statistics are stale; ``reestimate_batchnorm`` recomputes them from training data.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd


def _device_of(model: nn.Module, fallback: torch.device) -> torch.device:
    for p in model.parameters():
        return p.device
    return fallback


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """Mean cross-entropy and error fraction (0..1) of ``model`` on (x, y), in eval mode.

    The model's previous train/eval mode is restored on return."""
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"evaluate needs equal, non-zero numbers of inputs and labels ({len(x)}, {len(y)})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    modes = {m: m.training for m in model.modules()}
    device = _device_of(model, x.device)
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    wrong = torch.zeros((), dtype=torch.int64, device=device)
    try:
        for start in range(0, len(x), batch_size):
            xb = x[start : start + batch_size].to(device, non_blocking=True)
            yb = y[start : start + batch_size].to(device, non_blocking=True)
            logits = model(xb)
            # Sums on the device; one host sync at the end instead of one per batch.
            loss_sum += nn.functional.cross_entropy(logits, yb, reduction="sum").double()
            wrong += (logits.argmax(dim=1) != yb).sum()
    finally:
        _restore_modes(modes)
    n = len(x)
    return loss_sum.item() / n, wrong.item() / n


def _restore_modes(modes: dict[nn.Module, bool]) -> None:
    for module, training in modes.items():
        module.training = training


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int, num_batches: int) -> None:
    """Recompute every BatchNorm layer's running statistics from the first ``num_batches * batch_size``
    samples of ``x``: stats reset, cumulative averaging (momentum None), BN in train mode, dropout off.

    Only full batches are used (so the running mean is exactly the mean over the samples used); if ``x``
    holds fewer than ``batch_size`` samples it is one batch. Momenta and modes are restored; a model
    without BatchNorm is left untouched."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns or len(x) == 0:
        return
    if batch_size < 1 or num_batches < 1:
        raise ValueError(f"batch_size and num_batches must be >= 1, got {batch_size}, {num_batches}")
    batch = min(batch_size, len(x))
    used = min(num_batches, len(x) // batch)
    modes = {m: m.training for m in model.modules()}
    momenta = [m.momentum for m in bns]
    device = _device_of(model, x.device)
    try:
        model.train()
        for m in model.modules():
            # Dropout would perturb the activations the statistics are estimated from.
            if isinstance(m, _DropoutNd):
                m.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        for i in range(used):
            model(x[i * batch : (i + 1) * batch].to(device, non_blocking=True))
    finally:
        for m, momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum
        _restore_modes(modes)
