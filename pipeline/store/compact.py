"""Compaction: an output's per-unit Parquet tables become a few large files, read first by ``open_results``.

The commit protocol writes one Parquet file per unit and table (``samples/<unit>.parquet``, ...). At thousands of
units that costs a file open, a footer read (a round trip on object stores) and a pandas concatenation per unit
for every read. Compaction, at the end of a run and by ``daam-pipeline compact OUT``, merges them::

    tables/<table>/part-<generation>-<i>.parquet   whole units, sorted by unit, in large row groups
    tables/key_index-<generation>-<i>.parquet      key, unit and row of every ok sample, sorted by key, in files
                                                   of about 65,536 keys (the manifest holds each one's first key)
    tables/manifest.json                           written last: the generation, its units and files

then removes the per-unit files it merged. A reader (:class:`TableSources`) takes a committed unit's rows from
its per-unit file where there is one (the unit was written or redone after the compaction) and otherwise from
the compacted files, so an output reads the same at every step of a compaction and while a job runs. A
compaction rewrites every table (O(rows), one pass, ``units_per_file`` units in memory at a time) and must hold
the output's lease (:class:`~pipeline.store.lease.Lease`; its :class:`~pipeline.store.lease.Fence` is checked
before the manifest and before anything is removed).

Readers see a consistent snapshot (:func:`table_sources` with ``snapshot``): the manifest, the listing of a
table's per-unit files, then the manifest again; a compaction that replaced the manifest in between, a committed
unit without its files (merged and removed meanwhile, or started over by a job) or a file gone before it was read
(:class:`ChangingFilesError`, ``FileNotFoundError``) make the reader take a new snapshot, after a pause
(:meth:`~pipeline.store.results.Results.read`). The files of a generation stay until the compaction after the
next one starts, so a reader that took its snapshot before a compaction finishes its read in peace.

On an object store each request costs a round trip: the per-unit files are read with one GET each, all at once,
every file is written with one PUT, the merged files are removed in bulk, and a key's lookup reads one key index
file whole, in one GET (:func:`key_index_rows`).
"""

from __future__ import annotations

import bisect
import io
import itertools
import json
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline.errors import StoreError
from pipeline.store.output import Output, OutputLike, as_output
from pipeline.store.schemas import TABLE_SCHEMAS
from pipeline.store.units import EXPLAIN_PARTS, committed_units

if TYPE_CHECKING:
    from pipeline.store.lease import Fence

__all__ = [
    "MANIFEST",
    "TABLES_DIR",
    "ChangingFilesError",
    "Compaction",
    "Manifest",
    "TableSources",
    "compact",
    "compaction_pending",
    "key_index_rows",
    "manifest_generation",
    "read_manifest",
    "table_sources",
]

TABLES_DIR = "tables"
MANIFEST = f"{TABLES_DIR}/manifest.json"
_KEY_INDEX = pa.schema([("key", pa.string()), ("unit", pa.string()), ("row", pa.int32())])
_ROW_GROUP = 1 << 17
_KEY_INDEX_FILE = 1 << 16  # keys per key index file: a lookup reads one whole file (a few hundred KB)


@dataclass(frozen=True)
class Manifest:
    """What the last compaction wrote: paths are relative to ``OUT``.

    ``key_index`` lists the key index files in key order and ``key_index_starts`` the first key of each; a
    manifest of an earlier version has one key index file and no starts.
    """

    generation: int
    units: frozenset[str]
    files: dict[str, list[str]]
    key_index: tuple[str, ...] = ()
    key_index_starts: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        index = data.get("key_index") or ()
        return cls(
            int(data["generation"]),
            frozenset(data["units"]),
            data["files"],
            (index,) if isinstance(index, str) else tuple(index),
            tuple(data.get("key_index_starts", ())),
        )

    def to_json(self) -> bytes:
        record = {
            "generation": self.generation,
            "units": sorted(self.units),
            "files": self.files,
            "key_index": list(self.key_index),
            "key_index_starts": list(self.key_index_starts),
        }
        return json.dumps(record, indent=1).encode()


class ChangingFilesError(StoreError):
    """The files a reader listed changed under it (a compaction replaced them, a job started a unit over): a new
    snapshot reads right. Raised as such only when the output stays the same while it persists."""


def manifest_generation(manifest: Manifest | None) -> int:
    """A manifest's generation; 0 before the first compaction."""
    return manifest.generation if manifest is not None else 0


