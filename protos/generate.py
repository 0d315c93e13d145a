"""Generate the gRPC stubs for ``protos/parle.proto``: ``python -m protos.generate [--check]``.

The stubs (``parle_pb2.py``, ``parle_pb2_grpc.py``, ``parle_pb2.pyi``) are not committed: they embed
the grpcio-tools/protobuf versions they were made with, so ``scripts/setup.sh`` makes them for the
versions it installs. protoc runs with ``-I`` at the repository root on ``protos/parle.proto``, so the
grpc module imports the messages as ``protos.parle_pb2`` and works from any working directory.

Idempotent: protoc writes into a temporary folder and only files whose bytes changed are replaced, so a
second run touches nothing (mtimes stay put, nothing recompiles). ``--check`` writes nothing and exits 1
when the stubs are missing or stale, for CI.
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
import sys
import tempfile
from pathlib import Path

PROTO = "protos/parle.proto"
# Paths relative to the repository root, as protoc names them.
OUTPUTS = ("protos/parle_pb2.py", "protos/parle_pb2_grpc.py", "protos/parle_pb2.pyi")
GRPC_MODULE = "protos/parle_pb2_grpc.py"
MYPY_OPT_OUT = b"# mypy: ignore-errors\n"
REPO_ROOT = Path(__file__).resolve().parent.parent


class GenerateError(RuntimeError):
    """protoc failed; the message carries its exit status."""


def _run_protoc(root: Path, out_dir: Path) -> None:
    # Imported here so that importing this module (e.g. for OUTPUTS) stays cheap.
    from grpc_tools import protoc

    # The well-known types (google/protobuf/*.proto) ship inside grpc_tools.
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{root}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--pyi_out={out_dir}",
        str(root / PROTO),
    ]
    status = protoc.main(args)
    if status != 0:
        raise GenerateError(f"protoc failed with status {status} on {root / PROTO}; see its message above")


def _fresh_outputs(root: Path) -> dict[str, bytes]:
    """Run protoc into a temporary folder and return each output's bytes."""
    with tempfile.TemporaryDirectory(prefix="parle-protoc-") as tmp:
        _run_protoc(root, Path(tmp))
        outputs = {rel: (Path(tmp) / rel).read_bytes() for rel in OUTPUTS}
    # The grpc plugin writes untyped code and no stub; mypy's `exclude` does not stop it from checking
    # a module that is imported, so the module opts out of checking itself.
    outputs[GRPC_MODULE] = MYPY_OPT_OUT + outputs[GRPC_MODULE]
    return outputs


def stale_outputs(root: Path = REPO_ROOT) -> list[str]:
    """Outputs that are missing or differ from what protoc would generate now."""
    fresh = _fresh_outputs(root)
    stale = []
    for rel, data in fresh.items():
        path = root / rel
        if not path.is_file() or path.read_bytes() != data:
            stale.append(rel)
    return stale


def generate(root: Path = REPO_ROOT) -> list[str]:
    """Regenerate the stubs under ``root``; returns the outputs that changed (empty when current)."""
    changed = []
    for rel, data in _fresh_outputs(root).items():
        path = root / rel
        if path.is_file() and path.read_bytes() == data:
            continue
        # Write then rename, so a concurrent import never sees half a file.
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_bytes(data)
        tmp.replace(path)
        changed.append(rel)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protos.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if stubs are stale")
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="repository root (default: %(default)s)")
    args = parser.parse_args(argv)
    root: Path = args.root.resolve()
    try:
        if args.check:
            stale = stale_outputs(root)
            if stale:
                print(f"stale gRPC stubs: {', '.join(stale)}; run: python -m protos.generate", file=sys.stderr)
                return 1
            return 0
        changed = generate(root)
    except GenerateError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"generated {', '.join(changed)}" if changed else "gRPC stubs are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
