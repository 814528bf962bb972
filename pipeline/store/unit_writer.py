"""The explain stage's writer of one unit: maps to Zarr, samples and statistics to Parquet, then the commit.

Layout under ``OUT`` (:data:`~pipeline.store.units.EXPLAIN_PARTS`)::

    maps.zarr/<unit>/                  the unit's Zarr group, encoded at commit (pipeline.store.zarr_store)
    samples/<unit>.parquet             one row per sample, ok or failed (pipeline.store.tables)
    blocks/<unit>.parquet              one row per ok sample and block
    evaluation/<unit>.parquet          one row per sample and evaluated method (jobs that evaluate)
    explainer_blocks/<unit>.parquet    comparison explainers' per-block statistics (jobs that run them)
    sanity/<unit>.parquet              map similarities under cascading randomisation (jobs with evaluate.sanity)
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from numpy.typing import ArrayLike

from pipeline.config import StoreOptions
from pipeline.errors import SchemaError
from pipeline.names import CURVE_COLUMNS, METRIC_COLUMNS, SANITY_COLUMNS
from pipeline.store.output import OutputLike, as_output
from pipeline.store.schemas import BLOCKS, EVALUATION, EXPLAINER_BLOCKS, SAMPLES, SANITY, TABLE_SCHEMAS
from pipeline.store.tables import build_table, parquet_bytes
from pipeline.store.units import EXPLAIN_PARTS, UnitTransaction
from pipeline.store.zarr_store import MapLayout, MapStore, UnitMapWriter

if TYPE_CHECKING:
    from torch import Tensor

    from pipeline.data.decode import DecodedBatch, DecodedSample
    from pipeline.store.lease import Fence

__all__ = ["SAMPLE_COLUMNS", "ExplainedBatch", "UnitWriter", "encoding_slots"]

logger = logging.getLogger(__name__)

SAMPLE_COLUMNS = ("label", "predicted", "score", "target", "width", "height", "n_boxes")
"""Samples columns a stage gives per sample; the writer fills the others (key, shard, unit, status, row, ...)."""


@dataclass(frozen=True)
class ExplainedBatch:
    """Everything a unit stores of one batch of B samples: made on the device by the explain stage, written from the
    host (torch tensors or numpy arrays) by :class:`UnitWriter`.

    Attributes:
        arrays: The stored arrays by name: ``block_maps`` and ``daam`` ``(B, L, h, w)``, ``coefficients``
            ``(B, L, C)``; the comparison explainers' arrays (:data:`pipeline.names.EXPLAINER_ARRAYS`).
        predicted: ``(B,)`` predicted (or k-NN voted) class; -1 where there is none (a label-free bank).
        score: ``(B,)`` its softmax probability (or vote share); NaN where there is none.
        target: ``(B,)`` explained class, None in self-supervised mode.
        block_stats: ``{statistic: (B, L)}`` of DAAM (:func:`pipeline.stats.block_statistics`).
        explainer_block_stats: ``{explainer: {statistic: (B, L)}}`` of the per-block comparison explainers.
        evaluation: ``{method: {metric: (B,)}}`` when the job evaluates, else empty; metrics a job does not
            compute are absent (stored as NaN); the curves of the AUCs (``deletion_curve``, ...) are
            ``(B, points)`` (absent: stored as null).
        sanity: ``{explainer: {"spearman"|"ssim": (S, K, L')}}`` of the batch's first ``S`` samples under
            cascading randomisation (``evaluate.sanity``), else empty: ``K`` steps (1 .. K blocks randomised from
            the top), ``L'`` blocks of the explainer's maps (1 for a single map, compared at the last block).
        rounded: ``arrays`` are already rounded to the storage precision (``output.dtype``; the explain stage rounds
            on the device), so the writer skips that pass.
    """

    arrays: Mapping[str, Tensor | np.ndarray]
    predicted: Tensor | np.ndarray
    score: Tensor | np.ndarray
    target: Tensor | np.ndarray | None
    block_stats: Mapping[str, Tensor | np.ndarray]
    explainer_block_stats: Mapping[str, Mapping[str, Tensor | np.ndarray]] = field(default_factory=dict)
    evaluation: Mapping[str, Mapping[str, Tensor | np.ndarray]] = field(default_factory=dict)
    sanity: Mapping[str, Mapping[str, Tensor | np.ndarray]] = field(default_factory=dict)
    rounded: bool = False


def encoding_slots(cores: int | None = None) -> threading.BoundedSemaphore:
    """What a worker's units encode their files under (``UnitWriter(encoding=...)``): as many encodings at once as
    the cores hold at two cores each (zarr encodes a unit's arrays in threads: 1.3 cores busy on 2), at least one.

    Where commits in flight would encode more units at once than that, they slice the same cores, finish together and
    then all wait on storage, leaving the cores idle; taking turns, one unit encodes while the others' puts wait.

    Args:
        cores: The cores the worker may use; default: this process's CPU affinity.
    """
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return threading.BoundedSemaphore(max(1, cores // 2))


class UnitWriter:
    """Writes one unit of the explain stage: maps, samples and statistics of its batches, then the commit.

    Creating the writer starts the unit afresh (:class:`~pipeline.store.units.UnitTransaction`) and makes sure
    ``maps.zarr`` exists with this job's attributes. Nothing is written before :meth:`commit`, which puts every
    object of the unit at once, then its marker.

    Args:
        out: The output location.
        unit: Unit name, the input shard's file stem.
        layout: Shapes of the engine's outputs.
        shard: URL of the input shard (samples column ``shard``).
        job: Job name (samples column ``job``).
        store_options: How the maps are stored.
        maps: The output's ``maps.zarr``, kept by a worker across its units (its root attributes are then checked
            once); default: opened and checked for this unit.
        fresh: Nothing of the unit exists yet (see :class:`~pipeline.store.units.UnitTransaction`).
        fence: The driver's lease (:class:`~pipeline.store.units.UnitTransaction`); None: unfenced.
        encoding: Held while the commit encodes the unit's files; a worker's units share one
            (:func:`encoding_slots`). Default: none shared, nothing to wait for.

    Raises:
        StoreError: the output holds maps of another configuration, or cannot be written.
        LeaseLostError: the driver's lease was taken by another driver.
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
        maps: MapStore | None = None,
        fresh: bool = False,
        fence: Fence | None = None,
        encoding: contextlib.AbstractContextManager[Any] | None = None,
    ) -> None:
        self.output = as_output(out)
        self.unit = unit
        self.layout = layout
        self._transaction = UnitTransaction(self.output, EXPLAIN_PARTS, unit, fresh=fresh, fence=fence)
        options = store_options or StoreOptions()
        (maps or MapStore(self.output.child("maps.zarr"))).init(layout, options)
        self._maps = UnitMapWriter(unit, layout, options)
        self._fixed = {"shard": shard, "unit": unit, "model": layout.model, "job": job}
        self._tables: dict[str, list[pa.Table]] = {part: [] for part in TABLE_SCHEMAS}
        self._encoding = encoding if encoding is not None else contextlib.nullcontext()
        self.failed = 0

    @property
    def ok(self) -> int:
        """Samples written with maps so far."""
        return self._maps.rows

    def write(self, batch: DecodedBatch, result: ExplainedBatch | None) -> None:
        """Write a batch: its failed samples, then its explained samples (``result``: the host copy of the explain
        stage's result for ``batch.samples``; None when the batch holds failed samples only).

        Raises:
            SchemaError: a result that does not match the schemas or the layout.
        """
        self.write_failed(batch.failed)
        if result is not None:
            self.write_explained(batch.samples, result)

    def write_explained(self, samples: Sequence[DecodedSample], result: ExplainedBatch) -> None:
        """Write explained samples: their maps, samples rows, statistics and evaluation.

        Raises:
            SchemaError: a result that does not match the schemas or the layout.
        """
        keys = [str(s.key) for s in samples]
        n, first = len(keys), self._maps.rows
        predicted, score = np.asarray(result.predicted), np.asarray(result.score)
        columns = {
            **_known_columns(samples),
            "predicted": [int(p) if p >= 0 else None for p in predicted],
            "score": [None if np.isnan(v) else float(v) for v in score],
            "target": np.asarray(result.target).tolist() if result.target is not None else [None] * n,
            "n_boxes": [len(s.boxes) if s.boxes is not None else 0 for s in samples],
        }
        rows = np.arange(first, first + n, dtype=np.int32)
        tables = [("samples", self._sample_table(keys, columns, status="ok", error=None, row=rows))]
        tables.append(("blocks", self._block_table(keys, {}, result.block_stats, BLOCKS)))
        for explainer, stats in result.explainer_block_stats.items():
            tables.append(
                ("explainer_blocks", self._block_table(keys, {"explainer": explainer}, stats, EXPLAINER_BLOCKS))
            )
        for method, metrics in result.evaluation.items():
            unknown = set(metrics) - {*METRIC_COLUMNS, *CURVE_COLUMNS}
            if unknown:
                raise SchemaError(f"unit {self.unit!r}: unknown evaluation metrics {sorted(unknown)}")
            values = {m: np.asarray(metrics.get(m, np.full(n, np.nan)), np.float32) for m in METRIC_COLUMNS}
            curves = {
                c: list(np.asarray(metrics[c], np.float32)) if c in metrics else [None] * n for c in CURVE_COLUMNS
            }
            table = {"key": keys, "unit": [self.unit] * n, "method": [method] * n, **values, **curves}
            tables.append(("evaluation", build_table(table, EVALUATION)))
        for explainer, values in result.sanity.items():
            tables.append(("sanity", self._sanity_table(keys, explainer, values)))
        self._maps.append(keys, result.arrays, rounded=result.rounded)  # last check: nothing of a bad batch is kept
        for part, table in tables:
            self._tables[part].append(table)

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

    def write_failed(self, samples: Sequence[DecodedSample]) -> None:
        """Record samples that failed before they had maps, with their error and what is known of them."""
        if not samples:
            return
        columns = {
            **dict.fromkeys(SAMPLE_COLUMNS, [None] * len(samples)),
            **_known_columns(samples),
            "n_boxes": [None] * len(samples),
        }
        keys = [str(s.key) for s in samples]
        errors = [str(s.error) for s in samples]
        self._tables["samples"].append(self._sample_table(keys, columns, status="failed", error=errors, row=None))
        self.failed += len(samples)

    def commit(self, summary: Mapping[str, Any] | None = None, *, incomplete: str | None = None) -> dict[str, Any]:
        """Encode the maps and the tables, put them all at once (durable when done), then write the unit's marker.

        Args:
            summary: Extra JSON-serialisable facts for the marker (timings, device, ...).
            incomplete: Why the unit's shard ended early: the unit is committed as incomplete (kept for readers,
                redone by the next run).

        Returns:
            The marker's content: ``unit``, ``committed_at``, ``complete``, the counts ``samples``, ``ok`` and
            ``failed``, and the summary.
        """
        ok = self._maps.rows
        with self._encoding:
            files = self._encode()
        self._transaction.write(files)
        del files
        counts = {
            "samples": ok + self.failed,
            "ok": ok,
            "failed": self.failed,
        }
        marker = self._transaction.commit({**(summary or {}), **counts}, incomplete=incomplete)
        logger.info("committed unit %s: %s", self.unit, counts)
        return marker

    def _encode(self) -> dict[str, bytes]:
        """The unit's files: its Zarr group's objects and its Parquet tables, by path under the output."""
        paths = self._transaction.paths
        files = {f"{paths['maps']}/{key}": data for key, data in self._maps.objects().items()}
        for part, schema in TABLE_SCHEMAS.items():
            tables = self._tables[part]
            if part in EXPLAIN_PARTS.optional and not tables:
                continue
            table = pa.concat_tables(tables) if tables else schema.empty_table()
            files[paths[part]] = parquet_bytes(table, schema)
        self._tables = {part: [] for part in TABLE_SCHEMAS}  # what the files hold now: the batches are released
        return files

    def _sample_table(
        self, keys: list[str], columns: Mapping[str, Sequence[Any]], *, status: str, error: Any, row: Any
    ) -> pa.Table:
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


def _known_columns(samples: Sequence[DecodedSample]) -> dict[str, list[Any]]:
    """The samples columns known of any sample, explained or failed: its label and its original size."""
    return {
        "label": [s.label for s in samples],
        "width": [s.size[0] if s.size else None for s in samples],
        "height": [s.size[1] if s.size else None for s in samples],
    }