def key_index_rows(output: Output, manifest: Manifest, keys: Sequence[str], wanted: pc.Expression) -> pa.Table:
    """The key index rows matching ``wanted`` (an expression on key, unit, row) among those of ``keys``: the key
    index files that can hold them are each read whole with one request (a manifest of an earlier version: its
    one file, through its row groups' statistics)."""
    if not manifest.key_index:
        return _KEY_INDEX.empty_table()
    if len(manifest.key_index_starts) != len(manifest.key_index):
        paths = [output.path(path) for path in manifest.key_index]
        return ds.dataset(paths, format="parquet", filesystem=output.fs).to_table(filter=wanted)
    chosen = sorted({max(0, bisect.bisect_right(manifest.key_index_starts, key) - 1) for key in keys})
    paths = [output.path(manifest.key_index[i]) for i in chosen]
    found = output.cat_many(paths)
    tables = [pq.read_table(pa.BufferReader(found[path]), filters=wanted) for path in paths]
    return pa.concat_tables(tables) if tables else _KEY_INDEX.empty_table()


def read_manifest(out: OutputLike) -> Manifest | None:
    """The output's compaction manifest; None before the first compaction.

    Raises:
        StoreError: the manifest exists but cannot be read.
    """
    output = as_output(out)
    try:
        return Manifest.from_json(json.loads(output.fs.cat_file(output.path(MANIFEST), start=0)))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError) as e:
        raise StoreError(f"cannot read {output.url_of(output.path(MANIFEST))}: {e}") from e


@dataclass(frozen=True)
class TableSources:
    """Where the rows of one table of the committed units are: per-unit files and compacted files.

    ``compacted_units`` are the units to take from ``compacted_files``; the files may also hold others
    (``stale_units``: units no longer committed, or redone since and read from their per-unit files).
    """

    table: str
    per_unit: dict[str, str]
    compacted_files: list[str]
    compacted_units: frozenset[str]
    stale_units: frozenset[str]

    def scans(self, output: Output, schema: pa.Schema) -> list[tuple[ds.Dataset, pc.Expression | None]]:
        """Datasets to scan, each with the filter its rows need; together exactly the committed units' rows."""
        scans: list[tuple[ds.Dataset, pc.Expression | None]] = []
        if self.compacted_units:
            wanted = pc.field("unit").isin(sorted(self.compacted_units)) if self.stale_units else None
            scans.append((_dataset(output, self.compacted_files, schema), wanted))
        if self.per_unit:
            scans.append((_dataset(output, list(self.per_unit.values()), schema), None))
        return scans

    def unit_scans(
        self, output: Output, schema: pa.Schema, skip: set[str]
    ) -> Iterator[tuple[set[str], ds.Dataset, pc.Expression | None]]:
        """:meth:`scans` without the units in ``skip``, each per-unit file on its own, with the units it holds:
        what a reader that read ``skip`` already needs after taking a new snapshot."""
        compacted = sorted(self.compacted_units - skip)
        if compacted:
            wanted = pc.field("unit").isin(compacted) if self.stale_units or skip else None
            yield set(compacted), _dataset(output, self.compacted_files, schema), wanted
        for unit, path in self.per_unit.items():
            if unit not in skip:
                yield {unit}, _dataset(output, [path], schema), None

    def dataset(self, output: Output, schema: pa.Schema) -> ds.Dataset:
        """One pyarrow dataset of exactly the committed units' rows.

        Raises:
            StoreError: a unit redone since the last compaction has rows in both kinds of files, which one
                dataset cannot tell apart.
        """
        redone = sorted(self.stale_units & set(self.per_unit))
        if redone:
            raise StoreError(
                f"units {redone[:3]} of {output.url} were written again since its tables were compacted: "
                f"run 'daam-pipeline compact {output.url}' first (Results.read and .batches work meanwhile)"
            )
        dataset = _dataset(output, self.paths, schema)
        return dataset if not self.stale_units else dataset.filter(pc.field("unit").isin(self.units))

    @property
    def units(self) -> list[str]:
        return sorted({*self.compacted_units, *self.per_unit})

    @property
    def paths(self) -> list[str]:
        return [*(self.compacted_files if self.compacted_units else []), *self.per_unit.values()]


def _dataset(output: Output, paths: list[str], schema: pa.Schema) -> ds.Dataset:
    return ds.dataset(paths, schema=schema, format="parquet", filesystem=output.fs)


