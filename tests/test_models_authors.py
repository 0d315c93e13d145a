"""Built-in allcnn and wrn against the Parle authors' definitions (pratikac/distributed-ensembles
``code/models.py``): parameter counts derived by hand from their layer lists, dropout placement and
rates, the ``dropout`` option, forward shapes, and the per-model weight-decay defaults."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from protos.spec import ModelSpec, resolve
from worker.workloads import WorkloadError, build_model, count_parameters

pytestmark = pytest.mark.timeout(120)


def _conv(cin: int, cout: int, k: int, bias: bool = True) -> int:
    return cin * cout * k * k + (cout if bias else 0)


def _bn(c: int) -> int:
    return 2 * c


def _allcnn_count(num_classes: int) -> int:
    # Authors' allcnn (c1=96, c2=192): every convbn is a conv with bias plus BN.
    # conv3x3 3->96, 2x conv3x3 96->96, conv3x3 96->192, 4x conv3x3 192->192, conv1x1 192->classes.
    c1, c2 = 96, 192
    convs = [(3, c1, 3), (c1, c1, 3), (c1, c1, 3), (c1, c2, 3), *[(c2, c2, 3)] * 4, (c2, num_classes, 1)]
    return sum(_conv(ci, co, k) + _bn(co) for ci, co, k in convs)


def _wrn_count(depth: int, widen: int, num_classes: int) -> int:
    # Authors' wideresnet: conv3x3 3->16 (no bias); per block BN(ci), conv3x3 ci->co, BN(co),
    # conv3x3 co->co (no biases) and a conv1x1 ci->co shortcut when ci != co; final BN(64k), Linear.
    n = (depth - 4) // 6
    nc = [16, 16 * widen, 32 * widen, 64 * widen]
    total = _conv(3, nc[0], 3, bias=False)
    for g in range(3):
        for i in range(n):
            ci, co = (nc[g] if i == 0 else nc[g + 1]), nc[g + 1]
            total += _bn(ci) + _conv(ci, co, 3, False) + _bn(co) + _conv(co, co, 3, False)
            total += _conv(ci, co, 1, False) if ci != co else 0
    return total + _bn(nc[3]) + nc[3] * num_classes + num_classes


# 2,880 + 2 x 83,232 + 166,464 + 4 x 332,352 + (1,930 + 20) = 1,667,166 for CIFAR-10;
# the last conv1x1 192->100 with BN is 19,500 for CIFAR-100: 1,684,716.
@pytest.mark.parametrize(("num_classes", "expected"), [(10, 1_667_166), (100, 1_684_716)])
def test_allcnn_parameter_count(num_classes: int, expected: int) -> None:
    assert _allcnn_count(num_classes) == expected
    model = build_model(ModelSpec(name="allcnn"), (3, 32, 32), num_classes)
    assert count_parameters(model) == expected


# WRN-28-10 (n = 4, widths 16, 160, 320, 640): stem 432; group 1: 256,352 + 3 x 461,440;
# group 2: 1,434,560 + 3 x 1,844,480; group 3: 5,736,320 + 3 x 7,375,360; BN 1,280; Linear 6,410.
# Total 36,479,194 (the paper's "36.5M"); with 100 classes the Linear is 64,100: 36,536,884.
@pytest.mark.parametrize(("num_classes", "expected"), [(10, 36_479_194), (100, 36_536_884)])
def test_wrn_28_10_parameter_count(num_classes: int, expected: int) -> None:
    assert _wrn_count(28, 10, num_classes) == expected
    model = build_model(ModelSpec(name="wrn", depth=28, width=10), (3, 32, 32), num_classes)
    assert count_parameters(model) == expected


@pytest.mark.parametrize(("depth", "width"), [(10, 1), (16, 4), (22, 2)])
def test_wrn_parameter_count_other_sizes(depth: int, width: int) -> None:
    model = build_model(ModelSpec(name="wrn", depth=depth, width=width), (3, 32, 32), 10)
    assert count_parameters(model) == _wrn_count(depth, width, 10)


def _dropout_rates(model: nn.Module) -> list[float]:
    return [m.p for m in model.modules() if isinstance(m, nn.Dropout)]


def test_allcnn_layout_and_default_dropout() -> None:
    model = build_model(ModelSpec(name="allcnn"), (3, 32, 32), 10)
    kinds = [type(m) for m in model.children()]
    # Nine conv-BN-ReLU blocks; dropout only after the two strided convs, none on the input.
    assert kinds[0] is nn.Sequential
    assert [i for i, k in enumerate(kinds) if k is nn.Dropout] == [3, 7]
    assert _dropout_rates(model) == [0.5, 0.5]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.kernel_size[0], c.stride[0], c.out_channels) for c in convs] == [
        (3, 1, 96),
        (3, 1, 96),
        (3, 2, 96),
        (3, 1, 192),
        (3, 1, 192),
        (3, 2, 192),
        (3, 1, 192),
        (3, 1, 192),
        (1, 1, 10),
    ]
    assert all(c.bias is not None for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 9


def test_wrn_block_layout_and_default_dropout() -> None:
    model = build_model(ModelSpec(name="wrn", depth=16, width=4), (3, 32, 32), 10)
    assert _dropout_rates(model) == [0.25] * 6
    blocks = [m for m in model.modules() if hasattr(m, "branch")]
    assert len(blocks) == 6
    expected = [nn.BatchNorm2d, nn.ReLU, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Dropout, nn.Conv2d]
    for block in blocks:
        assert [type(m) for m in block.branch] == expected
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is None for c in convs)
    # Projections exactly where the width changes: 16->64, 64->128 (stride 2), 128->256 (stride 2).
    projections = [(b.shortcut.in_channels, b.shortcut.stride[0]) for b in blocks if isinstance(b.shortcut, nn.Conv2d)]
    assert projections == [(16, 1), (64, 2), (128, 2)]


def test_wrn_shortcut_reads_raw_input() -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec(name="wrn", depth=10, width=2), (3, 32, 32), 10).eval()
    block = next(m for m in model.modules() if hasattr(m, "branch"))
    assert isinstance(block.shortcut, nn.Conv2d)
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        assert torch.allclose(block(x), block.branch(x) + block.shortcut(x))


def test_wrn_conv_init_is_he_fan_out() -> None:
    torch.manual_seed(1)
    model = build_model(ModelSpec(name="wrn", depth=10, width=4), (3, 32, 32), 10)
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d) and m.in_channels == m.out_channels == 256)
    expected = math.sqrt(2.0 / (3 * 3 * 256))
    assert conv.weight.std().item() == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize("name", ["allcnn", "wrn"])
@pytest.mark.parametrize("p", [0, 0.0, 0.3])
def test_dropout_option(name: str, p: float) -> None:
    model = build_model(ModelSpec(name=name, depth=10, width=1, options={"dropout": p}), (3, 32, 32), 10)
    rates = _dropout_rates(model)
    assert rates and all(r == p for r in rates)


@pytest.mark.parametrize("name", ["allcnn", "wrn"])
@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "0.5", True, None, float("nan")])
def test_dropout_option_validated(name: str, bad: Any) -> None:
    spec = ModelSpec(name=name, depth=10, width=1, options={"dropout": bad})
    with pytest.raises(WorkloadError, match=r"^model\.options: dropout must be a number in \[0, 1\)"):
        build_model(spec, (3, 32, 32), 10)


@pytest.mark.parametrize("name", ["allcnn", "wrn"])
def test_unknown_option_rejected(name: str) -> None:
    spec = ModelSpec(name=name, depth=10, width=1, options={"dropout": 0.1, "drop_rate": 0.3})
    message = rf"^model\.options: built-in model {name} takes only dropout \(got drop_rate\)"
    with pytest.raises(WorkloadError, match=message):
        build_model(spec, (3, 32, 32), 10)


@pytest.mark.parametrize("name", ["mnistfc", "lenet"])
def test_mnist_models_take_no_dropout_option(name: str) -> None:
    with pytest.raises(WorkloadError, match=r"^model\.options: .*takes no options \(got dropout\)"):
        build_model(ModelSpec(name=name, options={"dropout": 0.1}), (1, 28, 28), 10)


@pytest.mark.parametrize(
    ("name", "shape", "num_classes"),
    [("allcnn", (3, 32, 32), 10), ("allcnn", (3, 32, 32), 100), ("wrn", (3, 32, 32), 10), ("wrn", (3, 16, 16), 7)],
)
def test_forward_shapes(name: str, shape: tuple[int, int, int], num_classes: int) -> None:
    model = build_model(ModelSpec(name=name, depth=10, width=1), shape, num_classes)
    for mode in (True, False):
        model.train(mode)
        assert model(torch.randn(2, *shape)).shape == (2, num_classes)


def test_default_weight_decay_follows_the_model() -> None:
    for name, wd in {"mnistfc": 0.0, "lenet": 0.0, "allcnn": 1e-3, "wrn": 5e-4}.items():
        assert resolve({"model": {"name": name}}).optim.weight_decay == wd
    assert resolve({"model": {"name": "my_pkg.nets:build"}}).optim.weight_decay == 0.0
    assert resolve({"model": {"name": "wrn"}, "optim": {"weight_decay": 1e-4}}).optim.weight_decay == 1e-4
