"""Fixtures shared across the suite."""

from __future__ import annotations

import compileall
from pathlib import Path

import pytest
from builders import make_shards

import pipeline


def pytest_sessionstart(session: pytest.Session) -> None:
    """The package's bytecode, written once. The suite starts dozens of interpreters (Ray actors, CLI drivers,
    benchmark children); where ``PYTHONDONTWRITEBYTECODE`` is set, each would compile every module of the package
    again (0.4 s each here)."""
    compileall.compile_dir(Path(pipeline.__file__).parent, quiet=1)


@pytest.fixture
def tiny_shards(tmp_path: Path) -> list[str]:
    """Four shards of six samples; sample 2 of shard 1 is corrupt."""
    return make_shards(tmp_path / "shards", corrupt={1: (2,)})
