"""One Langevin inner step vs one ``torch.optim.SGD`` step (forward + backward + update), batch 128.

Both run on the same model and batch in the same process, interleaved in blocks so drift in machine
load hits both alike; the figure is the ratio of medians. Targets: at most 1.10x without noise (issue 2),
at most 1.15x with Langevin noise (issue 11). The noise is drawn twice over: by a plain ``torch.Generator``
(``torch.randn``, single-threaded on CPU) and by ``worker.noise.NoiseStream`` (a counter-based stream, one
vectorised numba kernel on the step's thread: what the worker uses).

    python -m bench.inner_step [--models lenet mnistfc] [--device cpu] [--blocks 15] [--steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from protos.spec import ModelSpec
from worker.flat import FlatParameters
from worker.kernels import ChainHyper, langevin_step_
from worker.noise import NoiseStream
from worker.normal_kernel import fill_normal, fill_reference
from worker.workloads import build_model, count_parameters

INPUT = {"lenet": (1, 28, 28), "mnistfc": (1, 28, 28), "allcnn": (3, 32, 32)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sgd_stepper(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def langevin_stepper(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, noise: float, stream: bool = True
) -> Callable[[], None]:
    flat = FlatParameters(model.parameters())
    anchor, mu, buf = flat.data.clone(), flat.data.clone(), torch.zeros_like(flat.data)
    hp = ChainHyper(gamma=0.03, inner_lr=0.01, inner_momentum=0.9, noise=noise, beta1=0.75, weight_decay=5e-4)
    device = flat.data.device
    gen = (NoiseStream(device) if stream else torch.Generator(device=device)).manual_seed(0)

    def step() -> None:
        flat.zero_grad()
        F.cross_entropy(model(x), y).backward()
        langevin_step_(flat.data, flat.grad, anchor, mu, buf, hp, gen)

    return step


def time_block(step: Callable[[], None], steps: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - start) / steps


def measure(name: str, device: torch.device, blocks: int, steps: int, batch: int) -> dict[str, float]:
    torch.manual_seed(0)
    shape = INPUT[name]
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    sgd_model = build_model(ModelSpec(name=name), shape, 10).to(device)
    chain_model = build_model(ModelSpec(name=name), shape, 10).to(device)
    chain_model.load_state_dict(sgd_model.state_dict())
    contenders = {
        "sgd": sgd_stepper(sgd_model, x, y),
        "langevin": langevin_stepper(chain_model, x, y, noise=0.0),
        "langevin+noise (torch.Generator)": langevin_stepper(chain_model, x, y, noise=1e-4, stream=False),
        "langevin+noise": langevin_stepper(chain_model, x, y, noise=1e-4),
    }
    for step in contenders.values():  # warm-up: allocator, kernels, autograd graph caches
        time_block(step, 3, device)
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(blocks):
        for key, step in contenders.items():
            times[key].append(time_block(step, steps, device))
    median = {k: statistics.median(v) for k, v in times.items()}
    return {
        "params": float(count_parameters(sgd_model)),
        "sgd_ms": 1e3 * median["sgd"],
        "langevin_ms": 1e3 * median["langevin"],
        "plain_noise_ms": 1e3 * median["langevin+noise (torch.Generator)"],
        "noise_ms": 1e3 * median["langevin+noise"],
        "ratio": median["langevin"] / median["sgd"],
        "ratio_plain_noise": median["langevin+noise (torch.Generator)"] / median["sgd"],
        "ratio_noise": median["langevin+noise"] / median["sgd"],
    }


def noise_cpu_cost(numel: int = 1 << 18, repeats: int = 31) -> dict[str, float]:
    """CPU time per element (ns, one thread) of drawing N(0, 1): ``torch.randn`` with a generator vs
    ``NoiseStream``'s kernel (SplitMix64 + Box-Muller, numba) and its numpy reference (the same bits, the
    fallback without numba). Thread CPU time, interleaved medians: it barely moves with machine load,
    unlike wall-clock ratios."""
    out = torch.empty(numel)
    gen = torch.Generator().manual_seed(0)
    array = out.numpy()
    fill_normal(array, 0, 0)  # compiles the kernel
    draws: dict[str, Callable[[], object]] = {
        "torch.randn": lambda: torch.randn(numel, generator=gen, out=out),
        "NoiseStream kernel": lambda: fill_normal(array, 1, 0),
        "numpy reference": lambda: fill_reference(array, 1, 0),
    }
    times: dict[str, list[float]] = {k: [] for k in draws}
    for _ in range(repeats):
        for key, draw in draws.items():
            start = time.thread_time()
            draw()
            times[key].append(time.thread_time() - start)
    return {k: 1e9 * statistics.median(v) / numel for k, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["lenet", "mnistfc"], choices=sorted(INPUT))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}")
    print(
        f"{'model':<9}{'params':>11}{'SGD ms':>9}{'inner ms':>10}{'ratio':>7}"
        f"{'+randn ms':>11}{'ratio':>7}{'+stream ms':>12}{'ratio':>7}"
    )
    for name in args.models:
        r = measure(name, device, args.blocks, args.steps, args.batch)
        print(
            f"{name:<9}{int(r['params']):>11,}{r['sgd_ms']:>9.2f}{r['langevin_ms']:>10.2f}{r['ratio']:>6.2f}x"
            f"{r['plain_noise_ms']:>11.2f}{r['ratio_plain_noise']:>6.2f}x{r['noise_ms']:>12.2f}{r['ratio_noise']:>6.2f}x"
        )
    print("+randn: Langevin noise from a torch.Generator; +stream: from worker.noise.NoiseStream (the worker's)")
    if device.type == "cpu":
        cost = noise_cpu_cost()
        print("noise CPU cost, ns per element (one thread): " + ", ".join(f"{k} {v:.2f}" for k, v in cost.items()))


if __name__ == "__main__":
    main()
