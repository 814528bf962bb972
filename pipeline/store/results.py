"""Reading a pipeline output: ``open_results(path)``.

Only committed units are read (complete ones, and incomplete ones whose shard ended early: their rows are real);
parts of units being written are ignored, and a unit that a running job starts over between the listing and the
read is skipped, so a reader never fails because a job is running.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import StoreError
from pipeline.store.output import Output, OutputLike, as_output
from pipeline.store.tables import blocks_schema, evaluation_schema, explainer_blocks_schema, samples_schema
from pipeline.store.units import EXPLAIN_PARTS, committed_units
from pipeline.store.zarr_store import MapStore

__all__ = ["Results", "SampleMaps", "open_results"]

# Integer columns become pandas' nullable dtypes, whether or not a column holds nulls.
_PANDAS_TYPES = {pa.int16(): pd.Int16Dtype(), pa.int32(): pd.Int32Dtype()}


@dataclass(frozen=True)
class SampleMaps:
    """The stored arrays of one sample, float32; None for arrays the store does not keep."""

    key: str
    unit: str
    row: int
    block_maps: np.ndarray | None  # (L, h, w)
    daam: np.ndarray | None  # (L, h, w)
    coefficients: np.ndarray | None  # (L, C)
    rollout: np.ndarray | None = None  # (L, h, w), when the job ran the rollout explainer
    attention: np.ndarray | None = None  # (L, h, w), raw [class] attention per block
    gradcam: np.ndarray | None = None  # (h, w)
    gae: np.ndarray | None = None  # (L, h, w), GAE's gradient-weighted rollout per block


class Results:
    """The committed part of an output location; tables are read on first access.

    Args:
        output: The output location.
    """

    def __init__(self, output: Output) -> None:
        self.output = output

    @cached_property
    def units(self) -> list[str]:
        """Committed units (complete and incomplete), sorted."""
        return committed_units(self.output)

    @cached_property
    def attrs(self) -> dict[str, Any]:
        """Root attributes of ``maps.zarr`` (model, layout, storage); empty before any unit was written."""
        try:
            return self._map_store().attrs
        except StoreError:
            return {}

    @cached_property
    def samples(self) -> pd.DataFrame:
        """The samples table of all committed units."""
        return self._read("samples", samples_schema())

    @cached_property
    def blocks(self) -> pd.DataFrame:
        """The blocks table of all committed units."""
        return self._read("blocks", blocks_schema())

    @cached_property
    def evaluation(self) -> pd.DataFrame:
        """The evaluation table (one row per sample and method) of the committed units that have one."""
        return self._read("evaluation", evaluation_schema(), optional=True)

    @cached_property
    def explainer_blocks(self) -> pd.DataFrame:
        """Per-block statistics of the comparison explainers (rollout, attention), where the job ran them."""
        return self._read("explainer_blocks", explainer_blocks_schema(), optional=True)

    def maps(self, key: str, unit: str | None = None) -> SampleMaps:
        """The stored maps and coefficients of one ok sample, located through the samples table.

        Args:
            key: Sample key.
            unit: The sample's unit; needed only when several units hold the key.

        Raises:
            KeyError: no ok sample with this key (and unit), or the key is in several units and ``unit`` is None.
        """
        samples = self.samples
        found = samples[(samples["key"] == key) & (samples["status"] == "ok")]
        if unit is not None:
            found = found[found["unit"] == unit]
        if len(found) != 1:
            where = "no ok sample" if found.empty else f"units {sorted(found['unit'])} hold the"
            raise KeyError(f"{where} key {key!r} in {self.output.url}")
        unit, row = str(found["unit"].iloc[0]), int(found["row"].iloc[0])
        return SampleMaps(key=key, unit=unit, row=row, **self._map_store().read(unit, row))

    def _map_store(self) -> MapStore:
        path = self.output.url_of(self.output.path("maps.zarr"))
        return MapStore.open(path, self.output.storage_options, read_only=True)

    def _read(self, kind: str, schema: pa.Schema, *, optional: bool = False) -> pd.DataFrame:
        paths = {unit: EXPLAIN_PARTS.path(self.output, kind, unit) for unit in self.units}
        table = None
        try:
            if paths and not optional:
                table = pq.read_table(list(paths.values()), filesystem=self.output.fs, schema=schema)
            elif paths:
                table = self._read_each(kind, paths, schema, optional)
        except FileNotFoundError:  # a unit that a running job started over since the listing
            table = self._read_each(kind, paths, schema, optional)
        except OSError as e:
            raise StoreError(f"cannot read the {kind} tables of {self.output.url}: {e}") from e
        return (schema.empty_table() if table is None else table).to_pandas(types_mapper=_PANDAS_TYPES.get)

    def _read_each(self, kind: str, paths: dict[str, str], schema: pa.Schema, optional: bool) -> pa.Table | None:
        tables = []
        for unit, path in paths.items():
            try:
                tables.append(pq.read_table(path, filesystem=self.output.fs, schema=schema))
            except FileNotFoundError:
                if optional or not self.output.exists(EXPLAIN_PARTS.path(self.output, "samples", unit)):
                    continue  # a table this unit has not, or a unit started over since the listing
                raise StoreError(f"committed unit {unit} of {self.output.url} lacks its {kind} table") from None
            except OSError as e:
                raise StoreError(f"cannot read the {kind} table of unit {unit} in {self.output.url}: {e}") from e
        return pa.concat_tables(tables) if tables else None


def open_results(path: OutputLike, storage_options: Mapping[str, Any] | None = None) -> Results:
    """Open a pipeline output for reading.

    Args:
        path: Local path or fsspec URL of the output location (or an :class:`~pipeline.store.commit.Output`).
        storage_options: fsspec options for a URL.

    Raises:
        StoreError: nothing exists at ``path``.
    """
    output = as_output(path, storage_options)
    if not output.fs.exists(output.root):
        raise StoreError(f"no pipeline output at {output.url}")
    return Results(output)
