"""Atomic unit commits and resume, and the one writer a worker uses per unit.

The output location ``OUT`` (a local path or an fsspec URL: ``file://``, ``s3://``, ``memory://``, ...) holds::

    maps.zarr/<unit>/        the unit's Zarr group (pipeline.store.zarr_store)
    samples/<unit>.parquet   the unit's samples table (pipeline.store.tables)
    blocks/<unit>.parquet    the unit's blocks table
    _done/<unit>.json        the commit marker, written last

Protocol: :func:`begin_unit` removes the marker first, then every part of an earlier attempt (temporary files of
interrupted writes are swept once per job, :func:`sweep_temporaries`); the unit's data is written;
:func:`commit_unit` writes the marker once that data is durable. A unit is done exactly when its marker exists, so
an interrupted unit is redone from scratch and readers (:mod:`pipeline.store.results`) never see its rows twice.
Parquet files and markers are written under a temporary name and renamed, so a partial file never carries a final
name. On local file systems files and directories are fsynced before the marker is written.
Two live writers of the same unit are not guarded against: the driver hands each unit to one worker at a time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem
from numpy.typing import ArrayLike

from pipeline.errors import SchemaError, StoreError
from pipeline.store.tables import (
    blocks_schema,
    build_table,
    evaluation_schema,
    explainer_blocks_schema,
    parquet_bytes,
    samples_schema,
)
from pipeline.store.zarr_store import MapLayout, MapStore, StoreOptions

__all__ = [
    "Output",
    "OutputLike",
    "UnitWriter",
    "as_output",
    "begin_unit",
    "clear",
    "commit_unit",
    "done_units",
    "is_done",
    "sweep_temporaries",
]

logger = logging.getLogger(__name__)

_UNIT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_ENTRIES = ("maps.zarr", "samples", "blocks", "evaluation", "explainer_blocks", "_done")
_ATOMIC_FOLDERS = ("samples", "blocks", "evaluation", "explainer_blocks", "_done", "_failed")  # put_atomic's
_OPTIONAL_TABLES = ("evaluation", "explainer_blocks")  # written only by jobs that evaluate / compare
_METRICS = ("pointing_hit", "box_energy", "deletion_auc", "insertion_auc")


@dataclass(frozen=True)
class Output:
    """The output location: an fsspec file system and the root path on it.

    Args:
        url: Local path or fsspec URL of ``OUT``.
        storage_options: fsspec options (credentials, endpoint, ...).
    """

    url: str
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    fs: AbstractFileSystem = field(init=False, repr=False, compare=False)
    root: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        fs, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        object.__setattr__(self, "fs", fs)
        object.__setattr__(self, "root", root.rstrip("/"))

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        """Path of ``OUT/<parts>`` on :attr:`fs`."""
        return "/".join((self.root, *parts))

    def maps(self, *, read_only: bool = False) -> MapStore:
        """The Zarr store ``OUT/maps.zarr``."""
        path = self.path("maps.zarr")
        return MapStore.open(
            path if self.is_local else self.fs.unstrip_protocol(path), self.storage_options, read_only=read_only
        )

    def unit_paths(self, unit: str) -> dict[str, str]:
        """Every path a unit writes, by kind: ``maps``, ``samples``, ``blocks``, ``marker``.

        Raises:
            StoreError: ``unit`` is not a plain file stem (letters, digits, ``._-``).
        """
        if not _UNIT.fullmatch(unit):
            raise StoreError(f"unit name {unit!r} is not a plain file stem (letters, digits, '._-')")
        return {
            "maps": self.path("maps.zarr", unit),
            "samples": self.path("samples", f"{unit}.parquet"),
            "blocks": self.path("blocks", f"{unit}.parquet"),
            "evaluation": self.path("evaluation", f"{unit}.parquet"),
            "explainer_blocks": self.path("explainer_blocks", f"{unit}.parquet"),
            "marker": self.path("_done", f"{unit}.json"),
        }

    def put_atomic(self, path: str, data: bytes) -> None:
        """Write ``data`` to a temporary name next to ``path``, then rename it to ``path``."""
        parent = path.rsplit("/", 1)[0]
        temporary = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            self.fs.makedirs(parent, exist_ok=True)
            if self.is_local:
                with open(temporary, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(temporary, path)
                _fsync(parent)
            else:
                self.fs.pipe_file(temporary, data)
                self.fs.mv(temporary, path)
        except OSError as e:
            raise StoreError(f"cannot write {self.fs.unstrip_protocol(path)}: {e}") from e

    def sync(self, path: str) -> None:
        """Flush every file and directory under ``path``, and its parent, to disk (local file systems only)."""
        if self.is_local:
            for folder, _, files in os.walk(path):
                for name in files:
                    _fsync(os.path.join(folder, name))
                _fsync(folder)
            _fsync(os.path.dirname(path))

    def remove(self, path: str) -> None:
        """Remove a file or folder; nothing when it does not exist."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(path, recursive=True)


