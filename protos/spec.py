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
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

# Each preset is its authors' regime in our units (budgets and schedule points in data passes per replica;
# growth per round). docs/algorithm.md cites the file and function each value comes from.
PRESETS: dict[str, dict[str, Any]] = {
    # Plain SGD with Nesterov momentum: L = 0 is the gradient path, rho = 0 removes the coupling.
    "sgd": {
        "replicas": 1,
        "optim": {"L": 0, "lr": 0.1, "momentum": 0.9, "rho0": 0.0, "rho_max": 0.0},
    },
    # Entropy-SGD as entropyoptim.lua + train.lua (mnistfc regime): momentum on the raw gradient, reset every
    # outer step; lr 1 for 2 of the authors' epochs, then 0.1. Their epoch is one pass of *outer* steps, i.e.
    # L data passes: the drop is at 2 * 20 = 40 data passes, and their 5-epoch budget is 100 data passes.
    "entropy-sgd": {
        "replicas": 1,
        "optim": {
            "L": 20,
            "lr": 1.0,
            "lr_drop_epochs": [40],
            "lr_drop_factor": 0.1,
            "momentum": 0.0,
            "inner_lr": 0.1,
            "inner_momentum": 0.9,
            "inner_momentum_scope": "gradient",
            "inner_momentum_reset": True,
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
    # Parle as the research code's DistributedESGD: momentum on gradient + couplings, one inner buffer per
    # replica that persists across rounds.
    "parle": {
        "replicas": 3,
        "optim": {
            "L": 25,
            "lr": 0.1,
            "momentum": 0.9,
            "inner_lr": 0.1,
            "inner_momentum": 0.9,
            "inner_momentum_scope": "all",
            "inner_momentum_reset": False,
            "noise": 0.0,
            "beta1": 0.0,
            "gamma0": 0.01,
            "gamma_max": 1.0,
            "rho0": 1.0,
            "rho_max": 10.0,
        },
    },
    # Asynchronous EASGD (Zhang, Choromanska & LeCun 2015): from one shared start, tau = L plain SGD steps
    # (the chain with gamma 0, beta1 0; lr 1 makes x_a the chain's end), then the elastic exchange
    # diff = alpha (x_a - center), applied to both sides. alpha = beta / p with the paper's beta 0.9, p = 3.
    "easgd": {
        "replicas": 3,
        "optim": {
            "mode": "async",
            "L": 10,
            "lr": 1.0,
            "momentum": 0.0,
            "inner_lr": 0.1,
            "inner_momentum": 0.0,
            "inner_momentum_scope": "all",
            "inner_momentum_reset": False,
            "noise": 0.0,
            "beta1": 0.0,
            "gamma0": 0.0,
            "gamma_max": 0.0,
            "rho0": 0.0,
            "rho_max": 0.0,
            "alpha": 0.3,
        },
    },
}

# Weight decay when the job leaves optim.weight_decay unset: the authors' ``l2`` (added to the gradient as
# l2 * w). Their command line defaults --l2 to -1, "use the model's value" (pratikac/distributed-ensembles
# code/main.py, add_args), and each model's __init__ in code/models.py sets it: mnistfc and lenet 0 (as
# ucla-vision/entropy-sgd train.lua's --L2 default), allcnn 1e-3 (also the entropy-sgd README's CIFAR
# command), wideresnet 5e-4. User models default to 0.
MODEL_WEIGHT_DECAY: dict[str, float] = {"mnistfc": 0.0, "lenet": 0.0, "allcnn": 1e-3, "wrn": 5e-4}


class SpecError(ValueError):
    """A config that fails validation; ``str()`` is one line naming the key and what is allowed."""


MAX_SPEC_BYTES = 64 * 1024  # a job file is a page of YAML; anything larger is refused unread
MAX_SPEC_DEPTH = 16  # nested mappings and lists
MAX_REPLICAS = 256  # below what one coordinator serves at once (its Exchange streams)


def parse_yaml(text: str | bytes, where: str = "spec") -> Any:
    """YAML of a job spec, parsed under limits: at most ``MAX_SPEC_BYTES``, nesting at most ``MAX_SPEC_DEPTH``,
    and no anchors or aliases (an alias bomb of a few hundred bytes expands to megabytes). The checks walk
    the parser's events, which is linear in the text, before anything is built."""
    size = len(text.encode() if isinstance(text, str) else text)
    if size > MAX_SPEC_BYTES:
        raise SpecError(f"config error: {where} is larger than the limit of {MAX_SPEC_BYTES} bytes")
    depth = 0
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                raise SpecError(
                    f"config error: {where}: YAML anchors and aliases (&, *) are not allowed; write values out"
                )
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_SPEC_DEPTH:
                    raise SpecError(f"config error: {where}: nested deeper than {MAX_SPEC_DEPTH} levels")
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SpecError(f"config error: {where} is not valid YAML ({err})") from None


class _Strict(BaseModel):
    # Every float must be finite: ``.inf`` or ``.nan`` in a spec would outlive validation and break later.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)


class ModelSpec(_Strict):
    """The network. ``name`` is a built-in (mnistfc, lenet, allcnn, wrn) or ``package.module:callable``;
    a callable receives ``num_classes`` and ``input_shape`` keyword arguments plus ``options``."""

    name: str = Field("lenet", max_length=200)
    depth: int = Field(16, ge=4, le=1000, description="wrn depth (6k + 4)")
    width: int = Field(4, ge=1, le=64, description="wrn widening factor")
    options: dict[str, Any] = Field(default_factory=dict)


# Built-in data sets (anything else is ``package.module:callable``), and those read from ``data.root``.
DATASETS = ("fashion-mnist", "mnist", "idx", "cifar10", "cifar100", "npz", "synthetic")
DATASETS_WITH_ROOT = ("mnist", "idx", "cifar10", "cifar100", "npz")


class DataSpec(_Strict):
    """The data. ``name`` is a built-in: fashion-mnist (the Debian package's directory unless ``root``),
    mnist or idx (an IDX directory), cifar10 or cifar100 (python batches), npz (train.npz and test.npz
    with arrays x and y), synthetic; or ``package.module:callable``, called with ``options`` as keyword
    arguments, returning (train_x, train_y, test_x, test_y) or (train_dataset, test_dataset)."""

    name: str = Field("fashion-mnist", max_length=200, description="a built-in data set or package.module:callable")
    root: Path | None = Field(None, description="dataset directory (mnist, idx, cifar10, cifar100, npz need one)")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of a callable data set")
    train_limit: int | None = Field(
        None, ge=1, le=10**10, description="keep only the first N training samples (null: all)"
    )
    num_classes: int | None = Field(
        None, ge=1, le=1_000_000, description="null: 10 (cifar100: 100; idx, npz and callables: largest label + 1)"
    )
    batch_size: int = Field(128, ge=1, le=65_536)
    frac: float = Field(1.0, gt=0.0, le=1.0, description="fraction of the training set per replica")
    augment: bool = Field(False, description="random crops and flips")
    synthetic_size: int = Field(2048, ge=16, le=1_000_000, description="training samples of the synthetic set")
    test_batch_size: int = Field(1000, ge=1, le=65_536)
    bn_batches: int = Field(50, ge=1, le=10_000, description="training batches used to re-estimate BatchNorm")

    @field_validator("name")
    @classmethod
    def _known_name(cls, name: str) -> str:
        module, sep, attr = name.partition(":")
        if name in DATASETS or (sep and all(part.isidentifier() for part in [*module.split("."), *attr.split(".")])):
            return name
        raise ValueError(f"must be one of {', '.join(DATASETS)} or package.module:callable")

    @field_validator("options")
    @classmethod
    def _options_for_callables(cls, options: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        name = info.data.get("name")
        if options and name in DATASETS:
            raise ValueError(
                f"dataset {name} takes no options (got {', '.join(map(str, options))}); "
                "options are keyword arguments of a package.module:callable data set"
            )
        return options


class OptimSpec(_Strict):
    """The optimizer (docs/algorithm.md). gamma and rho are coupling strengths: scoping increases them.

    Units: one round is max(L, 1) mini-batches per replica; ``lr_drop_epochs`` are in data passes per
    replica; ``*_growth`` is per round; learning rates are per mini-batch step."""

    mode: Literal["sync", "async"] = Field("sync", description="sync: mean of the coupled averages; async: EASGD")
    lr: float = Field(0.1, gt=0.0, le=1e3, description="outer learning rate (the replica's step)")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="outer momentum; its buffer persists across rounds")
    nesterov: bool = True
    weight_decay: float | None = Field(
        None, ge=0.0, le=1.0, description="null: the model's default (allcnn 1e-3, wrn 5e-4, others 0)"
    )
    lr_drop_epochs: list[Annotated[float, Field(ge=0.0, le=1e6)]] = Field(
        default_factory=list,
        max_length=100,
        description="data passes per replica at which lr is multiplied by lr_drop_factor",
    )
    lr_drop_factor: float = Field(0.1, gt=0.0, le=1.0)
    L: int = Field(25, ge=0, le=100_000, description="Langevin steps (mini-batches) per round; 0: gradient path")
    inner_lr: float = Field(0.1, gt=0.0, le=1e3, description="step size of the Langevin chain")
    inner_momentum: float = Field(0.9, ge=0.0, lt=1.0)
    inner_momentum_scope: Literal["all", "gradient"] = Field(
        "all", description="all: momentum on gradient + couplings (Parle); gradient: on the raw gradient (Lua)"
    )
    inner_momentum_reset: bool = Field(
        False, description="zero the inner momentum buffer at every round (Entropy-SGD) or keep it (Parle)"
    )
    noise: float = Field(0.0, ge=0.0, le=1.0, description="Langevin noise: y += noise sqrt(2 inner_lr) N(0, I)")
    beta1: float = Field(0.0, ge=0.0, lt=1.0, description="mu = beta1 mu + (1 - beta1) y along the chain")
    gamma0: float = Field(0.01, ge=0.0, le=1e6)
    gamma_growth: float | None = Field(
        None, ge=0.0, le=1.0, description="per round; null: 0.5 / mini-batches in one pass over the training set"
    )
    gamma_max: float = Field(1.0, ge=0.0, le=1e6)
    rho0: float = Field(1.0, ge=0.0, le=1e6)
    rho_growth: float | None = Field(
        None, ge=0.0, le=1.0, description="per round; null: 0.5 / mini-batches in one pass over the training set"
    )
    rho_max: float = Field(10.0, ge=0.0, le=1e6)
    alpha: float = Field(0.3, gt=0.0, lt=1.0, description="async: diff = alpha (x_a - center) moves both sides")
    round_deadline_s: float = Field(
        600.0, gt=0.0, le=86_400.0, description="sync: close the round on who reported after this many seconds"
    )

    @model_validator(mode="after")
    def _caps_not_below_start(self) -> OptimSpec:
        if self.gamma_max < self.gamma0:
            raise ValueError(f"gamma_max ({self.gamma_max}) must be >= gamma0 ({self.gamma0})")
        if self.rho_max < self.rho0:
            raise ValueError(f"rho_max ({self.rho_max}) must be >= rho0 ({self.rho0})")
        if self.mode == "async" and self.L == 0:
            raise ValueError("L: async (EASGD) needs L >= 1 local steps between exchanges")
        return self

    @property
    def decay(self) -> float:
        """The weight decay in force (the resolved spec always sets it; 0 when it does not)."""
        return self.weight_decay or 0.0


class EvalSpec(_Strict):
    every_epochs: float = Field(
        1.0, gt=0.0, le=1e12, description="evaluate the reference every this many epochs (1e12: never)"
    )
    train_subset: int = Field(10000, ge=0, le=10**8, description="training samples for the train-split error")


class CheckpointSpec(_Strict):
    every_rounds: int | None = Field(None, ge=1, le=10**12, description="null: once per epoch")
    keep: int = Field(3, ge=1, le=1000)


class RaySpec(_Strict):
    """Placement of a job on a Ray cluster (``parle train --runtime ray``)."""

    address: str = Field("auto", max_length=500, description="ray.init address; auto: the cluster this driver runs on")
    num_cpus: float = Field(1.0, ge=0.0, le=1024.0, description="CPUs per replica (fractions allowed)")
    num_gpus: float = Field(0.0, ge=0.0, le=64.0, description="GPUs per replica; fractions let replicas share a GPU")
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    schedule_timeout_s: float = Field(
        60.0, gt=0.0, le=86_400.0, description="fail if the replicas cannot be placed in time"
    )
    metrics_port: int = Field(
        0, ge=0, le=65000, description="coordinator actor's /metrics port; replica r's worker: port + 1 + r (0: off)"
    )


class RuntimeSpec(_Strict):
    """How the job's parts talk (service runtimes; the local runtime ignores it)."""

    compression: Literal["none", "fp16", "bf16"] = Field("none", description="exchanged tensors on the wire")
    lease_s: float = Field(30.0, gt=0.0, le=86_400.0, description="a worker silent this long leaves its round")
    start_timeout_s: float = Field(
        300.0,
        gt=0.0,
        le=86_400.0,
        description="sync: wait this long for all replicas to join before starting with fewer",
    )
    ray: RaySpec = Field(default_factory=RaySpec)


class JobSpec(_Strict):
    name: str = Field("parle", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="letters, digits, . _ -")
    preset: Literal["sgd", "entropy-sgd", "elastic-sgd", "parle", "easgd"] = "parle"
    # One coordinator holds a sync round's exchanges at once: see coordinator.rpc_limits.STREAM_LIMITS.
    replicas: int = Field(3, ge=1, le=MAX_REPLICAS)
    epochs: float = Field(5.0, gt=0.0, le=1e6, description="budget in data passes per replica")
    max_rounds: int | None = Field(None, ge=1, le=10**12, description="stop after this many rounds (tests, demos)")
    seed: int = Field(0, ge=0, le=2**63 - 1)
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d{1,3})?)$")
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
    return key.strip().split("."), parse_yaml(raw, f"--set {key.strip()}")


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
    _default_weight_decay(merged)
    try:
        spec = JobSpec.model_validate(merged)
    except ValidationError as err:
        raise SpecError(_format_error(err)) from None
    if spec.data.name in DATASETS_WITH_ROOT and spec.data.root is None:
        raise SpecError(f"config error: data.root: dataset {spec.data.name} needs a directory")
    return spec


