"""What a worker agrees to run: user code only from allowed module prefixes, data only under allowed
directories.

A job names its model and data; a pool worker serves whoever can submit to its coordinator, so a job
must not make it import any module on its path or read any file it can reach. A worker starts with
``Trust`` (``parle worker --allow-code PREFIX --data-dir DIR``); before it builds a job's workload,
``Trust.check`` refuses what the operator did not allow, as the job's error (``WorkloadError``): the job
goes FAILED with a message naming the callable or path and the flag, and the worker serves the next job.

Built-in models and data sets are always allowed; the built-in Fashion-MNIST directory too. ``parle
train`` on one's own machine trusts its own config (``Trust.for_spec``), and hands the same allowance to
the worker processes or Ray actors it starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from protos.spec import JobSpec
from worker.workloads.errors import WorkloadError

# Always readable: the Debian package's Fashion-MNIST (the default data set's directory).
SYSTEM_DATA_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)


def _module_of(name: str) -> str | None:
    """The module of a ``package.module:callable`` name; None for a built-in."""
    module, sep, _ = name.partition(":")
    return module if sep else None


def _covers(prefix: str, module: str) -> bool:
    """``prefix`` allows the module itself and its submodules (``pkg`` allows ``pkg.models``, not ``pkgx``)."""
    return module == prefix or module.startswith(prefix + ".")


@dataclass(frozen=True)
class Trust:
    """Allowed module prefixes (``code``) and data directories (``data_dirs``, resolved at check time)."""

    code: tuple[str, ...] = ()
    data_dirs: tuple[Path, ...] = SYSTEM_DATA_DIRS

    @classmethod
    def of(cls, code: list[str] | None, data_dirs: list[Path] | None) -> Trust:
        """From the worker's flags: prefixes without a trailing dot; no --data-dir: the system directory."""
        prefixes = tuple(p.strip().rstrip(".") for p in code or [] if p.strip().rstrip("."))
        dirs = tuple(Path(d).expanduser() for d in data_dirs) if data_dirs else SYSTEM_DATA_DIRS
        return cls(prefixes, dirs)

    @classmethod
    def for_spec(cls, spec: JobSpec) -> Trust:
        """What running one's own config allows: its model and data callables and its data directory."""
        modules = tuple(m for m in (_module_of(spec.model.name), _module_of(spec.data.name)) if m is not None)
        root = (Path(spec.data.root).expanduser().resolve(),) if spec.data.root is not None else ()
        return cls(modules, (*SYSTEM_DATA_DIRS, *root))

    def flags(self) -> list[str]:
        """The ``parle worker`` flags that give a worker process this allowance."""
        out: list[str] = []
        for prefix in self.code:
            out += ["--allow-code", prefix]
        for directory in self.data_dirs:
            out += ["--data-dir", str(directory)]
        return out

    def check(self, spec: JobSpec) -> None:
        """Raise ``WorkloadError`` naming the callable or path, and the flag, unless ``spec`` is allowed."""
        for key, name in (("model.name", spec.model.name), ("data.name", spec.data.name)):
            module = _module_of(name)
            if module is not None and not any(_covers(p, module) for p in self.code):
                allowed = ", ".join(self.code) or "none"
                raise WorkloadError(
                    f"{key}: {name}: this worker does not run code from {module} (allowed prefixes: {allowed}); "
                    f"start it with --allow-code {module} to allow it"
                )
        if spec.data.root is not None:
            self._check_root(Path(spec.data.root))

    def _check_root(self, root: Path) -> None:
        real = root.expanduser().resolve()  # symlinks followed: a link inside may not lead outside
        dirs = [d.resolve() for d in self.data_dirs]
        if not any(real == d or real.is_relative_to(d) for d in dirs):
            shown = f"{root} (resolves to {real})" if real != root else str(root)
            raise WorkloadError(
                f"data.root: {shown} is outside this worker's data directories "
                f"({', '.join(map(str, dirs))}); start it with --data-dir covering it"
            )
