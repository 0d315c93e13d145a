"""Every example job in examples/ is a valid spec (what a newcomer copies first)."""

from __future__ import annotations

from pathlib import Path

import pytest

from protos.spec import load_spec

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_resolves(path: Path) -> None:
    spec = load_spec(path)
    assert spec.name and spec.epochs > 0


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 5