OutputLike = str | os.PathLike | Output


def as_output(out: OutputLike, storage_options: Mapping[str, Any] | None = None) -> Output:
    """``out`` as an :class:`Output`; ``storage_options`` apply to a path or URL only."""
    return out if isinstance(out, Output) else Output(os.fspath(out), dict(storage_options or {}))


def is_done(out: OutputLike, unit: str) -> bool:
    """Whether the unit's commit marker exists."""
    output = as_output(out)
    marker = output.unit_paths(unit)["marker"]
    output.fs.invalidate_cache(marker)
    return output.fs.exists(marker)


def done_units(out: OutputLike) -> list[str]:
    """The committed units, sorted."""
    output = as_output(out)
    folder = output.path("_done")
    output.fs.invalidate_cache(folder)
    try:
        names = output.fs.ls(folder, detail=False)
    except FileNotFoundError:
        return []
    return sorted(name.rsplit("/", 1)[-1].removesuffix(".json") for name in names if name.endswith(".json"))


def begin_unit(out: OutputLike, unit: str) -> None:
    """Remove the unit's marker, then all its data from an earlier attempt.

    Temporary files of an interrupted write are never read; :func:`sweep_temporaries` removes them once per job
    (a search here would list folders holding every unit's files, for every unit).
    """
    output = as_output(out)
    paths = output.unit_paths(unit)
    output.remove(paths["marker"])
    for path in paths.values():
        output.remove(path)


def sweep_temporaries(out: OutputLike) -> int:
    """Remove the temporary files of interrupted writes (``*.tmp-*``) under ``OUT``; call it before workers start.

    Returns:
        How many were removed.
    """
    output = as_output(out)
    folders = [output.root, *(output.path(name) for name in _ATOMIC_FOLDERS)]
    temporaries = [path for folder in folders for path in output.fs.glob(f"{folder}/*.tmp-*")]
    for path in temporaries:
        output.remove(path)
    return len(temporaries)


def commit_unit(out: OutputLike, unit: str, summary: Mapping[str, Any]) -> dict[str, Any]:
    """Write the unit's commit marker; call it only once the unit's data is durable.

    Args:
        out: The output location.
        unit: Unit name.
        summary: JSON-serialisable facts about the unit (counts, timings), stored in the marker.

    Returns:
        The marker's content.

    Raises:
        StoreError: the summary is not JSON-serialisable or the marker cannot be written.
    """
    output = as_output(out)
    marker = {"unit": unit, "committed_at": datetime.now(UTC).isoformat(), **summary}
    try:
        data = json.dumps(marker, indent=1).encode()
    except (TypeError, ValueError) as e:
        raise StoreError(f"summary of unit {unit!r} is not JSON-serialisable: {e}") from e
    output.put_atomic(output.unit_paths(unit)["marker"], data)
    return marker


def clear(out: OutputLike) -> None:
    """Remove everything the pipeline wrote under ``OUT`` (for ``--overwrite``); other files stay."""
    output = as_output(out)
    for entry in _ENTRIES:
        output.remove(output.path(entry))


_ROW_COLUMNS = ("label", "predicted", "score", "target", "width", "height", "n_boxes")
"""Samples columns a worker gives per sample; the writer fills the others."""


