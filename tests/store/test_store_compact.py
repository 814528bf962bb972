"""Compaction: per-unit tables merged into tables/, read the same before, during and after, and kept correct when
units are redone after it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from builders import write_with_statistics
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.errors import OutputLookupError, SampleNotFoundError
from pipeline.store.compact import MANIFEST, compact, read_manifest
from pipeline.store.lease import Lease
from pipeline.store.output import as_output
from pipeline.store.results import open_results
from pipeline.store.units import EXPLAIN_PARTS, UnitTransaction

UNITS = {"shard-000000": ["a0", "a1"], "shard-000001": ["b0", "b1", "b2"], "shard-000002": ["c0"]}


@pytest.fixture
def written(tmp_path, layout, make_batch):
    batches = {
        unit: write_with_statistics(tmp_path, unit, layout, make_batch, keys, seed=i, failed=[f"{unit}-bad"])
        for i, (unit, keys) in enumerate(UNITS.items())
    }
    return tmp_path, batches


def tables(out) -> dict[str, pd.DataFrame]:
    results = open_results(out)
    return {"samples": results.samples, "blocks": results.blocks, "explainer_blocks": results.explainer_blocks}


def assert_same(left: dict[str, pd.DataFrame], right: dict[str, pd.DataFrame]) -> None:
    for name in left:
        pd.testing.assert_frame_equal(left[name].reset_index(drop=True), right[name].reset_index(drop=True))


def test_compaction_merges_every_table_and_reads_the_same(written):
    out, _ = written
    before = tables(out)
    maps_before = open_results(out).maps("b2")
    done = compact(out, units_per_file=2)
    assert (done.generation, done.units, done.merged_files) == (1, 3, 6)  # samples and blocks of 3 units
    assert not list((out / "samples").glob("*.parquet")) and not list((out / "blocks").glob("*.parquet"))
    manifest = read_manifest(out)
    assert manifest.files["samples"] == [
        "tables/samples/part-00001-00000.parquet",
        "tables/samples/part-00001-00001.parquet",
    ]
    first = pq.ParquetFile(out / manifest.files["blocks"][0])
    assert first.schema_arrow.metadata[b"name"] == b"blocks"
    assert_same(tables(out), before)
    after = open_results(out).maps("b2")
    np.testing.assert_array_equal(after.daam, maps_before.daam)
    index = pq.read_table(out / manifest.key_index).to_pandas()
    assert index["key"].tolist() == ["a0", "a1", "b0", "b1", "b2", "c0"]  # ok samples only, sorted by key
    assert index.loc[index.key == "b2", "row"].item() == 2


def test_a_unit_redone_after_compaction_is_read_from_its_new_files(written, layout, make_batch):
    out, _ = written
    compact(out)
    redone = write_with_statistics(out, "shard-000001", layout, make_batch, ["b0", "b9"], seed=7)
    results = open_results(out)
    assert results.samples.query("unit == 'shard-000001'")["key"].tolist() == ["b0", "b9"]
    assert len(results.blocks.query("unit == 'shard-000001'")) == 2 * layout.n_blocks
    np.testing.assert_allclose(results.maps("b9").daam, redone["result"].arrays["daam"][1], rtol=1e-3)
    with pytest.raises(SampleNotFoundError, match="no ok sample"):
        results.maps("b2")  # the old attempt's rows are gone with it
    before = tables(out)
    assert compact(out).generation == 2
    assert_same(tables(out), before)
    assert sorted(p.name for p in (out / "tables" / "samples").iterdir()) == ["part-00002-00000.parquet"]


def test_a_unit_being_redone_is_not_read_from_the_compacted_files(written):
    out, _ = written
    compact(out)
    UnitTransaction(out, EXPLAIN_PARTS, "shard-000000")  # a new attempt started: markers and parts removed
    results = open_results(out)
    assert results.units == ["shard-000001", "shard-000002"]
    assert set(results.samples["unit"]) == {"shard-000001", "shard-000002"}
    assert set(results.blocks["unit"]) == {"shard-000001", "shard-000002"}
    with pytest.raises(SampleNotFoundError, match="no ok sample with key 'a0'"):
        results.maps("a0")


def test_a_compaction_cut_short_before_its_manifest_changes_nothing(written):
    out, _ = written
    before = tables(out)
    stray = out / "tables" / "samples" / "part-00001-00000.parquet"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"not parquet: a compaction killed mid-write")
    assert not (out / MANIFEST).exists()
    assert_same(tables(out), before)
    compact(out)
    assert_same(tables(out), before)
    assert pq.read_table(stray).num_rows == 9  # 6 ok and 3 failed samples, rewritten by the next compaction


def test_columns_filters_dataset_and_bulk_maps(written):
    out, batches = written
    compact(out)
    results = open_results(out)
    last = results.read("blocks", columns=["key", "block", "daam_entropy"], filters=[("block", "==", 2)])
    assert list(last.columns) == ["key", "block", "daam_entropy"] and last["key"].tolist() == UNITS_OK
    assert results.read("samples", filters=pc.field("status") == "failed")["key"].str.endswith("-bad").all()
    assert results.dataset("blocks").count_rows() == 6 * 3
    stacked = results.maps_of(["c0", "a1", "b0"])
    np.testing.assert_allclose(stacked["daam"][0], batches["shard-000002"]["result"].arrays["daam"][0], rtol=1e-3)
    np.testing.assert_allclose(stacked["daam"][1], batches["shard-000000"]["result"].arrays["daam"][1], rtol=1e-3)
    assert stacked["coefficients"].shape == (3, 3, 8)
    with pytest.raises(SampleNotFoundError, match="shard-000000-bad"):
        results.maps_of(["a0", "shard-000000-bad"])
    units = list(results.iter_units())
    assert [(unit, keys) for unit, keys, _ in units] == [(u, k) for u, k in UNITS.items()]
    np.testing.assert_array_equal(units[1][2]["daam"], results.maps_of(UNITS["shard-000001"])["daam"])


UNITS_OK = [key for keys in UNITS.values() for key in keys]


def test_the_compact_command_takes_the_lease(written):
    out, _ = written
    with Lease(as_output(out), 30):
        held = CliRunner().invoke(main, ["compact", str(out)])
    assert held.exit_code == 2 and "lease" in held.output, held.output
    assert not (out / MANIFEST).exists()
    result = CliRunner().invoke(main, ["compact", str(out)])
    assert result.exit_code == 0, result.output
    assert "compacted the tables of 3 units" in result.output and "6 per-unit files merged" in result.output


def test_a_unit_as_an_xarray_dataset(written):
    pytest.importorskip("xarray")
    out, _ = written
    results = open_results(out)
    dataset = results.xarray("shard-000001")
    assert (
        dataset.daam.dims == ("sample", "block", "row", "col") and list(dataset.sample.values) == UNITS["shard-000001"]
    )
    np.testing.assert_array_equal(dataset.daam.sel(sample="b2").values, results.maps("b2").daam)
    assert dataset.coefficients.dims == ("sample", "block", "channel")
    with pytest.raises(OutputLookupError, match="no committed unit"):
        results.xarray("shard-000009")
