"""open_results: tables and maps of committed units, read back as written."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from builders import write_with_statistics

from pipeline.errors import AmbiguousSampleError, SampleNotFoundError, StoreError
from pipeline.store.results import open_results
from pipeline.store.schemas import BLOCKS, SAMPLES


def test_round_trip(tmp_path, layout, make_batch):
    a = write_with_statistics(tmp_path, "shard-000000", layout, make_batch, ["a0", "a1"], seed=0)
    b = write_with_statistics(tmp_path, "shard-000001", layout, make_batch, ["b0", "b1", "b2"], 1, failed=["bx"])
    results = open_results(f"file://{tmp_path}")
    assert results.units == ["shard-000000", "shard-000001"]
    assert results.attrs["model"] == "test_vit" and results.attrs["dtype"] == "float16"

    samples = results.samples
    assert list(samples.columns) == SAMPLES.names
    assert samples["key"].tolist() == ["a0", "a1", "b0", "b1", "b2", "bx"]
    assert samples["status"].tolist() == ["ok"] * 5 + ["failed"]
    assert samples["row"].tolist()[:5] == [0, 1, 0, 1, 2] and samples["row"].isna().tolist()[5]
    assert samples["shard"].iloc[0] == "s3://b/shard-000000.tar" and set(samples["job"]) == {"demo"}
    failed = samples.iloc[5]
    assert failed["error"] == "DecodeError: truncated" and failed["width"] == 7 and pd.isna(failed["predicted"])
    assert samples["label"].tolist()[:3] == [0, 1, 0] and samples["score"].dtype == np.float32

    blocks = results.blocks
    assert list(blocks.columns) == BLOCKS.names and len(blocks) == 5 * layout.n_blocks
    assert blocks["block"].tolist()[:6] == [0, 1, 2, 0, 1, 2]
    for name in ("map_entropy", "daam_iou_final", "coef_l1", "daam_peak_row"):
        expected = np.concatenate(
            [a["result"].block_stats[name].reshape(-1), b["result"].block_stats[name].reshape(-1)]
        )
        np.testing.assert_array_equal(blocks[name].to_numpy(dtype=expected.dtype, na_value=np.nan), expected)

    maps = results.maps("b2")
    assert (maps.unit, maps.row) == ("shard-000001", 2)
    for name in ("block_maps", "daam", "coefficients"):
        original = b["result"].arrays[name][2]
        np.testing.assert_allclose(getattr(maps, name), original, atol=1e-3 * np.abs(original).max())


def test_maps_lookup_errors(tmp_path, layout, make_batch):
    write_with_statistics(tmp_path, "shard-000000", layout, make_batch, ["same", "x"], 0, failed=["broken"])
    second = write_with_statistics(tmp_path, "shard-000001", layout, make_batch, ["same"], seed=1)
    results = open_results(tmp_path)
    with pytest.raises(AmbiguousSampleError, match=r"shard-000000', 'shard-000001'.*unit='shard-000000'"):
        results.maps("same")
    np.testing.assert_allclose(
        results.maps("same", unit="shard-000001").daam, second["result"].arrays["daam"][0], rtol=1e-3
    )
    for key in ("broken", "missing"):
        with pytest.raises(SampleNotFoundError, match="no ok sample"):
            results.maps(key)


def test_empty_and_missing_outputs(tmp_path):
    with pytest.raises(StoreError, match="no pipeline output"):
        open_results(tmp_path / "absent")
    results = open_results(tmp_path)
    assert results.units == [] and results.attrs == {}
    assert results.samples.empty and list(results.samples.columns) == SAMPLES.names
    assert results.blocks.empty and list(results.blocks.columns) == BLOCKS.names
