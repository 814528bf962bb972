"""Compaction: per-unit tables merged into tables/, read the same before, during and after, and kept correct when
units are redone after it."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections import Counter

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from builders import write_with_statistics
from click.testing import CliRunner
from fakes import failed_samples

from pipeline.cli import main
from pipeline.errors import OutputLookupError, SampleNotFoundError
from pipeline.names import METRIC_COLUMNS
from pipeline.store.compact import MANIFEST, compact, read_manifest
from pipeline.store.lease import Lease
from pipeline.store.output import as_output
from pipeline.store.results import open_results
from pipeline.store.schemas import EXPLAINER_BLOCKS
from pipeline.store.unit_writer import UnitWriter
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
    (path,) = manifest.key_index  # one file: fewer keys than a file holds
    assert manifest.key_index_starts == ("a0",)
    index = pq.read_table(out / path).to_pandas()
    assert index["key"].tolist() == ["a0", "a1", "b0", "b1", "b2", "c0"]  # ok samples only, sorted by key
    assert index.loc[index.key == "b2", "row"].item() == 2


def test_the_key_index_in_small_files_finds_every_key_in_one_of_them(written, layout, make_batch):
    out, batches = written
    write_with_statistics(out, "shard-000003", layout, make_batch, ["b1", "b3"], seed=9)  # b1: in two units
    before = open_results(out).locate(["a0", "a1", "b0", "b1", "b2", "b3", "c0"])
    compact(out, keys_per_file=2)
    manifest = read_manifest(out)
    files = [pq.read_table(out / path).to_pandas() for path in manifest.key_index]
    assert [f["key"].tolist() for f in files] == [["a0", "a1"], ["b0", "b1", "b1"], ["b2", "b3"], ["c0"]]
    assert list(manifest.key_index_starts) == ["a0", "b0", "b2", "c0"]  # a key's rows never split across files
    results = open_results(out)
    after = results.locate(["a0", "a1", "b0", "b1", "b2", "b3", "c0"])
    pd.testing.assert_frame_equal(
        after.sort_values(["key", "unit"]).reset_index(drop=True),
        before.sort_values(["key", "unit"]).reset_index(drop=True),
    )
    assert sorted(after.loc[after.key == "b1", "unit"]) == ["shard-000001", "shard-000003"]
    np.testing.assert_allclose(results.maps("b2").daam, batches["shard-000001"]["result"].arrays["daam"][2], rtol=1e-3)


def test_a_manifest_of_an_earlier_version_with_one_key_index_file_still_reads(written):
    out, _ = written
    compact(out, keys_per_file=2)
    manifest = json.loads((out / MANIFEST).read_text())
    merged = pa.concat_tables([pq.read_table(out / path) for path in manifest["key_index"]])
    pq.write_table(merged, out / "tables" / "key_index-00001.parquet")
    manifest["key_index"] = "tables/key_index-00001.parquet"  # as compactions before the files were split wrote it
    del manifest["key_index_starts"]
    (out / MANIFEST).write_text(json.dumps(manifest))
    results = open_results(out)
    assert results.locate(["b2", "c0"]).sort_values("key")[["unit", "row"]].values.tolist() == [
        ["shard-000001", 2],
        ["shard-000002", 0],
    ]
    compact(out)  # the next compaction replaces it; the one after removes it (kept for readers meanwhile)
    assert (out / "tables" / "key_index-00001.parquet").exists()
    compact(out)
    assert not (out / "tables" / "key_index-00001.parquet").exists()
    assert results.maps("a1").key == "a1"


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
    # generation 1's files stay for readers that read its manifest; the next compaction removes them
    assert sorted(p.name for p in (out / "tables" / "samples").iterdir()) == [
        "part-00001-00000.parquet",
        "part-00002-00000.parquet",
    ]
    assert compact(out).generation == 3
    assert sorted(p.name for p in (out / "tables" / "samples").iterdir()) == [
        "part-00002-00000.parquet",
        "part-00003-00000.parquet",
    ]
    assert_same(tables(out), before)


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


def write_every_table(out, unit, layout, make_batch, keys, seed):
    """A committed unit with every table: samples (one failed sample too), blocks, evaluation, explainer_blocks."""
    batch = make_batch(keys, seed=seed)
    rng = np.random.default_rng(seed)
    n, blocks = len(keys), layout.n_blocks
    stats = {
        field.name: rng.integers(0, 4, (n, blocks)) if pa.types.is_integer(field.type) else rng.random((n, blocks))
        for field in EXPLAINER_BLOCKS
        if field.name not in ("key", "unit", "explainer", "block")
    }
    evaluation = {method: {m: rng.random(n) for m in METRIC_COLUMNS} for method in ("daam", "random")}
    batch["result"] = dataclasses.replace(
        batch["result"], explainer_block_stats={"rollout": stats}, evaluation=evaluation
    )
    writer = UnitWriter(out, unit, layout, shard=f"s3://b/{unit}.tar", job="demo")
    writer.write_explained(**batch)
    writer.write_failed(failed_samples([f"{unit}-bad"], size=(7, None)))
    writer.commit()


@pytest.mark.timeout(600)
def test_readers_never_fail_nor_lose_rows_while_units_are_committed_and_compacted_many_times(
    tmp_path, layout, make_batch
):
    """Reader threads read every table, one sample's maps and record batches in a loop, while the main thread
    commits a unit and compacts, 8 times: every read holds whole units only, at least those committed before it
    began, none lost from an optional table. Each round sees dozens of reads (60 to 70 on 2 cores), at every step of a
    commit and a compaction, and from the second on the removal of an older generation's files."""
    out = tmp_path / "out"
    committed: dict[str, list[str]] = {}
    per_unit = {"samples": 4, "blocks": 3 * layout.n_blocks, "evaluation": 6, "explainer_blocks": 3 * layout.n_blocks}

    def commit(i: int) -> None:
        unit, keys = f"shard-{i:06d}", [f"k{i:03d}_{j}" for j in range(3)]
        write_every_table(out, unit, layout, make_batch, keys, seed=i)
        committed[unit] = keys

    for i in range(4):
        commit(i)
    compact(out)
    failures: list[str] = []
    reads: Counter = Counter()
    stop = threading.Event()
    kept = open_results(out)  # a Results kept across compactions, with its committed units listed once

    def check(table: str, frame: pd.DataFrame, before: set[str]) -> None:
        counts = frame.groupby("unit").size()
        assert before <= set(counts.index) <= set(committed), f"{table}: units {sorted(counts.index)}"
        assert (counts == per_unit[table]).all(), f"{table}: rows per unit {counts.to_dict()}"
        assert frame["unit"].is_monotonic_increasing

    def reader(table: str) -> None:
        while not stop.is_set():
            before = set(committed)
            try:
                if table == "maps":
                    unit = sorted(before)[reads[table] % len(before)]
                    maps = open_results(out).maps(committed[unit][1])
                    assert maps.unit == unit and maps.daam.shape == (layout.n_blocks, *layout.grid)
                elif table == "batches":
                    batches = list(open_results(out).batches("blocks", batch_size=7))
                    check("blocks", pa.Table.from_batches(batches).to_pandas(), before)
                elif table == "kept":
                    check("samples", kept.read("samples"), set(kept.units) & before)
                else:
                    check(table, open_results(out).read(table), before)
            except Exception as e:
                failures.append(f"{table}: {type(e).__name__}: {e}")
            reads[table] += 1

    threads = [
        threading.Thread(target=reader, args=(table,), daemon=True) for table in (*per_unit, "maps", "batches", "kept")
    ]
    for thread in threads:
        thread.start()
    for i in range(4, 12):
        commit(i)
        compact(out)
    stop.set()
    for thread in threads:
        thread.join(timeout=120)
    assert failures == [], "\n".join(failures)
    assert min(reads.values()) >= 3, reads
    assert read_manifest(out).generation == 9


def test_a_compaction_whose_lease_was_taken_changes_nothing(written):
    from pipeline.errors import LeaseLostError

    out, _ = written
    before = tables(out)
    first = Lease(as_output(out), 600)
    first.acquire()
    second = Lease(as_output(out), 600, break_lease=True)
    second.acquire()
    with pytest.raises(LeaseLostError, match=r"lost its lease \(generation 1\)"):
        compact(out, fence=first.fence())
    assert not (out / MANIFEST).exists() and len(list((out / "samples").glob("*.parquet"))) == 3
    assert_same(tables(out), before)
    first.release()
    second.release()
