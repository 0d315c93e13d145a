"""What a replica's uploaded state must look like, checked against the job's model before it is used.

A worker uploads either its weights ``x`` alone (the model is being gathered) or its whole state
(checkpoint rounds, and the offer of a worker that rejoins a restarted coordinator). Every tensor must be
one the worker loop writes, with the shape and dtype the model implies: a state that passes here loads
into any replica of the job. A rejected upload changes nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor

from protos.messages import CoordinatorError

WEIGHTS = ("x", "outer_buf", "inner_buf")  # flat, one element per model parameter, the model's dtype
REQUIRED = frozenset({"x", "outer_buf", "outer_steps", "sampler", "rng_noise", "rng_global"})
OPTIONAL = frozenset({"inner_buf", "rng_global_cuda", "rng_noise_chunks"})
COUNTERS = {"outer_steps": 1, "sampler": 2}  # int64 vectors of this length
RNG_STATES = ("rng_noise", "rng_global", "rng_global_cuda")  # generator states: uint8 byte vectors


def check_replica_state(
    state: dict[str, Tensor], elements: int | None, dtype: torch.dtype | None, *, whole: bool, what: str
) -> None:
    """INVALID_ARGUMENT naming the key, shape or dtype that does not fit. ``elements``/``dtype``: the
    model's (None before the job has seen one: only the state's own consistency is checked). ``whole``:
    the full state is required, else ``x`` alone is enough."""
    keys = set(state)
    unknown = sorted(keys - REQUIRED - OPTIONAL)
    if unknown:
        raise CoordinatorError("INVALID_ARGUMENT", f"{what}: unknown key(s) {', '.join(unknown)}")
    missing = sorted((REQUIRED if whole else {"x"}) - keys)
    if missing:
        raise CoordinatorError("INVALID_ARGUMENT", f"{what}: missing key(s) {', '.join(missing)}")
    x = state["x"]
    elements = x.numel() if elements is None else elements
    dtype = x.dtype if dtype is None else dtype
    for key in WEIGHTS:
        if key in state:
            value = state[key]
            if value.dtype != dtype:
                raise CoordinatorError(
                    "INVALID_ARGUMENT", f"{what}: {key} has dtype {value.dtype}, the model's is {dtype}"
                )
            if list(value.shape) != [elements]:
                raise CoordinatorError(
                    "INVALID_ARGUMENT", f"{what}: {key} has shape {list(value.shape)}, the model's is [{elements}]"
                )
    for key, length in COUNTERS.items():
        if key in state:
            value = state[key]
            if value.dtype != torch.int64 or list(value.shape) != [length]:
                raise CoordinatorError(
                    "INVALID_ARGUMENT",
                    f"{what}: {key} must be int64 of shape [{length}], got {value.dtype} {list(value.shape)}",
                )
    for key in RNG_STATES:
        if key in state:
            value = state[key]
            if value.dtype != torch.uint8 or value.dim() != 1:
                raise CoordinatorError(
                    "INVALID_ARGUMENT",
                    f"{what}: {key} must be a uint8 vector (a generator state), got {value.dtype} {list(value.shape)}",
                )
    chunks = state.get("rng_noise_chunks")  # the noise's counter-based stream: an int64 row [key, outputs used]
    if chunks is not None and (chunks.dtype != torch.int64 or chunks.dim() != 2):
        raise CoordinatorError(
            "INVALID_ARGUMENT",
            f"{what}: rng_noise_chunks must be an int64 matrix, got {chunks.dtype} {list(chunks.shape)}",
        )
