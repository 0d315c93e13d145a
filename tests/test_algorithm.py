"""The algorithm against closed forms and a straightforward re-implementation of docs/algorithm.md.

The naive implementation below works per parameter tensor with plain Python, shares no code with
the project's kernels, and is what the fused flat-buffer code must reproduce.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from coordinator.reference import SyncMean, easgd_center_step_
from coordinator.schedules import Schedule
from protos.spec import resolve
from worker.kernels import ChainHyper, OuterHyper
from worker.optim import EntropySGD
from worker.replica import ReplicaState

pytestmark = pytest.mark.timeout(60)


def _model(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(20, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 4)
    )


def _batches(count: int, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 20, generator=g), torch.randint(0, 4, (32,), generator=g)) for _ in range(count)]


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters(), strict=True))


# ----- naive reference implementation of the worker rule ------------------------------------------


def _nesterov(
    g: list[Tensor], buf: list[Tensor] | None, m: float, nesterov: bool = True
) -> tuple[list[Tensor], list[Tensor]]:
    if m == 0:
        return g, buf or []
    new_buf = [gi.clone() for gi in g] if buf is None else [m * b + gi for b, gi in zip(buf, g, strict=True)]
    out = [gi + m * b for gi, b in zip(g, new_buf, strict=True)] if nesterov else [b.clone() for b in new_buf]
    return out, new_buf


def _grads(model: nn.Module, batch: tuple[Tensor, Tensor]) -> list[Tensor]:
    model.zero_grad()
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


class NaiveReplica:
    """The worker pseudo-code of docs/algorithm.md (scope "all", buffer reset), literally, one tensor at a time."""

    def __init__(self, model: nn.Module, o: dict[str, float]) -> None:
        self.model, self.o = model, o
        self.outer_buf: list[Tensor] | None = None

    def params(self) -> list[Tensor]:
        return [p.detach().clone() for p in self.model.parameters()]

    def set(self, values: list[Tensor]) -> None:
        with torch.no_grad():
            for p, v in zip(self.model.parameters(), values, strict=True):
                p.copy_(v)

    def begin(self, batches: list[tuple[Tensor, Tensor]], gamma: float) -> list[Tensor]:
        o, x = self.o, self.params()
        if o["L"] == 0:
            self.local = [g + o["wd"] * xi for g, xi in zip(_grads(self.model, batches.pop(0)), x, strict=True)]
            return x
        y, mu, buf = [xi.clone() for xi in x], [xi.clone() for xi in x], None
        for _ in range(int(o["L"])):
            self.set(y)
            g = [
                gi + o["wd"] * yi + gamma * (yi - xi)
                for gi, yi, xi in zip(_grads(self.model, batches.pop(0)), y, x, strict=True)
            ]
            g, buf = _nesterov(g, buf, o["inner_momentum"])
            y = [yi - o["inner_lr"] * gi for yi, gi in zip(y, g, strict=True)]
            mu = [o["beta1"] * mi + (1 - o["beta1"]) * yi for mi, yi in zip(mu, y, strict=True)]
        self.set(x)
        self.local = [xi - mi for xi, mi in zip(x, mu, strict=True)]
        return mu

    def finish(self, xbar: list[Tensor], rho: float, lr: float) -> None:
        x = self.params()
        d = [li + rho * (xi - bi) for li, xi, bi in zip(self.local, x, xbar, strict=True)]
        d, self.outer_buf = _nesterov(d, self.outer_buf, self.o["momentum"], bool(self.o.get("nesterov", True)))
        self.set([xi - lr * di for xi, di in zip(x, d, strict=True)])


# ----- the tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight_decay", [0.0, 5e-4])
def test_entropysgd_L0_equals_torch_sgd_nesterov(weight_decay: float) -> None:
    ours, theirs = _model(dropout=0.25), _model(dropout=0.25)
    opt = EntropySGD(ours.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=weight_decay, L=0)
    ref = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    for step, batch in enumerate(_batches(50)):
        for model, optimizer in ((ours, opt), (theirs, ref)):
            torch.manual_seed(step)  # the same dropout masks for both

            def closure(
                model: nn.Module = model, optimizer: torch.optim.Optimizer = optimizer, batch: tuple = batch
            ) -> Tensor:
                optimizer.zero_grad()
                loss = F.cross_entropy(model(batch[0]), batch[1])
                loss.backward()
                return loss

            optimizer.step(closure)
    assert _max_diff(ours, theirs) < 1e-6
    assert _max_diff(ours, _model()) > 1e-3  # it did train


def test_entropysgd_noise0_equals_naive_worker_rule() -> None:
    o = {"L": 5, "wd": 1e-3, "inner_lr": 0.1, "inner_momentum": 0.9, "beta1": 0.75, "momentum": 0.5}
    ours, naive_model = _model(), _model()
    opt = EntropySGD(
        ours.parameters(),
        lr=0.7,
        momentum=o["momentum"],
        nesterov=True,
        weight_decay=o["wd"],
        L=5,
        gamma=0.03,
        gamma_growth=0.2,
        gamma_max=0.05,
        inner_lr=0.1,
        inner_momentum=0.9,
        noise=0.0,
        beta1=0.75,
        inner_momentum_scope="all",
    )
    naive = NaiveReplica(naive_model, o)
    batches = _batches(5 * 6)
    queue = list(batches)
    for step in range(6):
        gamma = min(0.03 * 1.2**step, 0.05)
        assert opt.param_groups[0]["current_gamma"] == pytest.approx(gamma, rel=1e-12)
        chunk = batches[5 * step : 5 * step + 5]
        it = iter(chunk)

        def closure(it: object = it) -> Tensor:
            xb, yb = next(it)  # type: ignore[call-overload]
            opt.zero_grad()
            loss = F.cross_entropy(ours(xb), yb)
            loss.backward()
            return loss

        opt.step(closure)
        naive.begin(queue, gamma)
        naive.finish(naive.params(), rho=0.0, lr=0.7)
    assert _max_diff(ours, naive_model) < 1e-5
    assert opt.param_groups[0]["current_gamma"] == 0.05  # capped


def _replica(model: nn.Module, L: int) -> tuple[ReplicaState, object]:
    from worker.flat import FlatParameters

    flat = FlatParameters(model.parameters())
    return ReplicaState(flat.data, flat.grad, L), flat


def _grad_fn(model: nn.Module, flat: object, queue: list[tuple[Tensor, Tensor]]):  # type: ignore[no-untyped-def]
    def fn() -> Tensor:
        xb, yb = queue.pop(0)
        flat.zero_grad()  # type: ignore[attr-defined]
        with torch.enable_grad():
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
        return loss

    return fn


@pytest.mark.parametrize("L", [0, 4])
def test_parle_rounds_equal_naive_with_sync_mean(L: int) -> None:
    """Three replicas, sync mean reference, scoped gamma and rho: fused code vs the naive rule."""
    o = {"L": L, "wd": 1e-4, "inner_lr": 0.1, "inner_momentum": 0.9, "beta1": 0.25, "momentum": 0.9}
    n, rounds = 3, 4
    models = [_model(seed=a) for a in range(n)]
    naive = [NaiveReplica(_model(seed=a), o) for a in range(n)]
    replicas = [_replica(m, L) for m in models]
    queues = [_batches(max(L, 1) * rounds, seed=10 + a) for a in range(n)]
    naive_queues = [list(q) for q in queues]
    for k in range(rounds):
        gamma, rho, lr = 0.01 * 1.5**k, min(1.0 * 1.5**k, 3.0), 0.1
        hp = ChainHyper(gamma, o["inner_lr"], o["inner_momentum"], 0.0, o["beta1"], o["wd"])
        mean = SyncMean()
        for (rep, flat), model, queue in zip(replicas, models, queues, strict=True):
            mu, _ = rep.begin_round(_grad_fn(model, flat, queue), hp, None)
            mean.add(mu)
        xbar, _ = mean.finish()
        for rep, _ in replicas:
            rep.finish_round(xbar, OuterHyper(lr, rho, o["momentum"], True))
        mus = [r.begin(q, gamma) for r, q in zip(naive, naive_queues, strict=True)]
        naive_xbar = [torch.stack(group).mean(0) for group in zip(*mus, strict=True)]
        for r in naive:
            r.finish(naive_xbar, rho, lr)
    for model, r in zip(models, naive, strict=True):
        assert _max_diff(model, r.model) < 1e-5


def test_elastic_sgd_step_closed_form() -> None:
    """L = 0: d = grad + wd x + rho (x - xbar), then Nesterov momentum, x -= lr d."""
    model = _model()
    rep, flat = _replica(model, 0)
    x0 = rep.x.clone()
    batch = _batches(1)
    mu, _ = rep.begin_round(_grad_fn(model, flat, list(batch)), ChainHyper(0, 0.1, 0, 0, 0, 0.01), None)
    assert torch.equal(mu, x0)  # L = 0: the coupled average is the replica itself
    grad = flat.grad.clone()  # type: ignore[attr-defined]
    xbar = torch.randn_like(x0)
    rep.finish_round(xbar, OuterHyper(lr=0.2, rho=3.0, momentum=0.9, nesterov=True))
    d = grad + 3.0 * (x0 - xbar)  # grad already holds + wd x
    expected = x0 - 0.2 * (d + 0.9 * d)  # first Nesterov step: buf = d
    assert torch.allclose(rep.x, expected, atol=1e-6)


def test_easgd_exchange_is_one_elastic_force_on_both_sides() -> None:
    """lr 1, beta1 0, gamma 0, no momentum: the local step makes x the end of tau SGD steps; the exchange
    moves the center by diff = alpha (x - center) and x by -diff, with the center from before."""
    tau, eta, alpha = 3, 0.05, 0.3
    model, sgd_model = _model(), _model()
    rep, flat = _replica(model, tau)
    batches = _batches(tau)
    rep.begin_round(_grad_fn(model, flat, list(batches)), ChainHyper(0.0, eta, 0.0, 0.0, 0.0, 0.0), None)
    x = rep.local_step(OuterHyper(lr=1.0, rho=0.0, momentum=0.0, nesterov=False)).clone()
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=eta)
    for xb, yb in batches:
        sgd.zero_grad()
        F.cross_entropy(sgd_model(xb), yb).backward()
        sgd.step()
    sgd_flat = torch.cat([p.detach().reshape(-1) for p in sgd_model.parameters()])
    assert torch.allclose(x, sgd_flat, atol=1e-6)
    center = torch.randn_like(x)
    before = center.clone()
    returned = easgd_center_step_(center, x, alpha)
    assert torch.equal(returned, before)
    diff = alpha * (x - before)
    assert torch.allclose(center, before + diff, atol=1e-6)
    rep.easgd_exchange(returned, alpha)
    assert torch.allclose(rep.x, x - diff, atol=1e-6)


def test_sync_mean_is_the_mean_and_order_free() -> None:
    g = torch.Generator().manual_seed(0)
    mus = [torch.randn(1000, generator=g) for _ in range(5)]
    forward, backward = SyncMean(), SyncMean()
    for mu in mus:
        forward.add(mu)
    for mu in reversed(mus):
        backward.add(mu)
    (mean, distance), (mean_reversed, _) = forward.finish(), backward.finish()
    assert torch.equal(mean, mean_reversed) and mean.dtype == torch.float32
    assert torch.allclose(mean, torch.stack(mus).mean(0), atol=1e-6)
    spread = math.sqrt(float(((torch.stack(mus).double() - torch.stack(mus).double().mean(0)) ** 2).sum(1).mean()))
    assert distance == pytest.approx(spread, rel=1e-6)


def test_a_donated_first_report_is_the_mean_alone_and_otherwise_added_like_any_other() -> None:
    g = torch.Generator().manual_seed(1)
    mus = [torch.randn(1001, generator=g) for _ in range(4)]  # an odd length: the kernels' tails too
    alone = SyncMean()
    alone.add(mus[0], donated=True)
    mean, distance = alone.finish()
    assert mean.data_ptr() == mus[0].data_ptr() and distance == 0.0  # kept, not copied
    originals = [mu.clone() for mu in mus]
    for n in (2, 3, 4):
        donated, copied = SyncMean(), SyncMean()
        first = mus[0].clone()
        donated.add(first, donated=True)
        copied.add(mus[0])
        for mu in mus[1:n]:
            donated.add(mu)
            copied.add(mu)
        (a, distance_a), (b, distance_b) = donated.finish(), copied.finish()
        assert torch.equal(a, b) and distance_a == pytest.approx(distance_b, rel=1e-12)
        spread = (torch.stack(mus[:n]).double() - torch.stack(mus[:n]).double().mean(0)).pow(2).sum(1).mean()
        assert distance_a == pytest.approx(math.sqrt(float(spread)), rel=1e-9)
        assert torch.equal(first, mus[0]) and a.data_ptr() != first.data_ptr()  # the sum is its own memory
    assert all(torch.equal(mu, kept) for mu, kept in zip(mus, originals, strict=True))  # no report was written to


def test_schedule_scoping_caps_and_lr_drops() -> None:
    spec = resolve(
        {
            "preset": "parle",
            "data": {"name": "synthetic", "synthetic_size": 1280, "batch_size": 64},
            "optim": {"L": 5, "gamma_growth": 0.5, "rho_growth": 0.1, "lr_drop_epochs": [1.0, 2.0]},
            "epochs": 3,
        }
    )
    s = Schedule(spec, 1280)
    assert s.batches_per_epoch == 20 and s.steps_per_round == 5 and s.total_rounds == 12
    for k in range(12):
        assert s.gamma(k) == min(0.01 * 1.5**k, 1.0)
        assert s.rho(k) == min(1.0 * 1.1**k, 10.0)
    assert s.gamma(12) == 1.0 and s.rho(30) == 10.0  # capped
    assert [s.lr(k) for k in (0, 3, 4, 7, 8)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])
    halves = resolve({"preset": "parle", "data": {"name": "synthetic", "batch_size": 64, "frac": 0.5}})
    default = Schedule(halves, 1280)
    # A data pass is over the replica's half; the authors' growth counts batches of the whole set.
    assert default.batches_per_epoch == 10 and default.gamma_growth == pytest.approx(0.5 / 20)


def test_presets_match_the_design_table() -> None:
    sgd = resolve({"preset": "sgd"})
    assert (sgd.replicas, sgd.optim.L, sgd.optim.rho0, sgd.optim.nesterov) == (1, 0, 0.0, True)
    esgd = resolve({"preset": "entropy-sgd"})
    assert (esgd.optim.L, esgd.optim.gamma0, esgd.optim.gamma_growth, esgd.optim.rho0) == (
        20,
        1e-4,
        1e-3,
        0.0,
    )
    assert (esgd.optim.noise, esgd.optim.beta1, esgd.optim.lr) == (1e-4, 0.75, 1.0)
    elastic = resolve({"preset": "elastic-sgd"})
    assert (elastic.optim.L, elastic.optim.rho0, elastic.optim.rho_max) == (0, 1.0, 10.0)
    parle = resolve({"preset": "parle"})
    o = parle.optim
    assert (o.L, o.gamma0, o.gamma_max, o.rho0, o.rho_max, o.beta1, o.noise) == (
        25,
        0.01,
        1.0,
        1.0,
        10.0,
        0.0,
        0.0,
    )
    assert (o.lr, o.inner_lr, o.momentum, o.inner_momentum) == (0.1, 0.1, 0.9, 0.9)
    easgd = resolve({"preset": "easgd"})
    assert (easgd.optim.mode, easgd.optim.lr, easgd.optim.beta1, easgd.optim.gamma0) == (
        "async",
        1.0,
        0.0,
        0.0,
    )
    # every hyperparameter can be overridden
    assert resolve({"preset": "parle", "optim": {"L": 7, "beta1": 0.5}}).optim.L == 7


def test_optimizer_constructor_errors_name_the_argument() -> None:
    params = list(_model().parameters())
    cases = [
        ({"lr": 0.0}, "lr"),
        ({"lr": 0.1, "L": -1}, "L"),
        ({"lr": 0.1, "momentum": -0.1}, "momentum"),
        ({"lr": 0.1, "gamma": 1.0, "gamma_max": 0.5}, "gamma_max"),
        ({"lr": 0.1, "noise": -1}, "noise"),
        ({"lr": 0.1, "beta1": 1.0}, "beta1"),
        ({"lr": 0.1, "inner_lr": 0}, "inner_lr"),
    ]
    for kwargs, name in cases:
        with pytest.raises(ValueError, match=name):
            EntropySGD(copy.deepcopy(params), **kwargs)  # type: ignore[arg-type]


def test_flat_parameters_are_views_and_grads_accumulate_in_place() -> None:
    model = _model()
    _, flat = _replica(model, 2)
    model(torch.randn(8, 20)).sum().backward()
    for p in model.parameters():
        assert p.grad is not None
    assert float(flat.grad.abs().sum()) > 0  # type: ignore[attr-defined]
    with torch.no_grad():
        flat.data.zero_()  # type: ignore[attr-defined]
    assert all(float(p.detach().abs().sum()) == 0 for p in model.parameters())