class UnitWriter:
    """Writes one unit: maps, samples and blocks of its batches, then the commit.

    Creating the writer starts the unit afresh (:func:`begin_unit`) and makes sure ``maps.zarr`` exists with this
    job's attributes.

    Args:
        out: The output location.
        unit: Unit name, the input shard's file stem.
        layout: Shapes of the engine's outputs.
        shard: URL of the input shard (samples column ``shard``).
        job: Job name (samples column ``job``).
        store_options: How the maps are stored.

    Raises:
        StoreError: the output holds maps of another configuration, or cannot be written.
    """

    def __init__(
        self,
        out: OutputLike,
        unit: str,
        layout: MapLayout,
        *,
        shard: str,
        job: str,
        store_options: StoreOptions | None = None,
    ) -> None:
        self.output = as_output(out)
        self.unit = unit
        self.layout = layout
        self._paths = self.output.unit_paths(unit)
        begin_unit(self.output, unit)
        options = store_options or StoreOptions()
        maps = self.output.maps()
        maps.init(layout, options)
        self._maps = maps.unit_writer(unit, layout, options)
        self._fixed = {"shard": shard, "unit": unit, "model": layout.model, "job": job}
        self._samples: list[pa.Table] = []
        self._blocks: list[pa.Table] = []
        self._evaluation: list[pa.Table] = []
        self._explainer_blocks: list[pa.Table] = []
        self.failed = 0

    @property
    def ok(self) -> int:
        """Samples written with maps so far."""
        return self._maps.rows

    def write_batch(
        self,
        keys: Sequence[str],
        block_maps: ArrayLike | None,
        daam: ArrayLike | None,
        coefficients: ArrayLike | None,
        sample_rows: Sequence[Mapping[str, Any]],
        block_stats: Mapping[str, ArrayLike],
        explainer_maps: Mapping[str, ArrayLike] | None = None,
    ) -> None:
        """Write a batch of ok samples.

        Args:
            keys: ``B`` sample keys.
            block_maps: ``(B, L, h, w)`` float32 M_l; may be None when the store options skip it.
            daam: ``(B, L, h, w)`` float32 D_l; may be None when skipped.
            coefficients: ``(B, L, C)`` float32 c_l; may be None when skipped.
            sample_rows: ``B`` dicts with exactly the samples columns ``label, predicted, score, target, width,
                height, n_boxes`` (None where null); the writer fills the others.
            block_stats: :func:`pipeline.stats.block_statistics` on the host, each ``(B, L)``.
            explainer_maps: Comparison explainers' maps by name (``rollout`` ...), stored when the options list them.

        Raises:
            SchemaError: rows, statistics or arrays that do not match the schemas or the layout.
        """
        keys = [str(k) for k in keys]
        n, n_blocks = len(keys), self.layout.n_blocks
        first = self._maps.rows
        samples = self._sample_table(
            keys, sample_rows, status="ok", error=None, row=np.arange(first, first + n, dtype=np.int32)
        )
        stats = {}
        for name, values in block_stats.items():
            values = np.asarray(values)
            if values.shape != (n, n_blocks):
                raise SchemaError(
                    f"unit {self.unit!r}: statistic {name!r} has shape {values.shape}, expected {(n, n_blocks)}"
                )
            stats[name] = values.reshape(-1)
        blocks = build_table(
            {
                "key": np.repeat(keys, n_blocks),
                "unit": [self.unit] * (n * n_blocks),
                "block": np.tile(np.arange(n_blocks), n),
                **stats,
            },
            blocks_schema(),
        )
        arrays = {"block_maps": block_maps, "daam": daam, "coefficients": coefficients, **(explainer_maps or {})}
        self._maps.append(keys, arrays)
        self._samples.append(samples)
        self._blocks.append(blocks)

    def write_explainer_blocks(self, keys: Sequence[str], stats: Mapping[str, Mapping[str, ArrayLike]]) -> None:
        """Record per-block statistics of comparison explainers: ``stats[explainer][name]`` is ``(B, L)``."""
        n = len(keys)
        for explainer, values in stats.items():
            columns = {name: np.asarray(v) for name, v in values.items()}
            blocks = next(iter(columns.values())).shape[1]
            table = {
                "key": np.repeat(list(keys), blocks),
                "unit": [self.unit] * (n * blocks),
                "explainer": [explainer] * (n * blocks),
                "block": np.tile(np.arange(blocks), n),
                **{name: v.reshape(-1) for name, v in columns.items()},
            }
            self._explainer_blocks.append(build_table(table, explainer_blocks_schema()))

    def write_evaluation(self, keys: Sequence[str], methods: Mapping[str, Mapping[str, ArrayLike]]) -> None:
        """Record evaluation metrics of a batch: ``methods[name][metric]`` is ``(B,)``; absent metrics are NaN."""
        n = len(keys)
        for name, metrics in methods.items():
            unknown = set(metrics) - set(_METRICS)
            if unknown:
                raise SchemaError(f"unit {self.unit!r}: unknown evaluation metrics {sorted(unknown)}")
            columns = {metric: np.asarray(metrics.get(metric, np.full(n, np.nan)), np.float32) for metric in _METRICS}
            table = {"key": list(keys), "unit": [self.unit] * n, "method": [name] * n, **columns}
            self._evaluation.append(build_table(table, evaluation_schema()))

    def write_failed(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Record samples that failed before they had maps.

        Args:
            rows: Dicts with ``key`` and ``error`` (the message), and any of the per-sample columns of
                :meth:`write_batch` known for the sample (``label``, ``width``, ...); the others are null.

        Raises:
            SchemaError: a row without key or error, or with other columns.
        """
        for r in rows:
            if "key" not in r or "error" not in r:
                raise SchemaError(f"unit {self.unit!r}: failed-sample row {dict(r)} needs 'key' and 'error'")
        keys = [str(r["key"]) for r in rows]
        errors = [str(r["error"]) for r in rows]
        rest = [
            {**dict.fromkeys(_ROW_COLUMNS), **{k: v for k, v in r.items() if k not in ("key", "error")}} for r in rows
        ]
        self._samples.append(self._sample_table(keys, rest, status="failed", error=errors, row=None))
        self.failed += len(rows)

    def commit(self, summary: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Flush the maps, write both tables, make them durable, then write the commit marker.

        Args:
            summary: Extra JSON-serialisable facts for the marker (timings, device, ...).

        Returns:
            The marker's content: ``unit``, ``committed_at``, the counts ``samples``, ``ok``, ``failed``,
            ``precision_flagged`` (samples whose storage dtype lost more than the tolerance) and ``summary``.
        """
        self._maps.flush()
        for kind, tables, schema in (
            ("samples", self._samples, samples_schema()),
            ("blocks", self._blocks, blocks_schema()),
            ("evaluation", self._evaluation, evaluation_schema()),
            ("explainer_blocks", self._explainer_blocks, explainer_blocks_schema()),
        ):
            if kind in _OPTIONAL_TABLES and not tables:
                continue
            table = pa.concat_tables(tables) if tables else schema.empty_table()
            self.output.put_atomic(self._paths[kind], parquet_bytes(table, schema))
        self.output.sync(self._paths["maps"])
        counts = {
            "samples": self._maps.rows + self.failed,
            "ok": self._maps.rows,
            "failed": self.failed,
            "precision_flagged": self._maps.flagged,
        }
        marker = commit_unit(self.output, self.unit, {**(summary or {}), **counts})
        logger.info("committed unit %s: %s", self.unit, counts)
        return marker

    def _sample_table(
        self, keys: list[str], rows: Sequence[Mapping[str, Any]], *, status: str, error: Any, row: Any
    ) -> pa.Table:
        if len(rows) != len(keys):
            raise SchemaError(f"unit {self.unit!r}: {len(rows)} sample rows for {len(keys)} keys")
        for key, r in zip(keys, rows, strict=True):
            missing, extra = set(_ROW_COLUMNS) - set(r), set(r) - set(_ROW_COLUMNS)
            if missing or extra:
                own = [name for name in samples_schema().names if name not in _ROW_COLUMNS]
                raise SchemaError(
                    f"unit {self.unit!r}: row of sample {key!r} lacks columns {sorted(missing)} and has extra "
                    f"columns {sorted(extra)}; the writer sets {own}"
                )
        n = len(keys)
        columns = {
            "key": keys,
            **{name: [value] * n for name, value in self._fixed.items()},
            **{name: [r[name] for r in rows] for name in _ROW_COLUMNS},
            "status": [status] * n,
            "error": error if isinstance(error, list) else [error] * n,
            "row": row if row is not None else [None] * n,
        }
        return build_table(columns, samples_schema())


def _fsync(path: str) -> None:
    """fsync a local file or directory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
