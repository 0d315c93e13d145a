"""One flat buffer for a model's parameters and one for their gradients.

Each parameter's ``.data`` and ``.grad`` become views into the flat buffers, so the kernels update
all parameters with one op and the exchanged tensor is already contiguous bytes. Buffers
(BatchNorm running statistics) are left alone: they are never averaged.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn


class FlatParameters:
    """Re-homes ``params`` into ``self.data`` / ``self.grad`` (same dtype and device for all)."""

    def __init__(self, params: Iterable[nn.Parameter]) -> None:
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("params: no trainable parameters")
        first = self.params[0]
        for i, p in enumerate(self.params):
            if p.dtype != first.dtype or p.device != first.device:
                raise ValueError(
                    f"params[{i}]: all parameters must share one dtype and device "
                    f"(got {p.dtype} on {p.device}, expected {first.dtype} on {first.device})"
                )
        self.numel = sum(p.numel() for p in self.params)
        self.data = torch.empty(self.numel, dtype=first.dtype, device=first.device)
        self.grad = torch.zeros_like(self.data)
        self._data_views = self._views(self.data)
        self._grad_views = self._views(self.grad)
        for p, view in zip(self.params, self._data_views, strict=True):
            view.copy_(p.data)
            p.data = view
        self.attach_grads()

    def _views(self, flat: Tensor) -> list[Tensor]:
        views, offset = [], 0
        for p in self.params:
            views.append(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        return views

    def attach_grads(self) -> None:
        """Point every ``p.grad`` at its slice of ``self.grad`` (autograd accumulates in place)."""
        for p, view in zip(self.params, self._grad_views, strict=True):
            p.grad = view

    def zero_grad(self) -> None:
        self.grad.zero_()
        self.attach_grads()

    def collect_grads(self) -> Tensor:
        """Make ``self.grad`` hold every parameter's gradient, even if a caller replaced ``p.grad``
        (``model.zero_grad()`` sets it to None); a missing gradient counts as zero."""
        for p, view in zip(self.params, self._grad_views, strict=True):
            if p.grad is None:
                view.zero_()
            elif p.grad.data_ptr() != view.data_ptr():
                view.copy_(p.grad)
        self.attach_grads()
        return self.grad

    def load_(self, flat: Tensor) -> None:
        """Copy a flat vector (e.g. the reference) into the live parameters."""
        if flat.numel() != self.numel:
            raise ValueError(f"flat tensor has {flat.numel()} elements, the model has {self.numel}")
        self.data.copy_(flat.reshape(-1))
