"""Fixtures shared across the suite."""

from __future__ import annotations

from pathlib import Path

import pytest
from builders import make_shards


@pytest.fixture
def tiny_shards(tmp_path: Path) -> list[str]:
    """Four shards of six samples; sample 2 of shard 1 is corrupt."""
    return make_shards(tmp_path / "shards", corrupt={1: (2,)})
