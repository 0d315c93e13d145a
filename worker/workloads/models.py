"""Networks by name: the authors' Entropy-SGD / Parle models, or a user's ``package.module:callable``.

Built-ins. Layouts, dropout defaults and weight-decay defaults follow the Parle authors' research code,
pratikac/distributed-ensembles ``code/models.py`` (newest version that defines these models: the
``parle`` branch, May 2018); mnistfc and lenet are also those of ucla-vision/entropy-sgd
``python/models.py``. Parameter counts are trainable parameters (BN running statistics excluded).

- ``mnistfc``: Dropout(0.2) on the input, then twice [Linear 1024, BN, ReLU, Dropout(0.2)], then
  Linear 10. 1,867,786 trainable parameters for 1x28x28 inputs and 10 classes.
- ``lenet``: LeNet-BN 20-50-500 with dropout 0.25:
  [conv5x5 20 (bias), BN, ReLU, maxpool 3, Dropout] -> [conv5x5 50 (bias), BN, ReLU, maxpool 2,
  Dropout] -> flatten (50x2x2 = 200 for 28x28) -> Linear 500, BN, ReLU, Dropout -> Linear 10.
  520 + 40 + 25,050 + 100 + 100,500 + 1,000 + 5,010 = 132,220 parameters for 1x28x28, 10 classes.
- ``allcnn``: All-CNN-BN, c1 = 96 and c2 = 192 channels. Every conv has a bias and is followed by
  BN and ReLU:
  [conv3x3 c1, conv3x3 c1, conv3x3/2 c1] -> Dropout(p) -> [conv3x3 c2, conv3x3 c2, conv3x3/2 c2]
  -> Dropout(p) -> [conv3x3 c2, conv3x3 c2, conv1x1 num_classes] -> global average pool.
  ``p`` defaults to 0.5 (``model.options: {dropout: p}``; the authors used 0 with data
  augmentation). 1,667,166 parameters for 3x32x32 and 10 classes, 1,684,716 for 100 classes.
- ``wrn``: pre-activation Wide ResNet WRN-``depth``-``width``: conv3x3 16, three groups of
  n = (depth - 4) / 6 blocks with 16k, 32k, 64k channels (k = ``width``; strides 1, 2, 2), BN,
  ReLU, global average pool, Linear. A block is BN-ReLU-conv3x3(stride)-BN-ReLU-Dropout(p)-conv3x3,
  convs without bias, added to the block's input, or to a conv1x1(stride) projection of the raw
  (not pre-activated) input where the channel count changes. ``p`` defaults to 0.25
  (``model.options: {dropout: p}``). WRN-28-10: 36,479,194 parameters for 3x32x32 and 10 classes.

The authors pool with AvgPool2d(8) (32x32 inputs only); here pooling is adaptive, the same for
32x32 and usable for other sizes.

Initialisation uses torch's default RNG and never seeds it: the caller seeds (seed + replica index),
so replicas start from different, reproducible points.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from protos.spec import ModelSpec
from worker.workloads.errors import WorkloadError
from worker.workloads.user_code import resolve_callable

BUILTIN_MODELS = ("mnistfc", "lenet", "allcnn", "wrn")

Shape = tuple[int, int, int]

# model.options a built-in accepts, with the builder keyword each sets. The authors' dropout rate
# (their ``-d``) defaults per model: allcnn.__init__ 0.5, wideresnet.__init__ 0.25.
_BUILTIN_OPTIONS: dict[str, tuple[str, ...]] = {"allcnn": ("dropout",), "wrn": ("dropout",)}


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
    # The conv keeps its bias although BN follows, as in the authors' allcnn.
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _allcnn(spec: ModelSpec, input_shape: Shape, num_classes: int, *, dropout: float = 0.5) -> nn.Module:
    c1, c2 = 96, 192
    return nn.Sequential(
        _conv_bn_relu(input_shape[0], c1, 3, 1, 1),
        _conv_bn_relu(c1, c1, 3, 1, 1),
        # Strided convs replace max pooling: the point of "All-Convolutional".
        _conv_bn_relu(c1, c1, 3, 2, 1),
        nn.Dropout(dropout),
        _conv_bn_relu(c1, c2, 3, 1, 1),
        _conv_bn_relu(c2, c2, 3, 1, 1),
        _conv_bn_relu(c2, c2, 3, 2, 1),
        nn.Dropout(dropout),
        _conv_bn_relu(c2, c2, 3, 1, 1),
        _conv_bn_relu(c2, c2, 3, 1, 1),
        _conv_bn_relu(c2, num_classes, 1),
        # Adaptive rather than AvgPool2d(8) so non-32x32 inputs work too.
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


class _WideBlock(nn.Module):
    """Pre-activation block: ``branch(x) + shortcut(x)``.

    ``branch`` is BN-ReLU-conv3x3(stride)-BN-ReLU-Dropout-conv3x3; ``shortcut`` is the identity, or a
    conv1x1(stride) where the channel count changes. The projection reads the raw input ``x``, not the
    pre-activated one (the authors add the two branches of a table on the same input)."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.ReLU(inplace=True),
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        )
        # The authors test cin == cout only; in a WRN a strided block always changes the width too.
        self.shortcut: nn.Module = nn.Identity()
        if cin != cout or stride != 1:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The in-place ReLU acts on BN's fresh output, so ``x`` is intact for the shortcut.
        return self.branch(x) + self.shortcut(x)


