"""The job spec: one validated model per concern, presets with the authors' defaults, and errors
that name the offending key.

A job file is YAML::

    preset: parle            # sgd | entropy-sgd | elastic-sgd | parle | easgd
    replicas: 3
    epochs: 5                # budget: data passes per replica
    model: {name: lenet}
    data: {name: fashion-mnist, batch_size: 128}
    optim: {lr: 0.1, L: 25}  # any key overrides the preset

The preset supplies defaults for ``replicas`` and every ``optim`` key; the user's values win.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PRESETS: dict[str, dict[str, Any]] = {
    # Plain SGD with Nesterov momentum: L = 0 is the gradient path, rho = 0 removes the coupling.
    "sgd": {
        "replicas": 1,
        "optim": {"L": 0, "lr": 0.1, "momentum": 0.9, "rho0": 0.0, "rho_max": 0.0},
    },
    # Entropy-SGD, Algorithm 1 with scoping; the MNIST regime of the authors' code.
    "entropy-sgd": {
        "replicas": 1,
        "optim": {
            "L": 20,
            "lr": 1.0,
            "lr_drop_epochs": [2],
            "lr_drop_factor": 0.1,
            "momentum": 0.0,
            "inner_lr": 0.1,
            "inner_momentum": 0.9,
            "noise": 1e-4,
            "beta1": 0.75,
            "gamma0": 1e-4,
            "gamma_growth": 1e-3,
            "rho0": 0.0,
            "rho_max": 0.0,
        },
    },
    # Synchronous Elastic-SGD: every replica takes gradient steps pulled toward the mean.
    "elastic-sgd": {
        "replicas": 3,
        "optim": {"L": 0, "lr": 0.1, "momentum": 0.9, "rho0": 1.0, "rho_max": 10.0},
    },
    "parle": {
        "replicas": 3,
        "optim": {
            "L": 25,
            "lr": 0.1,
            "momentum": 0.9,
            "inner_lr": 0.1,
            "inner_momentum": 0.9,
            "noise": 0.0,
            "beta1": 0.0,
            "gamma0": 0.01,
            "gamma_max": 1.0,
            "rho0": 1.0,
            "rho_max": 10.0,
        },
    },
    # EASGD-style local SGD: tau plain SGD steps, then x_a = mu_a - rho (x_a - xbar), async reference.
    "easgd": {
        "replicas": 3,
        "optim": {
            "mode": "async",
            "L": 10,
            "lr": 1.0,
            "momentum": 0.0,
            "inner_lr": 0.1,
            "inner_momentum": 0.0,
            "noise": 0.0,
            "beta1": 0.0,
            "gamma0": 0.0,
            "gamma_max": 0.0,
            "rho0": 0.1,
            "rho_growth": 0.0,
            "rho_max": 0.1,
            "async_beta": 0.1,
        },
    },
}


class SpecError(ValueError):
    """A config that fails validation; ``str()`` is one line naming the key and what is allowed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ModelSpec(_Strict):
    """The network. ``name`` is a built-in (mnistfc, lenet, allcnn, wrn) or ``package.module:callable``;
    a callable receives ``num_classes`` and ``input_shape`` keyword arguments plus ``options``."""

    name: str = "lenet"
    depth: int = Field(16, ge=4, description="wrn depth (6k + 4)")
    width: int = Field(4, ge=1, description="wrn widening factor")
    options: dict[str, Any] = Field(default_factory=dict)


class DataSpec(_Strict):
    name: Literal["fashion-mnist", "mnist", "cifar10", "synthetic"] = "fashion-mnist"
    root: Path | None = Field(None, description="dataset directory (mnist and cifar10 need one)")
    batch_size: int = Field(128, ge=1)
    frac: float = Field(1.0, gt=0.0, le=1.0, description="fraction of the training set per replica")
    augment: bool = Field(False, description="random crops and flips (cifar10)")
    synthetic_size: int = Field(2048, ge=16, description="training samples of the synthetic set")
    test_batch_size: int = Field(1000, ge=1)
    bn_batches: int = Field(50, ge=1, description="training batches used to re-estimate BatchNorm")


