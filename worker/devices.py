"""Moving tensors between the host and a GPU: pinned buffers and non-blocking copies, waited for only
where the bytes are read next."""

from __future__ import annotations

import torch
from torch import Tensor


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """Host -> ``device``. To a GPU through a pinned buffer with a non-blocking copy: it is queued on the
    device's current stream ahead of the kernels that read the result, and torch's caching host allocator
    keeps the pinned buffer alive until the copy has run."""
    if device.type != "cuda" or tensor.device == device:
        return tensor.to(device)
    if tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor)
    return tensor.to(device, non_blocking=True)


def to_host(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Device -> host for tensors whose bytes are read next (uploads, checkpoints). GPU tensors: non-blocking
    copies into fresh pinned buffers, then a wait on an event recorded after them on each device (a
    non-blocking device->host copy has not happened, and its buffer holds no valid bytes, until then).
    CPU tensors pass as they are."""
    out, events = {}, []
    for name, tensor in tensors.items():
        if tensor.device.type != "cuda":
            out[name] = tensor
            continue
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        out[name] = host.copy_(tensor, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(tensor.device))
        events.append(event)
    for event in events:
        event.synchronize()
    return out