def table_sources(
    output: Output,
    table: str,
    units: Sequence[str],
    manifest: Manifest | None,
    *,
    optional: bool,
    root: Collection[str] | None = None,
    snapshot: bool = False,
) -> TableSources:
    """The files holding ``table``'s rows of ``units`` (committed units), after one listing of its folder.

    Args:
        root: The names at the output's root, when the caller listed it: when the table's folder is not there and
            the manifest holds every unit, the folder is not listed (a fully compacted output).
        snapshot: A reader's consistent view: ``manifest`` was read before the listing, and is read again after it
            (sources from the manifest alone, of a fully compacted output, need no second look).

    Raises:
        ChangingFilesError: a unit has neither a per-unit file nor compacted rows (for a table every unit writes),
            or, with ``snapshot``, a compaction replaced the manifest meanwhile (an optional table's units would be
            missed silently).
    """
    folder = EXPLAIN_PARTS.parts[table].split("/", 1)[0]
    compacted_all = manifest is not None and bool(manifest.files.get(table)) and manifest.units.issuperset(units)
    skip = root is not None and folder not in root and compacted_all
    listed = set() if skip else EXPLAIN_PARTS.listed_units(output, table)
    per_unit = {unit: EXPLAIN_PARTS.path(output, table, unit) for unit in units if unit in listed}
    rest = [unit for unit in units if unit not in listed]
    compacted = manifest.units if manifest is not None and manifest.files.get(table) else frozenset()
    missing = [unit for unit in rest if unit not in compacted]
    if missing and not optional:
        raise ChangingFilesError(f"committed unit {missing[0]} of {output.url} lacks its {table} table")
    wanted = frozenset(rest) & compacted
    files = [output.path(name) for name in manifest.files.get(table, [])] if manifest is not None else []
    if snapshot and not skip and manifest_generation(read_manifest(output)) != manifest_generation(manifest):
        raise ChangingFilesError(f"the tables of {output.url} were compacted while they were listed")
    return TableSources(table, per_unit, files, wanted, stale_units=compacted - wanted)


def compaction_pending(out: OutputLike) -> bool:
    """Whether committed units' rows are not in the compacted tables yet: units committed since the last compaction
    (or with none), or redone since it."""
    output = as_output(out)
    manifest, units = read_manifest(output), set(committed_units(output))
    if not units:
        return False
    if manifest is None or units != manifest.units:
        return True
    return bool(units & EXPLAIN_PARTS.listed_units(output, "samples"))


@dataclass(frozen=True)
class Compaction:
    """What :func:`compact` did."""

    generation: int
    units: int
    files: int
    merged_files: int  # per-unit files merged and removed


def compact(
    out: OutputLike,
    *,
    units_per_file: int = 1000,
    keys_per_file: int = _KEY_INDEX_FILE,
    fence: Fence | None = None,
) -> Compaction:
    """Merge the committed units' tables into ``tables/`` and remove the merged per-unit files.

    The caller holds the output's lease: no unit is committed meanwhile.

    Args:
        out: The output location.
        units_per_file: Units per compacted file.
        keys_per_file: Keys per key index file (about: a key held by several units is never split).
        fence: The caller's lease, checked before the manifest is written and before anything is removed.

    Raises:
        StoreError: a table cannot be read or written.
        LeaseLostError: another driver took the lease: the output is left as it was.
    """
    output = as_output(out)
    if fence is not None:
        fence.check()
    try:
        return _compact(output, units_per_file, keys_per_file, fence)
    except (FileNotFoundError, ChangingFilesError) as e:  # the lease is not ours any more, or a unit vanished
        if fence is not None:
            fence.check()
        raise StoreError(f"cannot compact {output.url}: files changed while it ran ({e})") from e


