"""User code named in a job: ``package.module:callable`` for a model (``model.name``) or a data set
(``data.name``), imported and looked up in one place, with errors that name the key."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from worker.workloads.errors import WorkloadError, one_line


def resolve_callable(name: str, key: str) -> Callable[..., object]:
    """The callable ``name`` (``package.module:attr.path``) names; ``key`` is the config key for errors."""
    module_name, _, attr_path = name.partition(":")
    if not module_name or not attr_path:
        raise WorkloadError(f"{key}: {name}: expected package.module:callable")
    try:
        obj: object = importlib.import_module(module_name)
    except Exception as err:
        raise WorkloadError(
            f"{key}: {name}: cannot import {module_name} ({type(err).__name__}: {one_line(err)})"
        ) from None
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise WorkloadError(f"{key}: {name}: {module_name} has no attribute {attr_path}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise WorkloadError(f"{key}: {name}: {attr_path} is not callable")
    return obj
