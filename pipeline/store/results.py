"""Reading a pipeline output: ``open_results(path)``.

Only committed units are read (complete ones, and incomplete ones whose shard ended early: their rows are real);
parts of units being written are ignored. Every read is of one consistent snapshot of the files
(:func:`~pipeline.store.compact.table_sources` with ``snapshot``), taken again, after a pause, when a compaction
or a running job changes the files under it: a reader never fails nor loses rows because a job or a compaction
runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass
from functools import cached_property
from typing import Any, TypeVar

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
from pipeline.store.compact import (
    ChangingFilesError,
    Manifest,
    TableSources,
    key_index_rows,
    manifest_generation,
    read_manifest,
    table_sources,
)
from pipeline.store.lease import live_holder
from pipeline.store.output import JOB_FILE, Output, OutputLike, as_output
from pipeline.store.schemas import TABLE_SCHEMAS
from pipeline.store.units import EXPLAIN_PARTS, committed_units, failure_records, started_units
from pipeline.store.zarr_store import MapStore

__all__ = ["Results", "SampleMaps", "open_results"]

# Integer columns become pandas' nullable dtypes, whether or not a column holds nulls.
_PANDAS_TYPES = {pa.int16(): pd.Int16Dtype(), pa.int32(): pd.Int32Dtype()}

_CHANGING_S = 60.0
"""A reader gives up only when the files keep changing under it this long."""

T = TypeVar("T")


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
    attnlrp: np.ndarray | None = None  # (L, h, w), AttnLRP relevance at each block's input, signed
    attnlrp_input: np.ndarray | None = None  # (h, w), AttnLRP relevance at the patch embedding, signed
    cplrp: np.ndarray | None = None  # (L, h, w), CP-LRP relevance at each block's input, signed
    cplrp_input: np.ndarray | None = None  # (h, w), CP-LRP relevance at the patch embedding, signed


class Results:
    """The committed part of an output location; tables are read on first access.

    Args:
        output: The output location.
    """

    def __init__(self, output: Output) -> None:
        self.output = output

    @cached_property
    def _root(self) -> frozenset[str]:
        """The names at the output's root, listed once (on an object store a folder without files is absent): the
        folders a fully compacted output lacks are not listed again."""
        return frozenset(self.output.listdir(self.output.root))

    @cached_property
    def units(self) -> list[str]:
        """Committed units (complete and incomplete), sorted."""
        return committed_units(self.output, listed=self._root)

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
            return self._maps.attrs
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
        """Per-block statistics of the comparison explainers with per-block maps, where the job ran them."""
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
        schema, wanted = self._table(table, filters)

        def scan(manifest: Manifest | None) -> list[pa.Table]:
            scans = self._sources(table, manifest).scans(self.output, schema)
            selected = None if columns is None else list(columns)
            return [dataset.to_table(columns=selected, filter=_and(where, wanted)) for dataset, where in scans]

        parts = self._consistently(scan)
        if not parts:
            empty = schema.empty_table()
            parts = [empty if columns is None else empty.select(list(columns))]
        rows = pa.concat_tables(parts)
        if len(parts) > 1 and "unit" in rows.column_names:  # compacted units, then units written since
            rows = rows.take(pc.sort_indices(rows, [("unit", "ascending")]))  # stable: rows keep their order
        return rows.to_pandas(types_mapper=_PANDAS_TYPES.get)

    def batches(
        self, table: str, columns: Sequence[str] | None = None, filters: Any = None, *, batch_size: int = 131_072
    ) -> Iterator[pa.RecordBatch]:
        """One table of the committed units as record batches, for scans that do not fit in memory.

        A file that a compaction merged and removed before its turn came is read from the compacted files instead
        (a new snapshot, without the units read already).

        Raises:
            StoreError: the compacted files were replaced twice in the middle of the scan (read again).
        """
        schema, wanted = self._table(table, filters)
        read: set[str] = set()
        deadline = time.monotonic() + _CHANGING_S
        while True:
            sources = self._consistently(lambda manifest: self._sources(table, manifest))
            try:
                for units, dataset, where in sources.unit_scans(self.output, schema, skip=read):
                    selected = None if columns is None else list(columns)
                    scanner = dataset.scanner(columns=selected, filter=_and(where, wanted), batch_size=batch_size)
                    batches = scanner.to_batches()
                    first = next(batches, None)  # a file removed meanwhile fails here, before any of its rows
                    if first is not None:
                        yield first
                        try:
                            yield from batches
                        except FileNotFoundError as e:
                            raise StoreError(f"the {table} files of {self.output.url} changed during the scan") from e
                    read |= units
                return
            except FileNotFoundError:
                self.__dict__.pop("_root", None)
                self.__dict__.pop("units", None)
                if time.monotonic() >= deadline:
                    raise StoreError(f"the {table} files of {self.output.url} kept changing; retry later") from None

    def dataset(self, table: str) -> ds.Dataset:
        """A pyarrow dataset of one table of the committed units (exact; see :meth:`TableSources.dataset`).

        Raises:
            StoreError: units were written again since the last compaction (``daam-pipeline compact`` fixes it).
        """
        self._table(table, None)
        sources = self._consistently(lambda manifest: self._sources(table, manifest))
        return sources.dataset(self.output, TABLE_SCHEMAS[table])

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
        return SampleMaps(key=key, unit=unit, row=row, **self._maps.read(unit, row))

    def locate(self, keys: Sequence[str], unit: str | None = None) -> pd.DataFrame:
        """Unit and row of the ok samples with these keys (a key held by several units has a row for each).

        Compacted units are looked up in the key index (sorted by key, so a lookup reads a few row groups);
        units written since, in their own samples files.
        """
        keys = list(dict.fromkeys(keys))
        wanted = pc.field("key").isin(keys)
        if unit is not None:
            wanted &= pc.field("unit") == unit

        def look_up(manifest: Manifest | None) -> list[pa.Table]:
            sources = self._sources("samples", manifest)
            parts = []
            if manifest is not None and manifest.key_index and sources.compacted_units:
                found = key_index_rows(self.output, manifest, keys, wanted)
                parts.append(found.filter(pc.is_in(found["unit"], pa.array(sorted(sources.compacted_units)))))
            if sources.per_unit:
                files = ds.dataset(list(sources.per_unit.values()), format="parquet", filesystem=self.output.fs)
                ok = wanted & (pc.field("status") == "ok")
                parts.append(files.to_table(columns=["key", "unit", "row"], filter=ok))
            return parts

        parts = self._consistently(look_up)
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
        store = self._maps
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
        store = self._maps
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

    @cached_property
    def _maps(self) -> MapStore:
        return MapStore(self.output.child("maps.zarr"), read_only=True)

    def _sources(self, table: str, manifest: Manifest | None) -> TableSources:
        optional = table in EXPLAIN_PARTS.optional
        return table_sources(
            self.output, table, self.units, manifest, optional=optional, root=self._root, snapshot=True
        )

    def _consistently(self, read: Callable[[Manifest | None], T]) -> T:
        """``read(manifest)`` of one snapshot, taken again after a growing pause while the files change under it: a
        file gone before it was read (a compaction removes the per-unit files it merged after its manifest; a job
        starts a unit over), or sources that changed while they were listed.

        Raises:
            StoreError: a committed unit without its files while nothing changes, files that kept changing for a
                minute, or files that cannot be read.
        """
        deadline, pause = time.monotonic() + _CHANGING_S, 0.01
        while True:
            manifest, units = read_manifest(self.output), self.units
            try:
                return read(manifest)
            except (FileNotFoundError, ChangingFilesError) as e:
                self.__dict__.pop("_root", None)  # the root and the committed units, listed again
                self.__dict__.pop("units", None)
                unchanged = (manifest_generation(read_manifest(self.output)), self.units) == (
                    manifest_generation(manifest),
                    units,
                )
                if isinstance(e, ChangingFilesError) and unchanged:
                    raise StoreError(str(e)) from None
                if time.monotonic() >= deadline:
                    raise StoreError(f"the files of {self.output.url} kept changing; retry later ({e})") from None
                time.sleep(pause)
                pause = min(2 * pause, 0.5)
            except (OSError, pa.ArrowInvalid) as e:
                raise StoreError(f"cannot read the tables of {self.output.url}: {e}") from e

    def _table(self, table: str, filters: Any) -> tuple[pa.Schema, pc.Expression | None]:
        """A table's schema and the user's filter as an expression.

        Raises:
            OutputLookupError: an unknown table.
        """
        if table not in TABLE_SCHEMAS:
            raise OutputLookupError(f"no table {table!r}; tables: {', '.join(TABLE_SCHEMAS)}")
        return TABLE_SCHEMAS[table], None if filters is None else _expression(filters)


def _expression(filters: Any) -> pc.Expression:
    return filters if isinstance(filters, pc.Expression) else pq.filters_to_expression(filters)


def _and(a: pc.Expression | None, b: pc.Expression | None) -> pc.Expression | None:
    return b if a is None else a if b is None else a & b


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
    results = Results(as_output(path, storage_options))
    if not results._root and not results.output.fs.exists(results.output.root):  # one listing when there is one
        raise StoreError(f"no pipeline output at {results.output.url}")
    return results
