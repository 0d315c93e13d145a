"""bench.network's pure parts: which namespaces it may delete, tc rates, and the jobs it submits (the
measurement itself needs root and namespaces: it is a benchmark, run by hand, never a test)."""

from __future__ import annotations

import pytest

from bench.network import METHODS, PREFIX, Measurement, job_spec, own_namespaces, rate_bits, ratios
from protos.spec import resolve


def test_only_namespaces_with_the_bench_prefix_are_ever_removed() -> None:
    listing = f"{PREFIX}-w1 (id: 3)\n{PREFIX}-coord (id: 0)\nvpn\n{PREFIX}x-other\n{PREFIX}\nci-{PREFIX}-w0\n"
    assert own_namespaces(listing) == [f"{PREFIX}-w1", f"{PREFIX}-coord"]
    assert own_namespaces("") == []


def test_rates_use_tc_units() -> None:
    assert rate_bits("100mbit") == 1e8
    assert rate_bits("1gbit") == 1e9
    assert rate_bits("512kbit") == 512e3
    with pytest.raises(ValueError, match="kbit, mbit or gbit"):
        rate_bits("100M")


@pytest.mark.parametrize("model", ["mnistfc", "lenet"])
def test_parle_talks_once_per_25_batches_and_elastic_sgd_once_per_batch(model: str) -> None:
    parle = resolve(job_spec(model, "parle", 3, 4))
    esgd = resolve(job_spec(model, "elastic-sgd", 3, 56))
    assert (parle.preset, parle.optim.L, esgd.preset, esgd.optim.L) == ("parle", 25, "elastic-sgd", 0)
    for spec in (parle, esgd):
        assert spec.replicas == 3 and spec.model.name == model and spec.data.name == "fashion-mnist"
    assert (parle.max_rounds, esgd.max_rounds) == (4, 56)
    assert set(METHODS) == {"parle", "elastic-sgd"}


def test_ratios_pair_the_methods_of_the_same_repeat() -> None:
    def m(method: str, repeat: int, wall_s: float, wire_bytes: int) -> Measurement:
        return Measurement("lenet", method, "100mbit", 50, 2, wall_s, 1.0, wire_bytes, 100, 1e8, repeat)

    results = [
        m("parle", 0, 10.0, 1),
        m("elastic-sgd", 0, 30.0, 25),
        m("elastic-sgd", 1, 8.0, 25),
        m("parle", 1, 4.0, 2),
    ]
    assert ratios(results) == {("lenet", "100mbit"): [(3.0, 25.0), (2.0, 12.5)]}
