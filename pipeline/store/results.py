"""Reading a pipeline output: ``open_results(path)``.

Only committed units are read (complete ones, and incomplete ones whose shard ended early: their rows are real);
parts of units being written are ignored, and a unit that a running job starts over between the listing and the
read is skipped, so a reader never fails because a job is running.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline.errors import (
    AmbiguousSampleError,
    EmptyOutputError,
    OutputLookupError,
    SampleNotFoundError,
    StoreError,
)
from pipeline.store.compact import Manifest, TableSources, read_manifest, table_sources
from pipeline.store.lease import live_holder
from pipeline.store.output import JOB_FILE, Output, OutputLike, as_output
from pipeline.store.schemas import TABLE_SCHEMAS
from pipeline.store.units import EXPLAIN_PARTS, committed_units, failure_records, started_units
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

    def require_units(self) -> list[str]:
        """The committed units; raises when there is none to read.

        Raises:
            EmptyOutputError: no committed unit yet, naming what the output holds instead (units being written by
                a running job, units left by a stopped one, failed units), or that the folder is no output.
        """
        if self.units:
            return self.units
        url = self.output.url
        started, failed = started_units(self.output), failure_records(self.output)
        holder = live_holder(self.output)
        if not (started or failed or holder or self.output.exists(self.output.path(JOB_FILE))):
            raise EmptyOutputError(f"{url} is not a pipeline output (no job.json, no unit)")
        facts = []
        if started:
            doing = f"being written by the running job ({holder})" if holder else "left uncommitted by a stopped run"
            facts.append(f"{_count(started, 'unit')} {doing}")
        elif holder:
            facts.append(f"a job is running ({holder})")
        if failed:
            facts.append(f"{_count(failed, 'unit')} failed")
        raise EmptyOutputError(f"no committed unit in {url} yet" + (f": {'; '.join(facts)}" if facts else ""))

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
        return self.read("samples")

    @cached_property
    def blocks(self) -> pd.DataFrame:
        """The blocks table of all committed units."""
        return self.read("blocks")

    @cached_property
    def evaluation(self) -> pd.DataFrame:
        """The evaluation table (one row per sample and method) of the committed units that have one."""
        return self.read("evaluation")

    @cached_property
    def explainer_blocks(self) -> pd.DataFrame:
        """Per-block statistics of the comparison explainers (rollout, attention), where the job ran them."""
        return self.read("explainer_blocks")

    @cached_property
    def sanity(self) -> pd.DataFrame:
        """Map similarities under cascading randomisation (one row per sample, explainer, step and block), where the
        job ran the sanity check."""
        return self.read("sanity")

    def read(self, table: str, columns: Sequence[str] | None = None, filters: Any = None) -> pd.DataFrame:
        """One table of the committed units, read with column selection and filters pushed into the files.

        Rows come in unit order, each unit's rows in the order they were written.

        Args:
            table: ``samples``, ``blocks``, ``evaluation``, ``explainer_blocks`` or ``sanity``.
            columns: The columns to read (default: all).
            filters: Rows to keep: a ``pyarrow.compute`` expression or pyarrow's list-of-tuples form, e.g.
                ``[("block", "==", 11), ("status", "==", "ok")]``.

        Raises:
            OutputLookupError: an unknown table. StoreError: the files cannot be read.
        """
        parts = list(self._scan(table, columns, filters))
        rows = pa.concat_tables(parts)
        if len(parts) > 1 and "unit" in rows.column_names:  # compacted units, then units written since
            rows = rows.take(pc.sort_indices(rows, [("unit", "ascending")]))  # stable: rows keep their order
        return rows.to_pandas(types_mapper=_PANDAS_TYPES.get)

    def batches(
        self, table: str, columns: Sequence[str] | None = None, filters: Any = None, *, batch_size: int = 131_072
    ) -> Iterator[pa.RecordBatch]:
        """One table of the committed units as record batches, for scans that do not fit in memory."""
        for part in self._scan(table, columns, filters, batch_size=batch_size, batches=True):
            yield from part

    def dataset(self, table: str) -> ds.Dataset:
        """A pyarrow dataset of one table of the committed units (exact; see :meth:`TableSources.dataset`).

        Raises:
            StoreError: units were written again since the last compaction (``daam-pipeline compact`` fixes it).
        """
        return self._sources(table, read_manifest(self.output)).dataset(self.output, TABLE_SCHEMAS[table])

    def maps(self, key: str, unit: str | None = None) -> SampleMaps:
        """The stored maps and coefficients of one ok sample, found through the key index.

        Args:
            key: Sample key.
            unit: The sample's unit; needed only when several units hold the key.

        Raises:
            SampleNotFoundError: no ok sample with this key (and unit).
            AmbiguousSampleError: several units hold the key and ``unit`` is None.
        """
        found = self._locate_each([key], unit)
        unit, row = str(found["unit"].iloc[0]), int(found["row"].iloc[0])
        return SampleMaps(key=key, unit=unit, row=row, **self._map_store().read(unit, row))

    def locate(self, keys: Sequence[str], unit: str | None = None) -> pd.DataFrame:
        """Unit and row of the ok samples with these keys (a key held by several units has a row for each).

        Compacted units are looked up in the key index (sorted by key, so a lookup reads a few row groups);
        units written since, in their own samples files.
        """
        keys = list(dict.fromkeys(keys))
        manifest = read_manifest(self.output)
        sources = self._sources("samples", manifest)
        wanted = pc.field("key").isin(keys)
        if unit is not None:
            wanted &= pc.field("unit") == unit
        parts = []
        if manifest is not None and manifest.key_index and sources.compacted_units:
            index = ds.dataset(self.output.path(manifest.key_index), format="parquet", filesystem=self.output.fs)
            found = index.to_table(filter=wanted)
            parts.append(found.filter(pc.is_in(found["unit"], pa.array(sorted(sources.compacted_units)))))
        if sources.per_unit:
            files = ds.dataset(list(sources.per_unit.values()), format="parquet", filesystem=self.output.fs)
            parts.append(files.to_table(columns=["key", "unit", "row"], filter=wanted & (pc.field("status") == "ok")))
        columns = {"key": pa.string(), "unit": pa.string(), "row": pa.int32()}
        found = pa.concat_tables([t.select(list(columns)).cast(pa.schema(columns)) for t in parts]) if parts else None
        return (found if found is not None else pa.schema(columns).empty_table()).to_pandas()

    def maps_of(self, keys: Sequence[str], unit: str | None = None) -> dict[str, np.ndarray]:
        """The stored arrays of many ok samples, stacked in the order of ``keys``, read unit by unit.

        Raises:
            SampleNotFoundError: a key with no ok sample (in ``unit``).
            AmbiguousSampleError: a key in several units while ``unit`` is None.
        """
        found = self._locate_each(keys, unit)
        position = {k: i for i, k in enumerate(keys)}
        stacked: dict[str, np.ndarray] = {}
        store = self._map_store()
        for unit_name, rows in found.groupby("unit", sort=True):
            arrays = store.read_rows(str(unit_name), rows["row"].to_numpy())
            where = [position[k] for k in rows["key"]]
            for name, values in arrays.items():
                if values is None:
                    continue
                if name not in stacked:
                    stacked[name] = np.empty((len(keys), *values.shape[1:]), values.dtype)
                stacked[name][where] = values
        return stacked

    def _locate_each(self, keys: Sequence[str], unit: str | None) -> pd.DataFrame:
        """:meth:`locate`, with exactly one row per key."""
        found = self.locate(keys, unit)
        counts = found["key"].value_counts()
        missing = [k for k in keys if k not in counts.index]
        where = f" of unit {unit!r}" if unit is not None else ""
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise SampleNotFoundError(f"no ok sample with key {missing[0]!r}{more}{where} in {self.output.url}")
        if (counts > 1).any():
            key = str(counts[counts > 1].index[0])
            units = sorted(found.loc[found["key"] == key, "unit"])
            raise AmbiguousSampleError(
                f"key {key!r} is held by units {units} of {self.output.url}: name one, e.g. maps({key!r}, "
                f"unit={units[0]!r})"
            )
        return found

    def iter_units(self) -> Iterator[tuple[str, list[str], dict[str, np.ndarray]]]:
        """Each committed unit's ok samples: (unit, keys in row order, stacked float32 arrays)."""
        samples = self.read("samples", columns=["key", "unit", "row"], filters=pc.field("status") == "ok")
        store = self._map_store()
        for unit_name, rows in samples.sort_values(["unit", "row"]).groupby("unit", sort=True):
            arrays = store.read_rows(str(unit_name), rows["row"].to_numpy())
            yield str(unit_name), rows["key"].tolist(), {k: v for k, v in arrays.items() if v is not None}

    def xarray(self, unit: str) -> Any:
        """One unit's stored arrays as a lazy ``xarray.Dataset`` (dims ``sample``, ``block``, ``row``, ``col``,
        ``channel``; ``sample`` labelled by key), e.g. ``results.xarray(unit).daam.sel(sample=key, block=-1)``.
        Needs ``pip install 'daam-pipeline[xarray]'``.

        Raises:
            OutputLookupError: ``unit`` is not committed. StoreError: a unit of Zarr layout 1 (its float16 values are
                scaled per map; read it with :meth:`maps`).
        """
        import xarray as xr

        if unit not in self.units:
            raise OutputLookupError(f"no committed unit {unit!r} in {self.output.url}")
        url = self.output.url_of(self.output.path("maps.zarr"))
        dataset = xr.open_zarr(url, group=unit, consolidated=False, storage_options=self.output.zarr_options)
        if any(str(name).endswith("_exponent") for name in dataset.data_vars):
            raise StoreError(f"unit {unit} of {self.output.url} is of Zarr layout 1 (scaled float16): use maps()")
        return dataset.assign_coords(sample=[str(key) for key in dataset["keys"].values]).drop_vars("keys")

    def _map_store(self) -> MapStore:
        path = self.output.url_of(self.output.path("maps.zarr"))
        return MapStore.open(path, self.output.storage_options, read_only=True)

    def _sources(self, table: str, manifest: Manifest | None) -> TableSources:
        return table_sources(self.output, table, self.units, manifest, optional=table in EXPLAIN_PARTS.optional)

    def _scan(
        self, table: str, columns: Sequence[str] | None, filters: Any, *, batches: bool = False, **options: Any
    ) -> Iterator[Any]:
        """Tables (or iterators of batches) of the table's files, each filtered to the rows it contributes; the
        files are listed again if one went away meanwhile (a unit that a running job started over, or files a
        compaction replaced)."""
        if table not in TABLE_SCHEMAS:
            raise OutputLookupError(f"no table {table!r}; tables: {', '.join(TABLE_SCHEMAS)}")
        schema = TABLE_SCHEMAS[table]
        user = None if filters is None else _expression(filters)
        for attempt in range(3):
            try:
                parts = []
                for dataset, wanted in self._sources(table, read_manifest(self.output)).scans(self.output, schema):
                    both = wanted if user is None else user if wanted is None else wanted & user
                    scanner = dataset.scanner(
                        columns=None if columns is None else list(columns), filter=both, **options
                    )
                    parts.append(scanner.to_batches() if batches else scanner.to_table())
                if not parts and not batches:
                    empty = schema.empty_table()
                    parts.append(empty if columns is None else empty.select(list(columns)))
                return iter(parts)
            except FileNotFoundError:
                self.__dict__.pop("units", None)  # committed units, listed again
                if attempt == 2:
                    raise StoreError(f"the {table} files of {self.output.url} keep changing; retry later") from None
            except (OSError, pa.ArrowInvalid) as e:
                raise StoreError(f"cannot read the {table} tables of {self.output.url}: {e}") from e
        raise AssertionError("unreachable")


def _expression(filters: Any) -> pc.Expression:
    return filters if isinstance(filters, pc.Expression) else pq.filters_to_expression(filters)


def _count(items: Sized, noun: str) -> str:
    n = len(items)
    return f"{n} {noun}{'' if n == 1 else 's'}"


def open_results(path: OutputLike, storage_options: Mapping[str, Any] | None = None) -> Results:
    """Open a pipeline output for reading.

    Args:
        path: Local path or fsspec URL of the output location (or an :class:`~pipeline.store.output.Output`).
        storage_options: fsspec options for a URL.

    Raises:
        StoreError: nothing exists at ``path``.
    """
    output = as_output(path, storage_options)
    if not output.fs.exists(output.root):
        raise StoreError(f"no pipeline output at {output.url}")
    return Results(output)
