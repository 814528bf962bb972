"""The Parquet tables: building and validating tables against their Arrow schemas (:mod:`pipeline.store.schemas`),
and Parquet encoding.

A table that does not match its schema exactly (missing, extra or mistyped column, null in a non-nullable column,
value outside a column's ``enum``) raises :class:`~pipeline.errors.SchemaError` naming the column. Placing the
encoded files atomically under ``OUT/`` is :mod:`pipeline.store.units`' job.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import SchemaError

__all__ = ["build_table", "parquet_bytes", "validate_table"]


def build_table(columns: Mapping[str, Any], schema: pa.Schema) -> pa.Table:
    """A table of ``schema`` from one array-like per column.

    Values convert only within their kind and without loss of range: integers to any integer or float type
    that holds them, floats to floats, strings to strings, booleans to booleans; None is null.

    Args:
        columns: Column name -> sequence or numpy array; exactly the schema's columns.
        schema: One of :data:`pipeline.store.schemas.TABLE_SCHEMAS`.

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
