"""Which samples a replica sees, and in what order.

``shard_indices`` implements docs/algorithm.md (data): one global shuffle, replica a takes the contiguous
slice starting at (a / n mod 1) of it, of length frac * N, wrapping around the end.

``BatchSampler`` walks a shard in a fresh order each epoch. The order of epoch e is a pure function of
(seed, replica, e), so a resumed sampler needs only (epoch, position), not a saved RNG state.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _mix(*values: int) -> int:
    """A well-spread 63-bit seed from small integers (splitmix64 finaliser), so that nearby
    (seed, replica, epoch) triples give unrelated permutations."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


def shard_indices(num_samples: int, replica: int, num_replicas: int, frac: float, seed: int) -> torch.Tensor:
    """Indices (int64, CPU) of replica ``replica``'s shard of ``num_samples`` training samples.

    ``frac = 1`` gives every replica all indices (in the shuffled order); ``frac = 1 / n`` gives the
    n replicas disjoint shards that together cover the set."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"frac must be in (0, 1], got {frac}")
    perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    # floor((a / n mod 1) * N) in exact integer arithmetic: no float rounding at slice boundaries.
    start = (replica % num_replicas) * num_samples // num_replicas
    length = max(1, round(frac * num_samples))
    positions = (start + torch.arange(length)) % num_samples
    return perm[positions]


class BatchSampler:
    """Mini-batches of a replica's shard, drawn by tensor indexing of data already on its device.

    Each epoch is a fresh permutation of the shard; a trailing partial batch is dropped. A shard smaller
    than ``batch_size`` yields the whole shard (permuted) as every batch. ``augment`` applies random
    4-pixel-padded crops and horizontal flips (the CIFAR recipe), also keyed by (epoch, position)."""

    def __init__(
        self,
        indices: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        seed: int,
        replica: int,
        augment: bool = False,
    ) -> None:
        if indices.numel() < 1:
            raise ValueError("indices must not be empty")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(x) != len(y):
            raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
        # Shuffling happens on CPU (identical orders on every device); indices move once per epoch.
        self._indices = indices.to("cpu", torch.int64)
        self._x, self._y = x, y
        self._batch = min(batch_size, self._indices.numel())
        self._seed, self._replica = seed, replica
        self._augment = augment
        self._epoch, self._position = 0, 0
        self._order = self._epoch_order(0)

    @property
    def batches_per_epoch(self) -> int:
        return max(1, self._indices.numel() // self._batch)

    @property
    def batch_size(self) -> int:
        return self._batch

    @property
    def epochs_done(self) -> float:
        """Data passes so far, counted in whole batches (resumes continue the count)."""
        return self._epoch + self._position / self.batches_per_epoch

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(_mix(self._seed, self._replica, epoch))
        order = self._indices[torch.randperm(self._indices.numel(), generator=gen)]
        return order.to(self._x.device)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (inputs, labels) batch; rolls over to a new epoch after the last full batch."""
        if self._position >= self.batches_per_epoch:
            self._epoch += 1
            self._position = 0
            self._order = self._epoch_order(self._epoch)
        start = self._position * self._batch
        idx = self._order[start : start + self._batch]
        x = self._x[idx]
        if self._augment:
            gen = torch.Generator().manual_seed(_mix(self._seed, self._replica, self._epoch, self._position))
            x = crop_and_flip(x, gen)
        self._position += 1
        return x, self._y[idx]

    def state(self) -> dict[str, int]:
        """Where the sampler is: enough, with the constructor arguments, to resume exactly."""
        return {"epoch": self._epoch, "position": self._position}

    def load_state(self, state: dict[str, int]) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.batches_per_epoch:
            raise ValueError(f"bad sampler state {state} (batches_per_epoch {self.batches_per_epoch})")
        self._epoch, self._position = epoch, position
        self._order = self._epoch_order(epoch)


def crop_and_flip(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random ``pad``-pixel-padded crops and horizontal flips of an N x C x H x W batch, vectorised:
    one gather for all crops instead of a Python loop over samples."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n, 1), generator=gen).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n, 1), generator=gen).to(x.device)
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
    rows = dy + torch.arange(h, device=x.device)  # n x h
    cols = dx + torch.arange(w, device=x.device)  # n x w
    # Flipping is reversing the column index of the crop window.
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]
