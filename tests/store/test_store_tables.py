"""The Arrow schemas against the committed schemas/ JSON, table validation and the writer's columns."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fakes import failed_samples

from pipeline.errors import SchemaError
from pipeline.store.schemas import BLOCKS, SAMPLES, SCHEMAS_DIR, TABLE_SCHEMAS
from pipeline.store.tables import build_table, parquet_bytes, validate_table
from pipeline.store.unit_writer import UnitWriter


def schema_file(name: str) -> dict:
    """A committed (exported) JSON file of schemas/."""
    return json.loads((SCHEMAS_DIR / name).read_text())


def sample_columns(n: int = 2) -> dict:
    return {
        "key": [f"k{i}" for i in range(n)],
        "shard": ["s3://bucket/shard-000000.tar"] * n,
        "unit": ["shard-000000"] * n,
        "label": [1, None][:n],
        "predicted": np.array([3, 4])[:n],
        "score": [0.9, 0.1][:n],
        "target": [3, None][:n],
        "status": ["ok", "failed"][:n],
        "error": [None, "DecodeError: truncated"][:n],
        "row": [0, None][:n],
        "width": [10, None][:n],
        "height": [20, None][:n],
        "n_boxes": [0, None][:n],
        "model": ["vit"] * n,
        "job": ["demo"] * n,
    }


def test_schemas_match_committed_files_with_descriptions():
    for name, schema in TABLE_SCHEMAS.items():
        spec = schema_file(f"{name}.schema.json")
        assert schema.names == [f["name"] for f in spec["fields"]]
        for field, f in zip(schema, spec["fields"], strict=True):
            assert field.type == pa.type_for_alias(f["type"]) and field.nullable == f["nullable"]
            assert field.metadata[b"description"].decode() == f["description"]
        assert schema.metadata[b"version"] == b"1"
    assert SAMPLES.field("label").type == pa.int32()
    assert BLOCKS.field("block").type == pa.int16()


def test_build_table_converts_and_round_trips():
    table = build_table(sample_columns(), SAMPLES)
    back = pq.read_table(io.BytesIO(parquet_bytes(table, SAMPLES)))
    assert back.schema.equals(SAMPLES)
    assert back.column("label").to_pylist() == [1, None]
    assert back.column("predicted").type == pa.int32()


@pytest.mark.parametrize(
    ("change", "column"),
    [
        ({"drop": "score"}, "score"),  # missing
        ({"add": ("extra_col", [1, 2])}, "extra_col"),  # extra
        ({"set": ("score", ["high", "low"])}, "score"),  # mistyped
        ({"set": ("row", [0.5, None])}, "row"),  # not an integer
        ({"set": ("row", [2**40, None])}, "row"),  # out of range
        ({"set": ("key", [1, 2])}, "key"),  # integers for strings
        ({"set": ("key", ["k0", None])}, "key"),  # null in a non-nullable column
        ({"set": ("status", ["ok", "maybe"])}, "status"),  # outside the enum
    ],
)
def test_build_table_rejects_drift(change, column):
    columns = sample_columns()
    if "drop" in change:
        del columns[change["drop"]]
    name, values = change.get("add") or change.get("set") or (None, None)
    if name:
        columns[name] = values
    with pytest.raises(SchemaError, match=column):
        build_table(columns, SAMPLES)


def test_validate_table_rejects_mistyped_and_reordered():
    table = build_table(sample_columns(), SAMPLES)
    wrong = table.set_column(4, "predicted", pa.array([3, 4], pa.int64()))
    with pytest.raises(SchemaError, match="'predicted' has type int64"):
        validate_table(wrong, SAMPLES)
    with pytest.raises(SchemaError, match="order"):
        validate_table(table.select(list(reversed(table.column_names))), SAMPLES)
    with pytest.raises(SchemaError, match="'predicted'"):
        parquet_bytes(wrong, SAMPLES)


def test_writer_rejects_drifted_rows_and_statistics(tmp_path, layout, make_batch):
    writer = UnitWriter(tmp_path, "shard-000000", layout, shard="a.tar", job="j")

    def attempt(edit):
        batch = make_batch(["a", "b"], seed=0)
        edit(batch)
        writer.write_explained(**batch)

    with pytest.raises(SchemaError, match="1 values of 'predicted' for 2 keys"):
        attempt(lambda b: b.update(result=dataclasses.replace(b["result"], predicted=np.array([1]))))
    with pytest.raises(SchemaError, match="3 values of 'score' for 2 keys"):
        attempt(lambda b: b.update(result=dataclasses.replace(b["result"], score=np.zeros(3, np.float32))))
    with pytest.raises(SchemaError, match="daam_spread"):
        attempt(lambda b: b["result"].block_stats.pop("daam_spread"))
    with pytest.raises(SchemaError, match="map_novel"):
        attempt(lambda b: b["result"].block_stats.update(map_novel=np.zeros((2, 3))))
    with pytest.raises(SchemaError, match="'coef_l1' has shape"):
        attempt(lambda b: b["result"].block_stats.update(coef_l1=np.zeros((2, 4))))
    with pytest.raises(SchemaError, match="'daam' has shape"):
        attempt(lambda b: b["result"].arrays.update(daam=np.zeros((2, 3, 5, 4), np.float32)))
    assert writer.commit()["samples"] == 0  # nothing of the rejected batches was kept


def test_writer_columns_equal_schema_files(tmp_path, layout, make_batch):
    writer = UnitWriter(tmp_path, "shard-000000", layout, shard="a.tar", job="j")
    writer.write_explained(**make_batch(["a", "b"], seed=0))
    writer.write_failed(failed_samples(["c"], "DecodeError: bad"))
    writer.commit()
    for kind in ("samples", "blocks"):
        written = pq.read_schema(tmp_path / kind / "shard-000000.parquet")
        spec = schema_file(f"{kind}.schema.json")["fields"]
        assert [(f.name, str(f.type), f.nullable) for f in written] == [
            (f["name"], str(pa.type_for_alias(f["type"])), f["nullable"]) for f in spec
        ]
