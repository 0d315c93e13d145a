"""A replica's own random streams, reproducible from the job's seed whichever process, device or thread
runs it: seeds per (job seed, replica, purpose), the locks around the process-wide generators, and
``ReplicaRng`` (the chain's noise and the global stream its model draws from)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import Tensor

from worker.noise import NoiseStream


def replica_seed(seed: int, replica: int, stream: int) -> int:
    """Independent, reproducible seeds per (job seed, replica, purpose)."""
    return (seed * 1_000_003 + replica * 7919 + stream * 104_729) % (2**63)


# torch's global CPU RNG (weight init, dropout on CPU) is one per process: replicas sharing a process take
# this lock whenever they swap in or draw from their own stream. Each GPU's default generator (dropout on
# that GPU) has its own lock (``device_rng_lock``), so replicas on different GPUs never wait for each other.
GLOBAL_RNG_LOCK = threading.RLock()
_DEVICE_RNG_LOCKS: dict[torch.device, threading.RLock] = {}


def device_rng_lock(device: torch.device) -> threading.RLock:
    if device.type != "cuda":
        return GLOBAL_RNG_LOCK
    with GLOBAL_RNG_LOCK:
        return _DEVICE_RNG_LOCKS.setdefault(device, threading.RLock())


class ReplicaRng:
    """A replica's own random streams: the chain's noise generator and the global stream its model draws
    from (dropout): torch's CPU generator for a CPU replica, its GPU's default generator for a CUDA one.

    The global stream is swapped in around the replica's compute, so replicas that share a process do not
    consume each other's random numbers, and both streams are saved in checkpoints. A CUDA replica swaps
    only its GPU's generator (under that GPU's lock), never the CPU one, which a model on a GPU does not
    draw from: replicas on different GPUs then compute at the same time without touching each other's
    streams, while replicas on one device take turns (local runtime)."""

    def __init__(self, seed: int, replica: int, device: torch.device) -> None:
        self.device = device
        self.noise = NoiseStream(device)
        self.noise.manual_seed(replica_seed(seed, replica, 1))
        # The states torch.manual_seed(start) would give, made without touching the process's generators.
        start = replica_seed(seed, replica, 2)
        self._cpu = torch.Generator().manual_seed(start).get_state()
        self._cuda = torch.Generator(device=device).manual_seed(start).get_state() if device.type == "cuda" else None
        self._lock = device_rng_lock(device)

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        with self._lock:
            if self._cuda is None:
                outer = torch.get_rng_state()
                torch.set_rng_state(self._cpu)
            else:
                outer = torch.cuda.get_rng_state(self.device)
                torch.cuda.set_rng_state(self._cuda, self.device)
            try:
                yield
            finally:
                if self._cuda is None:
                    self._cpu = torch.get_rng_state()
                    torch.set_rng_state(outer)
                else:
                    self._cuda = torch.cuda.get_rng_state(self.device)
                    torch.cuda.set_rng_state(outer, self.device)

    def state(self) -> dict[str, Tensor]:
        out = {"rng_noise": self.noise.get_state(), "rng_global": self._cpu}
        if self._cuda is not None:
            out["rng_global_cuda"] = self._cuda
        chunks = self.noise.stream_state()  # the noise's counter-based stream ([key, outputs used]), once it exists
        if chunks is not None:
            out["rng_noise_chunks"] = chunks
        return out

    def load_state(self, state: dict[str, Tensor]) -> None:
        self.noise.set_state(state["rng_noise"])
        self.noise.load_stream_state(state.get("rng_noise_chunks"))
        self._cpu = state["rng_global"]
        if self._cuda is not None and "rng_global_cuda" in state:
            self._cuda = state["rng_global_cuda"]