def _wrn(spec: ModelSpec, input_shape: Shape, num_classes: int, *, dropout: float = 0.25) -> nn.Module:
    depth, k = spec.depth, spec.width
    if depth < 10 or (depth - 4) % 6 != 0:
        raise WorkloadError(f"model.depth: wrn needs depth = 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
    n = (depth - 4) // 6
    widths = [16, 16 * k, 32 * k, 64 * k]
    layers: list[nn.Module] = [nn.Conv2d(input_shape[0], widths[0], 3, padding=1, bias=False)]
    for group in range(3):
        blocks = [
            _WideBlock(
                widths[group] if i == 0 else widths[group + 1],
                widths[group + 1],
                2 if (group > 0 and i == 0) else 1,
                dropout,
            )
            for i in range(n)
        ]
        layers.append(nn.Sequential(*blocks))
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
    # As the authors: convs N(0, 2 / (k * k * out_channels)) (He, fan-out), BN weight 1 and bias 0
    # (torch's default), Linear bias 0 and default weight. Draws from the caller-seeded default RNG.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mnistfc": _mnistfc,
    "lenet": _lenet,
    "allcnn": _allcnn,
    "wrn": _wrn,
}


def _build_user_model(spec: ModelSpec, input_shape: Shape, num_classes: int) -> nn.Module:
    factory = resolve_callable(spec.name, "model.name")
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


def _builtin_options(spec: ModelSpec) -> dict[str, float]:
    """``spec.options`` checked against what built-in ``spec.name`` accepts, as builder keywords."""
    accepted = _BUILTIN_OPTIONS.get(spec.name, ())
    unknown = sorted(set(spec.options) - set(accepted))
    if unknown:
        # Built-ins are fixed architectures; silently ignoring options would hide a typo.
        keys = ", ".join(unknown)
        takes = f"takes only {', '.join(accepted)}" if accepted else "takes no options"
        raise WorkloadError(f"model.options: built-in model {spec.name} {takes} (got {keys})")
    kwargs: dict[str, float] = {}
    if "dropout" in spec.options:
        p = spec.options["dropout"]
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p < 1.0:
            raise WorkloadError(f"model.options: dropout must be a number in [0, 1), got {p!r}")
        kwargs["dropout"] = float(p)
    return kwargs


def build_model(spec: ModelSpec, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The network named by ``spec.name`` for ``input_shape`` (C, H, W) images and ``num_classes``.

    Raises ``WorkloadError`` naming ``model.name`` (unknown name, user callable that fails),
    ``model.depth`` (wrn depth not 6k + 4) or ``model.options`` (an option the built-in does not take,
    or a dropout outside [0, 1))."""
    if ":" in spec.name:
        return _build_user_model(spec, input_shape, num_classes)
    builder = _BUILDERS.get(spec.name)
    if builder is None:
        allowed = ", ".join(BUILTIN_MODELS)
        raise WorkloadError(f"model.name: unknown model {spec.name!r}; allowed: {allowed} or package.module:callable")
    return builder(spec, input_shape, num_classes, **_builtin_options(spec))