def _compact(output: Output, units_per_file: int, keys_per_file: int, fence: Fence | None) -> Compaction:
    old = read_manifest(output)
    # Files no manifest names: an interrupted compaction's, and those of the generation before ``old``, which the
    # last compaction kept for the readers that had read its manifest.
    _remove_unreferenced(output, old)
    units = committed_units(output)
    generation = (old.generation if old else 0) + 1
    files: dict[str, list[str]] = {}
    merged: list[str] = []
    index_parts: list[pa.Table] = []
    for table, schema in TABLE_SCHEMAS.items():
        sources = table_sources(output, table, units, old, optional=table in EXPLAIN_PARTS.optional)
        present = sorted({*sources.per_unit, *sources.compacted_units})
        files[table] = []
        for start in range(0, len(present), units_per_file):
            chunk = present[start : start + units_per_file]
            rows = _read_units(output, sources, chunk, schema)
            name = f"{TABLES_DIR}/{table}/part-{generation:05d}-{start // units_per_file:05d}.parquet"
            output.put_atomic(output.path(name), _parquet(rows, schema))
            files[table].append(name)
            if table == "samples":
                ok = rows.filter(pc.equal(rows["status"], "ok"))
                index_parts.append(ok.select(["key", "unit", "row"]).cast(_KEY_INDEX))
        merged += sources.per_unit.values()
    key_index: dict[str, bytes] = {}
    starts: list[str] = []
    if index_parts:
        index = pa.concat_tables(index_parts)
        index = index.take(pc.sort_indices(index, [("key", "ascending"), ("unit", "ascending")]))
        bounds = _split_between_keys(index["key"].to_numpy(zero_copy_only=False), keys_per_file)
        for number, (start, stop) in enumerate(itertools.pairwise(bounds)):
            part = index.slice(start, stop - start)
            sink = io.BytesIO()
            pq.write_table(part, sink, row_group_size=keys_per_file, compression="zstd")
            key_index[f"{TABLES_DIR}/key_index-{generation:05d}-{number:05d}.parquet"] = sink.getvalue()
            starts.append(str(part["key"][0]))
        output.put_many({output.path(name): data for name, data in key_index.items()})
    manifest = Manifest(generation, frozenset(units), files, tuple(key_index), tuple(starts))
    if fence is not None:
        fence.check()
    output.put_atomic(output.path(MANIFEST), manifest.to_json())  # from here on readers use the new files
    output.remove_files(merged)  # a reader that listed them before the manifest takes a new snapshot
    return Compaction(generation, len(units), sum(map(len, files.values())), len(merged))


def _split_between_keys(keys: Any, size: int) -> list[int]:
    """Bounds of consecutive runs of about ``size`` rows of sorted ``keys``: each run starts at a new key (a key
    held by several units is in one run), [0, ..., len(keys)] ([0]: no run, no key)."""
    bounds = [0]
    while bounds[-1] + size < len(keys):
        cut = bounds[-1] + size
        while cut < len(keys) and keys[cut] == keys[cut - 1]:
            cut += 1
        bounds.append(cut)
    if bounds[-1] < len(keys):
        bounds.append(len(keys))
    return bounds


def _read_units(output: Output, sources: TableSources, units: list[str], schema: pa.Schema) -> pa.Table:
    """The rows of ``units`` (sorted), each unit's rows in their written order."""
    wanted = set(units)
    parts = []
    from_compacted = sorted(wanted & sources.compacted_units)
    if from_compacted:
        compacted = _dataset(output, sources.compacted_files, schema)
        parts.append(compacted.to_table(filter=pc.field("unit").isin(from_compacted)))
    fresh = [sources.per_unit[unit] for unit in units if unit in sources.per_unit]
    if fresh:  # one GET per file, all at once
        files = output.cat_many(fresh)
        parts += [pq.read_table(pa.BufferReader(files[path]), schema=schema) for path in fresh]
    try:
        rows = pa.concat_tables(parts) if parts else schema.empty_table()
    except pa.ArrowInvalid as e:
        raise StoreError(f"cannot merge the {sources.table} tables of {output.url}: {e}") from e
    return rows.take(pc.sort_indices(rows, [("unit", "ascending")]))  # a stable sort: rows keep their order


def _parquet(rows: pa.Table, schema: pa.Schema) -> bytes:
    """``rows`` (sorted by unit) as Parquet with the schema's metadata, in large row groups: a row group costs a
    few milliseconds to read whatever its size, and the unit column's statistics still skip row groups by unit."""
    sink = io.BytesIO()
    pq.write_table(rows.cast(schema), sink, row_group_size=_ROW_GROUP, compression="zstd")
    return sink.getvalue()


def _remove_unreferenced(output: Output, manifest: Manifest | None) -> None:
    referenced = {MANIFEST}
    if manifest is not None:
        referenced |= {name for names in manifest.files.values() for name in names}
    if manifest is not None:
        referenced |= set(manifest.key_index)
    root = output.path(TABLES_DIR)
    found = output.files_under(root)
    output.remove_files([path for path in found if path.removeprefix(output.root + "/") not in referenced])