class OptimSpec(_Strict):
    """DESIGN.md section 3. gamma and rho are coupling strengths: scoping increases them."""

    mode: Literal["sync", "async"] = "sync"
    lr: float = Field(0.1, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = True
    weight_decay: float = Field(0.0, ge=0.0)
    lr_drop_epochs: list[float] = Field(default_factory=list)
    lr_drop_factor: float = Field(0.1, gt=0.0)
    L: int = Field(25, ge=0, description="Langevin steps per round; 0 is the gradient path")
    inner_lr: float = Field(0.1, gt=0.0)
    inner_momentum: float = Field(0.9, ge=0.0, lt=1.0)
    noise: float = Field(0.0, ge=0.0)
    beta1: float = Field(0.0, ge=0.0, lt=1.0)
    gamma0: float = Field(0.01, ge=0.0)
    gamma_growth: float | None = Field(None, ge=0.0, description="per round; null: 0.5 / batches_per_epoch")
    gamma_max: float = Field(1.0, ge=0.0)
    rho0: float = Field(1.0, ge=0.0)
    rho_growth: float | None = Field(None, ge=0.0, description="per round; null: 0.5 / batches_per_epoch")
    rho_max: float = Field(10.0, ge=0.0)
    async_beta: float = Field(0.1, gt=0.0, le=1.0, description="async: xbar += beta (mu - xbar)")
    round_deadline_s: float = Field(600.0, gt=0.0, description="sync: close the round on who reported")

    @model_validator(mode="after")
    def _caps_not_below_start(self) -> OptimSpec:
        if self.gamma_max < self.gamma0:
            raise ValueError(f"gamma_max ({self.gamma_max}) must be >= gamma0 ({self.gamma0})")
        if self.rho_max < self.rho0:
            raise ValueError(f"rho_max ({self.rho_max}) must be >= rho0 ({self.rho0})")
        return self


class EvalSpec(_Strict):
    every_epochs: float = Field(1.0, gt=0.0, description="evaluate the reference every this many epochs")
    train_subset: int = Field(10000, ge=0, description="training samples for the train-split error")


class CheckpointSpec(_Strict):
    every_rounds: int | None = Field(None, ge=1, description="null: once per epoch")
    keep: int = Field(3, ge=1)


class RaySpec(_Strict):
    """Placement of a job on a Ray cluster (``parle train --runtime ray``)."""

    address: str = Field("auto", description="ray.init address; auto: the cluster this driver runs on")
    num_cpus: float = Field(1.0, ge=0.0, description="CPUs per replica (fractions allowed)")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs per replica; fractions let replicas share a GPU")
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    schedule_timeout_s: float = Field(60.0, gt=0.0, description="fail if the replicas cannot be placed in time")
    metrics_port: int = Field(
        0, ge=0, le=65000, description="coordinator actor's /metrics port; replica r's worker: port + 1 + r (0: off)"
    )


class RuntimeSpec(_Strict):
    """How the job's parts talk (service runtimes; the local runtime ignores it)."""

    compression: Literal["none", "fp16", "bf16"] = Field("none", description="exchanged tensors on the wire")
    lease_s: float = Field(30.0, gt=0.0, description="a worker silent this long leaves its round")
    start_timeout_s: float = Field(
        300.0, gt=0.0, description="sync: wait this long for all replicas to join before starting with fewer"
    )
    ray: RaySpec = Field(default_factory=RaySpec)


class JobSpec(_Strict):
    name: str = Field("parle", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="letters, digits, . _ -")
    preset: Literal["sgd", "entropy-sgd", "elastic-sgd", "parle", "easgd"] = "parle"
    replicas: int = Field(3, ge=1, le=4096)
    epochs: float = Field(5.0, gt=0.0, le=1e6, description="budget in data passes per replica")
    max_rounds: int | None = Field(None, ge=1, le=10**12, description="stop after this many rounds (tests, demos)")
    seed: int = 0
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$")
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "<root>"
    got = first.get("input")
    if first["type"] == "extra_forbidden":
        return f"config error: {key}: unknown key"
    if first["type"] == "literal_error":
        return f"config error: {key}: {first['msg'].lower()} (got {got!r})"
    message = first["msg"].removeprefix("Value error, ")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"config error: {key}: {message}{shown}"


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise SpecError(f"config error: --set {item!r}: expected KEY=VALUE, e.g. optim.lr=0.05")
    key, raw = item.split("=", 1)
    if not key.strip():
        raise SpecError(f"config error: --set {item!r}: empty key")
    return key.strip().split("."), yaml.safe_load(raw)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to a raw config dict."""
    out = copy.deepcopy(raw)
    for item in overrides:
        path, value = _parse_override(item)
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SpecError(f"config error: --set {item!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return out


def resolve(raw: dict[str, Any]) -> JobSpec:
    """Preset defaults, then the user's values, then validation."""
    if not isinstance(raw, dict):
        raise SpecError(f"config error: expected a mapping at the top level, got {type(raw).__name__}")
    preset = raw.get("preset", "parle")
    if not isinstance(preset, str) or preset not in PRESETS:
        raise SpecError(f"config error: preset: must be one of {', '.join(PRESETS)} (got {preset!r})")
    merged = _deep_merge(PRESETS[preset], raw)
    try:
        spec = JobSpec.model_validate(merged)
    except ValidationError as err:
        raise SpecError(_format_error(err)) from None
    if spec.data.name in ("mnist", "cifar10") and spec.data.root is None:
        raise SpecError(f"config error: data.root: dataset {spec.data.name} needs a directory")
    return spec


def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError(f"config error: {path}: no such file") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise SpecError(f"config error: {path}: not valid YAML ({err})") from None
    return resolve(apply_overrides(raw, overrides or []))


def default_growth(batches_per_epoch: float) -> float:
    """The authors' scoping rate: 0.5 / batches_per_epoch per round."""
    return 0.5 / max(batches_per_epoch, 1.0)


def growth_to_reach(start: float, cap: float, rounds: int) -> float:
    """Per-round growth that takes ``start`` to ``cap`` in ``rounds`` rounds (for short budgets)."""
    if start <= 0 or cap <= start or rounds <= 0:
        return 0.0
    return math.exp(math.log(cap / start) / rounds) - 1.0


# Training-set sizes of the standard formats, so the coordinator can run the schedule without ever
# loading data; workers check what they load against these.
STANDARD_TRAIN_SIZES = {"fashion-mnist": 60000, "mnist": 60000, "cifar10": 50000}


def train_size(data: DataSpec) -> int:
    if data.name == "synthetic":
        return data.synthetic_size
    return STANDARD_TRAIN_SIZES[data.name]


def shard_size(data: DataSpec) -> int:
    return max(1, round(data.frac * train_size(data)))


def batches_per_epoch(data: DataSpec) -> int:
    """Mini-batches in one data pass of one replica's shard (a trailing partial batch is dropped)."""
    return max(1, shard_size(data) // data.batch_size)
