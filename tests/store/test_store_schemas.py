"""The contracts defined in pipeline/store/schemas.py: the committed schemas/ JSON is their export, they describe
what the JSON described before, written Parquet files carry them, and `daam-pipeline schemas [--check]`."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.names import MAP_ARRAYS
from pipeline.store.schemas import (
    BLOCKS,
    EVALUATION,
    EXPLAINER_BLOCKS,
    SAMPLES,
    SANITY,
    SCHEMAS_DIR,
    TABLE_SCHEMAS,
    ZARR_LAYOUT,
    export_schemas,
    render_schemas,
    stale_schemas,
)
from pipeline.store.unit_writer import UnitWriter

FILES = [
    "samples.schema.json",
    "blocks.schema.json",
    "evaluation.schema.json",
    "explainer_blocks.schema.json",
    "sanity.schema.json",
    "zarr_layout.json",
]


def test_committed_files_are_the_export(tmp_path):
    written = export_schemas(tmp_path / "out")
    assert [p.name for p in written] == FILES
    for path in written:
        assert (SCHEMAS_DIR / path.name).read_text() == path.read_text(), "run: daam-pipeline schemas schemas"
    assert stale_schemas(SCHEMAS_DIR) == []
    assert sorted(p.name for p in SCHEMAS_DIR.glob("*.json")) == sorted(FILES)


def test_export_reads_back_as_the_schemas():
    files = render_schemas()
    for name, schema in TABLE_SCHEMAS.items():
        doc = json.loads(files[f"{name}.schema.json"])
        assert (doc["name"], doc["version"]) == (name, 1)
        fields = [
            pa.field(
                f["name"],
                pa.type_for_alias(f["type"]),
                f["nullable"],
                {"description": f["description"], **({"enum": json.dumps(f["enum"])} if "enum" in f else {})},
            )
            for f in doc["fields"]
        ]
        rebuilt = pa.schema(fields, metadata={"name": doc["name"], "version": str(doc["version"])})
        assert rebuilt.equals(schema, check_metadata=True)
    assert json.loads(files["zarr_layout.json"]) == json.loads(json.dumps(ZARR_LAYOUT))


def test_schemas_keep_what_the_json_described():
    assert SAMPLES.metadata == {b"name": b"samples", b"version": b"1"}
    # + perturbation, + segmentation against masks
    assert [len(s) for s in (SAMPLES, BLOCKS, EVALUATION, EXPLAINER_BLOCKS, SANITY)] == [15, 32, 14, 19, 7]
    assert SAMPLES.names[:3] == ["key", "shard", "unit"] and SAMPLES.names[-2:] == ["model", "job"]
    key, label, status, score = (SAMPLES.field(n) for n in ("key", "label", "status", "score"))
    assert (key.type, key.nullable) == (pa.string(), False)
    assert (label.type, label.nullable) == (pa.int32(), True)
    assert (score.type, score.nullable) == (pa.float32(), True)
    assert status.metadata == {
        b"description": b"'ok': maps stored at `row`; 'failed': no maps, see `error`.",
        b"enum": b'["ok", "failed"]',
    }
    assert sum(b"enum" in f.metadata for s in TABLE_SCHEMAS.values() for f in s) == 1
    assert BLOCKS.field("block").type == pa.int16() and BLOCKS.field("map_peak_row").type == pa.int16()
    assert BLOCKS.field("daam_cos_final").type == pa.float32()
    assert not any(f.nullable for s in (BLOCKS, EVALUATION, EXPLAINER_BLOCKS, SANITY) for f in s)
    assert EVALUATION.names == [
        "key",
        "unit",
        "method",
        "pointing_hit",
        "box_energy",
        "mask_pixel_accuracy",
        "mask_miou",
        "mask_ap",
        "deletion_auc",
        "insertion_auc",
        "positive_auc",
        "negative_auc",
        "positive_top1_auc",
        "negative_top1_auc",
    ]
    assert EXPLAINER_BLOCKS.field("explainer").type == pa.string()
    arrays = ZARR_LAYOUT["arrays"]
    assert list(arrays) == ["keys", *MAP_ARRAYS]
    assert arrays["keys"]["dtype"] == "string" and not arrays["keys"]["optional"]
    assert arrays["coefficients"]["dims"] == ("sample", "block", "channel")
    assert arrays["gradcam"]["dims"] == ("sample", "row", "col") and arrays["daam"]["dtype"] == "float32"
    assert ZARR_LAYOUT["version"] == 3 and set(ZARR_LAYOUT["array_attributes"]) == {"significant_bits"}
    assert set(ZARR_LAYOUT["unit_group"]["attributes"]) == {"shard_indexes"}


def test_written_parquet_carries_the_schemas(tmp_path, layout, make_batch):
    writer = UnitWriter(tmp_path, "shard-000000", layout, shard="a.tar", job="j")
    writer.write_explained(**make_batch(["a", "b"], seed=0))
    writer.commit()
    for name in ("samples", "blocks"):
        written = pq.read_schema(tmp_path / name / "shard-000000.parquet")
        assert written.metadata[b"name"] == name.encode() and written.metadata[b"version"] == b"1"
        assert written.equals(TABLE_SCHEMAS[name], check_metadata=True)


def test_cli_writes_and_checks(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["schemas", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES)
    result = runner.invoke(main, ["schemas", str(tmp_path), "--check"])
    assert result.exit_code == 0 and "agree" in result.output, result.output

    edited = tmp_path / "blocks.schema.json"
    edited.write_text(edited.read_text().replace('"int16"', '"int32"', 1))
    (tmp_path / "zarr_layout.json").unlink()
    result = runner.invoke(main, ["schemas", str(tmp_path), "--check"])
    assert result.exit_code == 1, result.output
    assert "blocks.schema.json" in result.output and "zarr_layout.json" in result.output
    assert "samples.schema.json" not in result.output