def _default_weight_decay(merged: dict[str, Any]) -> None:
    """Fill ``optim.weight_decay`` from the model when the job leaves it unset (malformed sections are left
    for validation to name)."""
    optim, model = merged.get("optim"), merged.get("model")
    if optim is None:
        optim = merged["optim"] = {}
    if not isinstance(optim, dict) or optim.get("weight_decay") is not None:
        return
    name = model.get("name", "lenet") if isinstance(model, dict) else "lenet"
    optim["weight_decay"] = MODEL_WEIGHT_DECAY.get(name, 0.0) if isinstance(name, str) else 0.0


def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    path = Path(path)
    try:
        with path.open("rb") as f:
            text = f.read(MAX_SPEC_BYTES + 1)  # a larger file is refused without reading it all
    except FileNotFoundError:
        raise SpecError(f"config error: {path}: no such file") from None
    raw = parse_yaml(text, str(path)) or {}
    return resolve(apply_overrides(raw, overrides or []))


def default_growth(batches_per_full_pass: float) -> float:
    """The authors' scoping rate: 0.5 / (mini-batches in one pass over the whole training set) per round."""
    return 0.5 / max(batches_per_full_pass, 1.0)


def growth_to_reach(start: float, cap: float, rounds: int) -> float:
    """Per-round growth that takes ``start`` to ``cap`` in ``rounds`` rounds (for short budgets)."""
    if start <= 0 or cap <= start or rounds <= 0:
        return 0.0
    return math.exp(math.log(cap / start) / rounds) - 1.0


def shard_size(data: DataSpec, train_size: int) -> int:
    """Samples one replica sees per data pass: ``frac`` of the ``train_size`` samples the data set has."""
    return max(1, round(data.frac * train_size))


def batches_per_epoch(data: DataSpec, train_size: int) -> int:
    """Mini-batches in one data pass of one replica's shard (a trailing partial batch is dropped)."""
    return max(1, shard_size(data, train_size) // data.batch_size)


def batches_per_full_pass(data: DataSpec, train_size: int) -> int:
    """Mini-batches in one pass over the whole training set: the unit of the authors' default scoping."""
    return max(1, train_size // data.batch_size)
