"""Batch builders for the store tests: engine-like outputs in numpy (no torch, so child processes start fast)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.store.schemas import BLOCKS
from pipeline.store.zarr_store import MapLayout

LAYOUT = MapLayout(model="test_vit", n_blocks=3, grid=(4, 5), channels=8, prefix_tokens=1)


def build_batch(keys: list[str], seed: int, layout: MapLayout = LAYOUT) -> dict:
    """``UnitWriter.write_batch`` arguments: ReLU'd block maps, their cumsum, coefficients, explainer maps,
    sample columns and statistics."""
    rng = np.random.default_rng(seed)
    n, n_blocks, (h, w), c = len(keys), layout.n_blocks, layout.grid, layout.channels
    block_maps = np.maximum(rng.standard_normal((n, n_blocks, h, w)), 0).astype(np.float32)
    stats = {
        f.name: rng.integers(0, h, (n, n_blocks)) if str(f.type) == "int16" else rng.random((n, n_blocks))
        for f in BLOCKS
        if f.name not in ("key", "unit", "block")
    }
    columns = {
        "label": [i % 3 for i in range(n)],
        "predicted": [i % 2 for i in range(n)],
        "score": [0.5] * n,
        "target": [i % 2 for i in range(n)],
        "width": [64] * n,
        "height": [48] * n,
        "n_boxes": [0] * n,
    }
    arrays = {
        "block_maps": block_maps,
        "daam": block_maps.cumsum(1),
        "coefficients": rng.standard_normal((n, n_blocks, c)).astype(np.float32),
        "rollout": block_maps / 2,
        "attention": block_maps / 3,
        "gae": block_maps / 5,
        "gradcam": block_maps[:, -1],
        "attnlrp": block_maps - 0.5,  # LRP relevance is signed
        "attnlrp_input": block_maps[:, 0] - 0.5,
        "cplrp": 0.5 - block_maps,
        "cplrp_input": 0.5 - block_maps[:, 0],
    }
    return {"keys": keys, "arrays": arrays, "columns": columns, "block_stats": stats}


@pytest.fixture
def layout() -> MapLayout:
    return LAYOUT


@pytest.fixture
def make_batch():
    """:func:`build_batch`; child processes load it with ``runpy.run_path`` on this file."""
    return build_batch
