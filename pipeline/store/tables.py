"""The Parquet tables ``samples`` and ``blocks``: their Arrow schemas (``schemas/*.schema.json``), building and
validating tables against them, and Parquet encoding.

A table that does not match its schema exactly (missing, extra or mistyped column, null in a non-nullable column,
value outside a column's ``enum``) raises :class:`~pipeline.errors.SchemaError` naming the column. Placing the
encoded files atomically under ``OUT/`` is :mod:`pipeline.store.commit`'s job.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import SchemaError

__all__ = [
    "blocks_schema",
    "build_table",
    "evaluation_schema",
    "explainer_blocks_schema",
    "load_json_schema",
    "parquet_bytes",
    "samples_schema",
    "schema_dir",
    "validate_table",
]

_PACKAGE = Path(__file__).resolve().parents[1]
_SCHEMA_DIRS = (_PACKAGE / "schemas", _PACKAGE.parent / "schemas")  # package data, then a source checkout


def schema_dir() -> Path:
    """The ``schemas/`` folder: inside the installed package, or next to it in a source checkout."""
    for folder in _SCHEMA_DIRS:
        if (folder / "samples.schema.json").is_file():
            return folder
    raise SchemaError(f"schemas/ not found; looked in {', '.join(map(str, _SCHEMA_DIRS))}")


@cache
def load_json_schema(name: str) -> dict[str, Any]:
    """The parsed ``schemas/<name>`` file, e.g. ``"zarr_layout.json"``."""
    path = schema_dir() / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SchemaError(f"cannot read schema file {path}: {e}") from e


def samples_schema() -> pa.Schema:
    """Arrow schema of the samples table, with each field's description (and enum) as field metadata."""
    return _arrow_schema("samples.schema.json")


def evaluation_schema() -> pa.Schema:
    """Arrow schema of the evaluation table (one row per sample and evaluated method)."""
    return _arrow_schema("evaluation.schema.json")


def explainer_blocks_schema() -> pa.Schema:
    """Arrow schema of the comparison explainers' per-block statistics."""
    return _arrow_schema("explainer_blocks.schema.json")


def blocks_schema() -> pa.Schema:
    """Arrow schema of the blocks table, with each field's description as field metadata."""
    return _arrow_schema("blocks.schema.json")


@cache
def _arrow_schema(name: str) -> pa.Schema:
    doc = load_json_schema(name)
    fields = []
    for spec in doc["fields"]:
        metadata = {"description": spec["description"]}
        if "enum" in spec:
            metadata["enum"] = json.dumps(spec["enum"])
        fields.append(pa.field(spec["name"], pa.type_for_alias(spec["type"]), spec["nullable"], metadata))
    return pa.schema(fields, metadata={"name": doc["name"], "version": str(doc["version"])})


def build_table(columns: Mapping[str, Any], schema: pa.Schema) -> pa.Table:
    """A table of ``schema`` from one array-like per column.

    Values convert only within their kind and without loss of range: integers to any integer or float type
    that holds them, floats to floats, strings to strings, booleans to booleans; None is null.

    Args:
        columns: Column name -> sequence or numpy array; exactly the schema's columns.
        schema: From :func:`samples_schema` or :func:`blocks_schema`.

    Raises:
        SchemaError: a missing or extra column, or values that do not convert to the column's type.
    """
    _check_names(list(columns), schema, ordered=False)
    arrays = []
    for field in schema:
        try:
            array = pa.array(columns[field.name])
            if not _convertible(array.type, field.type):
                raise TypeError(f"values of type {array.type}")
            arrays.append(array.cast(field.type, safe=True))
        except (pa.ArrowException, TypeError, ValueError) as e:
            raise SchemaError(f"{_name(schema)} column {field.name!r} does not convert to {field.type}: {e}") from e
    table = pa.Table.from_arrays(arrays, schema=schema)
    validate_table(table, schema)
    return table


def validate_table(table: pa.Table, schema: pa.Schema) -> None:
    """Check that ``table`` matches ``schema`` exactly: names, order, types, nulls and enums.

    Raises:
        SchemaError: naming the first offending column.
    """
    _check_names(table.column_names, schema, ordered=True)
    for field in schema:
        column = table.column(field.name)
        if column.type != field.type:
            raise SchemaError(f"{_name(schema)} column {field.name!r} has type {column.type}, expected {field.type}")
        if not field.nullable and column.null_count:
            raise SchemaError(f"{_name(schema)} column {field.name!r} has {column.null_count} nulls")
        if field.metadata and b"enum" in field.metadata:
            allowed = json.loads(field.metadata[b"enum"])
            bad = pc.filter(column, pc.invert(pc.is_in(column, pa.array(allowed, type=field.type))))
            if len(bad):
                raise SchemaError(f"{_name(schema)} column {field.name!r} has {bad[0]!r}, expected one of {allowed}")


def parquet_bytes(table: pa.Table, schema: pa.Schema, *, compression: str = "zstd") -> bytes:
    """``table`` validated against ``schema`` and encoded as a Parquet file.

    Raises:
        SchemaError: the table does not match the schema.
    """
    validate_table(table, schema)
    sink = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(schema.metadata), sink, compression=compression)
    return sink.getvalue()


def _convertible(source: pa.DataType, target: pa.DataType) -> bool:
    if pa.types.is_null(source) or source == target:
        return True
    if pa.types.is_integer(target):
        return pa.types.is_integer(source)
    if pa.types.is_floating(target):
        return pa.types.is_integer(source) or pa.types.is_floating(source)
    if pa.types.is_string(target):
        return pa.types.is_large_string(source) or pa.types.is_string_view(source)
    return False


def _check_names(names: list[str], schema: pa.Schema, *, ordered: bool) -> None:
    missing = [n for n in schema.names if n not in names]
    extra = [n for n in names if n not in schema.names]
    if missing or extra:
        raise SchemaError(f"{_name(schema)} table: missing columns {missing}, extra columns {extra}")
    if ordered and names != schema.names:
        raise SchemaError(f"{_name(schema)} table: columns in order {names}, expected {schema.names}")


def _name(schema: pa.Schema) -> str:
    return (schema.metadata or {}).get(b"name", b"?").decode()
