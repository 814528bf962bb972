"""The explain stage's writer of one unit: maps to Zarr, samples and statistics to Parquet, then the commit.

Layout under ``OUT`` (:data:`~pipeline.store.units.EXPLAIN_PARTS`)::

    maps.zarr/<unit>/                  the unit's Zarr group, written at commit (pipeline.store.zarr_store)
    samples/<unit>.parquet             one row per sample, ok or failed (pipeline.store.tables)
    blocks/<unit>.parquet              one row per ok sample and block
    evaluation/<unit>.parquet          one row per sample and evaluated method (jobs that evaluate)
    explainer_blocks/<unit>.parquet    comparison explainers' per-block statistics (jobs that run them)
    sanity/<unit>.parquet              map similarities under cascading randomisation (jobs with evaluate.sanity)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from numpy.typing import ArrayLike

from pipeline.config import StoreOptions
from pipeline.errors import SchemaError
from pipeline.names import METRIC_COLUMNS, SANITY_COLUMNS
from pipeline.store.output import OutputLike, as_output
from pipeline.store.schemas import BLOCKS, EVALUATION, EXPLAINER_BLOCKS, SAMPLES, SANITY, TABLE_SCHEMAS
from pipeline.store.tables import build_table, parquet_bytes
from pipeline.store.units import EXPLAIN_PARTS, UnitTransaction
from pipeline.store.zarr_store import MapLayout, MapStore

__all__ = ["SAMPLE_COLUMNS", "UnitWriter"]

logger = logging.getLogger(__name__)

SAMPLE_COLUMNS = ("label", "predicted", "score", "target", "width", "height", "n_boxes")
"""Samples columns a stage gives per sample; the writer fills the others (key, shard, unit, status, row, ...)."""


class UnitWriter:
    """Writes one unit of the explain stage: maps, samples and statistics of its batches, then the commit.

    Creating the writer starts the unit afresh (:class:`~pipeline.store.units.UnitTransaction`) and makes sure
    ``maps.zarr`` exists with this job's attributes.

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
        self._transaction = UnitTransaction(self.output, EXPLAIN_PARTS, unit)
        options = store_options or StoreOptions()
        maps = MapStore.open(self.output.url_of(self.output.path("maps.zarr")), self.output.storage_options)
        maps.init(layout, options)
        self._maps = maps.unit_writer(unit, layout, options)
        self._fixed = {"shard": shard, "unit": unit, "model": layout.model, "job": job}
        self._tables: dict[str, list[pa.Table]] = {part: [] for part in TABLE_SCHEMAS}
        self.failed = 0

    @property
    def ok(self) -> int:
        """Samples written with maps so far."""
        return self._maps.rows

    def write_batch(
        self,
        keys: Sequence[str],
        arrays: Mapping[str, ArrayLike | None],
        columns: Mapping[str, Sequence[Any]],
        block_stats: Mapping[str, ArrayLike],
        explainer_block_stats: Mapping[str, Mapping[str, ArrayLike]] | None = None,
        evaluation: Mapping[str, Mapping[str, ArrayLike]] | None = None,
        sanity: Mapping[str, Mapping[str, ArrayLike]] | None = None,
        *,
        rounded: bool = False,
    ) -> None:
        """Write a batch of ok samples.

        Args:
            keys: ``B`` sample keys.
            arrays: Float32 arrays by name (``block_maps`` ``(B, L, h, w)``, ``daam``, ``coefficients``
                ``(B, L, C)``, comparison explainers' maps); those the store options do not keep may be absent.
            columns: The :data:`SAMPLE_COLUMNS`, each ``B`` values (None where null).
            block_stats: :func:`pipeline.stats.block_statistics` on the host, each ``(B, L)``.
            rounded: ``arrays`` are already rounded to the storage precision (see :meth:`UnitMapWriter.append`).
            explainer_block_stats: ``{explainer: {statistic: (B, L)}}`` of per-block comparison explainers.
            evaluation: ``{method: {metric: (B,)}}``; metrics a job does not compute are absent (stored as NaN).
            sanity: ``{explainer: {"spearman"|"ssim": (S, K, L)}}`` of the batch's first ``S`` samples, ``K``
                randomisation steps (1 .. K blocks randomised from the top), ``L`` blocks of the map (1 for a single
                map, compared at the last block).

        Raises:
            SchemaError: columns, statistics or arrays that do not match the schemas or the layout.
        """
        keys = [str(k) for k in keys]
        n, first = len(keys), self._maps.rows
        self._tables["samples"].append(
            self._sample_table(keys, columns, status="ok", error=None, row=np.arange(first, first + n, dtype=np.int32))
        )
        self._tables["blocks"].append(self._block_table(keys, {}, block_stats, BLOCKS))
        for explainer, stats in (explainer_block_stats or {}).items():
            table = self._block_table(keys, {"explainer": explainer}, stats, EXPLAINER_BLOCKS)
            self._tables["explainer_blocks"].append(table)
        for method, metrics in (evaluation or {}).items():
            unknown = set(metrics) - set(METRIC_COLUMNS)
            if unknown:
                raise SchemaError(f"unit {self.unit!r}: unknown evaluation metrics {sorted(unknown)}")
            values = {m: np.asarray(metrics.get(m, np.full(n, np.nan)), np.float32) for m in METRIC_COLUMNS}
            table = {"key": keys, "unit": [self.unit] * n, "method": [method] * n, **values}
            self._tables["evaluation"].append(build_table(table, EVALUATION))
        for explainer, values in (sanity or {}).items():
            self._tables["sanity"].append(self._sanity_table(keys, explainer, values))
        self._maps.append(keys, arrays, rounded=rounded)

    def _sanity_table(self, keys: list[str], explainer: str, values: Mapping[str, ArrayLike]) -> pa.Table:
        """One row per sample, randomisation step and block of an explainer's similarities ``(S, K, L)``."""
        arrays = {name: np.asarray(values[name], np.float32) for name in SANITY_COLUMNS}
        samples, steps, blocks = arrays[SANITY_COLUMNS[0]].shape
        if samples > len(keys) or any(a.shape != (samples, steps, blocks) for a in arrays.values()):
            raise SchemaError(f"unit {self.unit!r}: sanity values of {explainer!r} do not fit {len(keys)} keys")
        first_block = self.layout.n_blocks - blocks  # a single map sits at the last block
        grid = np.indices((samples, steps, blocks)).reshape(3, -1)
        columns = {
            "key": np.asarray(keys[:samples])[grid[0]],
            "unit": [self.unit] * grid.shape[1],
            "explainer": [explainer] * grid.shape[1],
            "randomised": grid[1] + 1,
            "block": grid[2] + first_block,
            **{name: array.reshape(-1) for name, array in arrays.items()},
        }
        return build_table(columns, SANITY)

    def _block_table(
        self, keys: list[str], labels: Mapping[str, Any], stats: Mapping[str, ArrayLike], schema: pa.Schema
    ) -> pa.Table:
        """One row per sample and block: key, unit, any constant ``labels`` columns, block, statistics."""
        n, n_blocks = len(keys), self.layout.n_blocks
        columns: dict[str, Any] = {"key": np.repeat(keys, n_blocks), "unit": [self.unit] * (n * n_blocks)}
        columns |= {name: [value] * (n * n_blocks) for name, value in labels.items()}
        columns["block"] = np.tile(np.arange(n_blocks), n)
        for name, values in stats.items():
            values = np.asarray(values)
            if values.shape != (n, n_blocks):
                raise SchemaError(
                    f"unit {self.unit!r}: statistic {name!r} has shape {values.shape}, expected {(n, n_blocks)}"
                )
            columns[name] = values.reshape(-1)
        return build_table(columns, schema)

    def write_failed(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Record samples that failed before they had maps.

        Args:
            rows: Dicts with ``key`` and ``error`` (the message), and any of :data:`SAMPLE_COLUMNS` known for the
                sample (``label``, ``width``, ...); the others are null.

        Raises:
            SchemaError: a row without key or error, or with other columns.
        """
        if not rows:
            return
        for r in rows:
            if "key" not in r or "error" not in r:
                raise SchemaError(f"unit {self.unit!r}: failed-sample row {dict(r)} needs 'key' and 'error'")
        keys = [str(r["key"]) for r in rows]
        columns = {name: [r.get(name) for r in rows] for name in SAMPLE_COLUMNS}
        extra = {name for r in rows for name in r} - {"key", "error", *SAMPLE_COLUMNS}
        if extra:
            raise SchemaError(f"unit {self.unit!r}: failed-sample rows have unknown columns {sorted(extra)}")
        self._tables["samples"].append(
            self._sample_table(keys, columns, status="failed", error=[str(r["error"]) for r in rows], row=None)
        )
        self.failed += len(rows)

    def commit(self, summary: Mapping[str, Any] | None = None, *, incomplete: str | None = None) -> dict[str, Any]:
        """Flush the maps, write the tables, make them durable, then write the unit's marker.

        Args:
            summary: Extra JSON-serialisable facts for the marker (timings, device, ...).
            incomplete: Why the unit's shard ended early: the unit is committed as incomplete (kept for readers,
                redone by the next run).

        Returns:
            The marker's content: ``unit``, ``committed_at``, ``complete``, the counts ``samples``, ``ok`` and
            ``failed``, and the summary.
        """
        self._maps.flush()
        for part, schema in TABLE_SCHEMAS.items():
            tables = self._tables[part]
            if part in EXPLAIN_PARTS.optional and not tables:
                continue
            table = pa.concat_tables(tables) if tables else schema.empty_table()
            self._transaction.put(part, parquet_bytes(table, schema))
        self._transaction.sync("maps")
        counts = {
            "samples": self._maps.rows + self.failed,
            "ok": self._maps.rows,
            "failed": self.failed,
        }
        marker = self._transaction.commit({**(summary or {}), **counts}, incomplete=incomplete)
        logger.info("committed unit %s: %s", self.unit, counts)
        return marker

    def _sample_table(
        self, keys: list[str], columns: Mapping[str, Sequence[Any]], *, status: str, error: Any, row: Any
    ) -> pa.Table:
        missing, extra = set(SAMPLE_COLUMNS) - set(columns), set(columns) - set(SAMPLE_COLUMNS)
        if missing or extra:
            raise SchemaError(
                f"unit {self.unit!r}: sample columns lack {sorted(missing)} and have extra {sorted(extra)}; "
                f"the writer sets {[n for n in SAMPLES.names if n not in SAMPLE_COLUMNS]}"
            )
        n = len(keys)
        for name in SAMPLE_COLUMNS:
            if len(columns[name]) != n:
                raise SchemaError(f"unit {self.unit!r}: {len(columns[name])} values of {name!r} for {n} keys")
        table = {
            "key": keys,
            **{name: [value] * n for name, value in self._fixed.items()},
            **{name: columns[name] for name in SAMPLE_COLUMNS},
            "status": [status] * n,
            "error": error if isinstance(error, list) else [error] * n,
            "row": row if row is not None else [None] * n,
        }
        return build_table(table, SAMPLES)
