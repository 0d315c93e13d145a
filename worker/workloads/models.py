"""Networks by name: the authors' Entropy-SGD / Parle models, or a user's ``package.module:callable``.

Built-ins (layouts follow ucla-vision/entropy-sgd ``python/models.py``):

- ``mnistfc``: Dropout(0.2) on the input, then twice [Linear 1024, BN, ReLU, Dropout(0.2)], then
  Linear 10. 1,867,786 trainable parameters for 1x28x28 inputs and 10 classes.
- ``lenet``: LeNet-BN 20-50-500 with dropout 0.25:
  [conv5x5 20 (bias), BN, ReLU, maxpool 3, Dropout] -> [conv5x5 50 (bias), BN, ReLU, maxpool 2,
  Dropout] -> flatten (50x2x2 = 200 for 28x28) -> Linear 500, BN, ReLU, Dropout -> Linear 10.
  520 + 40 + 25,050 + 100 + 100,500 + 1,000 + 5,010 = 132,220 parameters for 1x28x28, 10 classes.
- ``allcnn``: All-CNN-C (Springenberg et al.) with BN after every conv, dropout 0.2 on the input and
  0.5 after each stride-2 conv, global average pooling of a 1x1 conv with ``num_classes`` channels.
- ``wrn``: pre-activation Wide ResNet (Zagoruyko & Komodakis), depth 6k + 4, widening factor ``width``.

Initialisation uses torch's default RNG and never seeds it: the caller seeds (seed + replica index),
so replicas start from different, reproducible points.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import torch
from torch import nn

from protos.spec import ModelSpec
from worker.workloads.errors import WorkloadError

BUILTIN_MODELS = ("mnistfc", "lenet", "allcnn", "wrn")

Shape = tuple[int, int, int]


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (BN running statistics are buffers and are not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _mnistfc(spec: ModelSpec, input_shape: Shape, num_classes: int) -> nn.Module:
    hidden, p = 1024, 0.2
    return nn.Sequential(
        nn.Flatten(),
        nn.Dropout(p),
        nn.Linear(math.prod(input_shape), hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(p),
        nn.Linear(hidden, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(p),
        nn.Linear(hidden, num_classes),
    )


def _conv_bn_pool(cin: int, cout: int, pool: int, p: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 5),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(pool, stride=pool),
        nn.Dropout(p),
    )


def _lenet(spec: ModelSpec, input_shape: Shape, num_classes: int) -> nn.Module:
    channels, height, width = input_shape
    # Spatial size after conv5 (valid) + pool 3, then conv5 + pool 2: 28 -> 24 -> 8 -> 4 -> 2.
    h, w = (height - 4) // 3, (width - 4) // 3
    h, w = (h - 4) // 2, (w - 4) // 2
    if h < 1 or w < 1:
        raise WorkloadError(f"model.name: lenet needs images of at least 19x19, got {height}x{width}")
    p = 0.25
    return nn.Sequential(
        _conv_bn_pool(channels, 20, 3, p),
        _conv_bn_pool(20, 50, 2, p),
        nn.Flatten(),
        nn.Linear(50 * h * w, 500),
        nn.BatchNorm1d(500),
        nn.ReLU(inplace=True),
        nn.Dropout(p),
        nn.Linear(500, num_classes),
    )


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _allcnn(spec: ModelSpec, input_shape: Shape, num_classes: int) -> nn.Module:
    c1, c2 = 96, 192
    return nn.Sequential(
        nn.Dropout(0.2),
        _conv_bn_relu(input_shape[0], c1, 3, 1, 1),
        _conv_bn_relu(c1, c1, 3, 1, 1),
        # Strided convs replace max pooling: the point of "All-Convolutional".
        _conv_bn_relu(c1, c1, 3, 2, 1),
        nn.Dropout(0.5),
        _conv_bn_relu(c1, c2, 3, 1, 1),
        _conv_bn_relu(c2, c2, 3, 1, 1),
        _conv_bn_relu(c2, c2, 3, 2, 1),
        nn.Dropout(0.5),
        _conv_bn_relu(c2, c2, 3, 1, 1),
        _conv_bn_relu(c2, c2, 1),
        _conv_bn_relu(c2, num_classes, 1),
        # Adaptive rather than AvgPool2d(8) so non-32x32 inputs work too.
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


class _WideBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus a (projected) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module | None = None
        if cin != cout or stride != 1:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(x))
        # The projection sees the pre-activated input, as in the reference implementation.
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + skip


def _wrn(spec: ModelSpec, input_shape: Shape, num_classes: int) -> nn.Module:
    depth, k = spec.depth, spec.width
    if depth < 10 or (depth - 4) % 6 != 0:
        raise WorkloadError(f"model.depth: wrn needs depth = 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
    n = (depth - 4) // 6
    widths = [16, 16 * k, 32 * k, 64 * k]
    layers: list[nn.Module] = [nn.Conv2d(input_shape[0], widths[0], 3, padding=1, bias=False)]
    for group in range(3):
        for i in range(n):
            cin = widths[group] if i == 0 else widths[group + 1]
            stride = 2 if (group > 0 and i == 0) else 1
            layers.append(_WideBlock(cin, widths[group + 1], stride))
    layers += [
        nn.BatchNorm2d(widths[3]),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(widths[3], num_classes),
    ]
    model = nn.Sequential(*layers)
    _wrn_init(model)
    return model


def _wrn_init(model: nn.Module) -> None:
    # He init for convs matters for deep ResNets; draws from the caller-seeded default RNG.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


_BUILDERS: dict[str, Callable[[ModelSpec, Shape, int], nn.Module]] = {
    "mnistfc": _mnistfc,
    "lenet": _lenet,
    "allcnn": _allcnn,
    "wrn": _wrn,
}


def _resolve_callable(name: str) -> Callable[..., object]:
    module_name, _, attr_path = name.partition(":")
    if not module_name or not attr_path:
        raise WorkloadError(f"model.name: {name!r}: expected package.module:callable")
    try:
        obj: object = importlib.import_module(module_name)
    except Exception as err:
        raise WorkloadError(f"model.name: {name!r}: cannot import {module_name} ({type(err).__name__}: {err})") from err
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise WorkloadError(f"model.name: {name!r}: {module_name} has no attribute {attr_path}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise WorkloadError(f"model.name: {name!r}: {attr_path} is not callable")
    return obj


def _build_user_model(spec: ModelSpec, input_shape: Shape, num_classes: int) -> nn.Module:
    factory = _resolve_callable(spec.name)
    clash = sorted({"num_classes", "input_shape"} & spec.options.keys())
    if clash:
        raise WorkloadError(f"model.options: {', '.join(clash)} is set by the dataset, not by options")
    try:
        model = factory(num_classes=num_classes, input_shape=input_shape, **spec.options)
    except Exception as err:
        raise WorkloadError(f"model.name: {spec.name!r} raised {type(err).__name__}: {err}") from err
    if not isinstance(model, nn.Module):
        raise WorkloadError(f"model.name: {spec.name!r} returned {type(model).__name__}, expected a torch.nn.Module")
    return model


def build_model(spec: ModelSpec, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The network named by ``spec.name`` for ``input_shape`` (C, H, W) images and ``num_classes``.

    Raises ``WorkloadError`` naming ``model.name`` (unknown name, user callable that fails) or
    ``model.depth`` (wrn depth not 6k + 4)."""
    if ":" in spec.name:
        return _build_user_model(spec, input_shape, num_classes)
    builder = _BUILDERS.get(spec.name)
    if builder is None:
        allowed = ", ".join(BUILTIN_MODELS)
        raise WorkloadError(f"model.name: unknown model {spec.name!r}; allowed: {allowed} or package.module:callable")
    if spec.options:
        # Built-ins are fixed architectures; silently ignoring options would hide a typo.
        keys = ", ".join(sorted(spec.options))
        raise WorkloadError(f"model.options: built-in model {spec.name} takes no options (got {keys})")
    return builder(spec, input_shape, num_classes)
