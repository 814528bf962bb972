"""Batch builders for the store tests: engine-like outputs in numpy (no torch, so child processes start fast)."""

from __future__ import annotations

import numpy as np
import pytest
from fakes import Sample, failed_samples

from pipeline.store.schemas import BLOCKS
from pipeline.store.unit_writer import ExplainedBatch
from pipeline.store.zarr_store import MapLayout

LAYOUT = MapLayout(model="test_vit", n_blocks=3, grid=(4, 5), channels=8, prefix_tokens=1)


def build_batch(keys: list[str], seed: int, layout: MapLayout = LAYOUT) -> dict:
    """``UnitWriter.write_explained`` arguments: samples, and a result of ReLU'd block maps, their cumsum,
    coefficients, explainer maps and statistics."""
    rng = np.random.default_rng(seed)
    n, n_blocks, (h, w), c = len(keys), layout.n_blocks, layout.grid, layout.channels
    block_maps = np.maximum(rng.standard_normal((n, n_blocks, h, w)), 0).astype(np.float32)
    stats = {
        f.name: rng.integers(0, h, (n, n_blocks)) if str(f.type) == "int16" else rng.random((n, n_blocks))
        for f in BLOCKS
        if f.name not in ("key", "unit", "block")
    }
    samples = [Sample(key, label=i % 3) for i, key in enumerate(keys)]
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
    result = ExplainedBatch(
        arrays=arrays,
        predicted=np.arange(n) % 2,
        score=np.full(n, 0.5, np.float32),
        target=np.arange(n) % 2,
        block_stats=stats,
    )
    return {"samples": samples, "result": result}


@pytest.fixture
def layout() -> MapLayout:
    return LAYOUT


@pytest.fixture
def make_batch():
    """:func:`build_batch`; child processes load it with ``runpy.run_path`` on this file."""
    return build_batch


@pytest.fixture
def make_failed():
    """:func:`failed_samples`."""
    return failed_samples
