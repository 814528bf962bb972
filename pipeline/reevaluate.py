"""Evaluating an output's stored maps again (``daam-pipeline evaluate OUT``).

The evaluation table is computed during the run, from the float32 maps before they are stored. With the default
``output.dtype: float16`` the stored maps are rounded to 11 significant bits, and a re-evaluation from them can
rank near-equal patches differently, so some AUCs differ from the table's. This module evaluates the stored final
maps of every ok sample with the job's own model, preprocessing and ``evaluate:`` settings (the reference maps
are not stored and are left out), and compares the result with the table.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from pipeline.config import JobConfig
from pipeline.engine.transfer import move_tree
from pipeline.errors import ConfigError, StoreError
from pipeline.names import CURVE_COLUMNS, METRIC_COLUMNS, PER_BLOCK_EXPLAINERS, TOP_DOWN_EXPLAINERS
from pipeline.store.output import JOB_FILE
from pipeline.store.results import Results, open_results

__all__ = ["AGREEMENT", "compare_evaluations", "default_destination", "describe", "evaluate_stored"]

logger = logging.getLogger(__name__)

AGREEMENT = 1e-4
"""Two AUCs of a (sample, method) pair agree when they differ by at most this (float32 noise of other batches)."""

_KEYS = ["key", "unit", "method"]


def evaluate_stored(out: Any, *, device: str | None = None, progress: bool = False) -> pd.DataFrame:
    """The evaluation table of an output computed again from its stored maps.

    Args:
        out: The output location (local path or fsspec URL); its ``job.json`` names the model, checkpoint, shards
            and ``evaluate:`` settings.
        device: Where to compute (default: the job's ``device``).
        progress: Show a progress bar over the units.

    Returns:
        The evaluation table's columns (``key``, ``unit``, ``method``, the metrics, the curves), one row per ok
        sample and stored method (``daam`` and the comparison explainers), in unit order.

    Raises:
        EmptyOutputError: no committed unit. ConfigError: the output has no ``job.json`` or its job evaluated
        nothing. StoreError: the output stores no DAAM maps. CheckpointError, ShardNotFoundError: the model or the
        shards are no longer where the job found them.
    """
    from pipeline.worker import UnitWorker

    results = open_results(out)
    results.require_units()
    job = _job(results)
    config = job.evaluate.model_copy(update={"references": ()})  # reference maps are drawn, never stored
    ok = results.samples[results.samples["status"] == "ok"]
    worker = UnitWorker(job, device if device is not None else job.device)
    stage = worker.stages["explain"]
    parts = []
    try:
        units = ok.groupby("unit", sort=True)
        for unit, rows in tqdm(units, total=units.ngroups, desc="evaluate", unit="unit", disable=not progress):
            stored = results.maps_of(rows["key"].tolist(), unit=str(unit))
            finals = _final_maps(stored, job)
            row_of = {key: i for i, key in enumerate(rows["key"])}
            targets = rows["target"].to_numpy(dtype=float, na_value=np.nan)
            with worker.prefetch_batches(str(rows["shard"].iloc[0])) as batches:
                for batch in batches:
                    keep = [i for i, s in enumerate(batch.samples) if s.key in row_of]
                    if not keep:
                        continue
                    samples = [batch.samples[i] for i in keep]
                    where = [row_of[s.key] for s in samples]
                    images = worker.model_input(batch.pixels[keep])
                    target = None
                    if job.mode == "supervised":
                        target = torch.as_tensor(targets[where], device=worker.device).long()
                    # one packed copy each way per batch
                    maps = move_tree(
                        {name: torch.from_numpy(values[where]) for name, values in finals.items()}, worker.device
                    )
                    daam = maps.pop("daam")[:, None]  # the stage evaluates the last block of (B, L, h, w)
                    evaluated = move_tree(stage.evaluate(images, samples, daam, target, maps, config=config))
                    parts.append(_rows([s.key for s in samples], str(unit), evaluated))
    finally:
        worker.close()
    columns = [*_KEYS, *METRIC_COLUMNS, *CURVE_COLUMNS]
    return pd.concat(parts, ignore_index=True)[columns] if parts else pd.DataFrame(columns=columns)


def compare_evaluations(table: pd.DataFrame, again: pd.DataFrame, tolerance: float = AGREEMENT) -> pd.DataFrame:
    """How far a re-evaluation is from the evaluation table, per method and metric.

    Returns:
        One row per method and metric computed in both: ``pairs`` (samples compared), ``differ`` (pairs whose values
        differ by more than ``tolerance``), ``max_abs_diff`` and ``mean_abs_diff``.
    """
    both, metrics = _side_by_side(table, again)
    rows = []
    for method, part in both.groupby("method", sort=False):
        for metric in metrics:
            diff = (part[f"{metric}_again"] - part[metric]).abs().dropna()
            rows.append(
                {
                    "method": method,
                    "metric": metric,
                    "pairs": len(diff),
                    "differ": int((diff > tolerance).sum()),
                    "max_abs_diff": float(diff.max()) if len(diff) else np.nan,
                    "mean_abs_diff": float(diff.mean()) if len(diff) else np.nan,
                }
            )
    return pd.DataFrame(rows, columns=["method", "metric", "pairs", "differ", "max_abs_diff", "mean_abs_diff"])


def describe(table: pd.DataFrame, again: pd.DataFrame) -> str:
    """What ``daam-pipeline evaluate`` prints: the re-evaluation's means per method, then how far it is from the
    evaluation table."""
    from pipeline.summaries import summarise

    shown = {"float_format": lambda v: f"{v:.4f}"}
    compared = compare_evaluations(table, again)
    lines = [
        "means of the stored maps' evaluation:",
        summarise(again.drop(columns=list(CURVE_COLUMNS))).to_string(**shown),
        f"against the evaluation table (computed from the float32 maps before storage; values within {AGREEMENT:g} "
        "agree):",
        compared.to_string(index=False, **shown),
    ]
    lines += [
        f"{method}: {n} of {len(again[again.method == method])} samples differ in some metric"
        for method, n in (_pairs_that_differ(table, again).items())
    ]
    return "\n".join(lines)


def _pairs_that_differ(table: pd.DataFrame, again: pd.DataFrame, tolerance: float = AGREEMENT) -> pd.Series:
    """Per method, the (sample, method) pairs with any metric differing by more than ``tolerance``."""
    both, metrics = _side_by_side(table, again)
    diff = pd.concat([(both[f"{m}_again"] - both[m]).abs() > tolerance for m in metrics], axis=1).any(axis=1)
    return diff.groupby(both["method"], sort=False).sum().astype(int)


def _side_by_side(table: pd.DataFrame, again: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The two evaluations' (sample, method) rows joined (``metric`` and ``metric_again``), on the metrics the
    re-evaluation computed."""
    metrics = [c for c in METRIC_COLUMNS if c in again and again[c].notna().any()]
    both = table[[*_KEYS, *metrics]].merge(again[[*_KEYS, *metrics]], on=_KEYS, suffixes=("", "_again"))
    return both, metrics


def default_destination(results: Results) -> Path:
    """Where ``daam-pipeline evaluate`` writes the table: ``OUT/evaluation_stored.parquet`` (``./`` for a remote
    output)."""
    name = "evaluation_stored.parquet"
    return Path(results.output.root) / name if results.output.is_local else Path(name)


def _job(results: Results) -> JobConfig:
    from pipeline.viz.source import read_job

    written = read_job(results)
    if written is None:
        raise ConfigError(f"{results.output.url} has no {JOB_FILE}: the model and shards to evaluate with are unknown")
    job = JobConfig.model_validate({k: v for k, v in written.items() if k != "fingerprint"})
    if job.evaluate is None:
        raise ConfigError(f"the job of {results.output.url} has no `evaluate:` section: there is nothing to compare")
    return job


def _final_maps(stored: dict[str, np.ndarray], job: JobConfig) -> dict[str, np.ndarray]:
    """Each evaluated method's stored final map, ``(n, h, w)``: D_{L-1} (or the sum of M_l), the explainers'."""
    if "daam" in stored:
        finals = {"daam": stored["daam"][:, -1]}
    elif "block_maps" in stored:
        finals = {"daam": stored["block_maps"].sum(axis=1)}
    else:
        raise StoreError("the output stores neither daam nor block_maps (output.arrays): no DAAM map to evaluate")
    for name in job.comparison_explainers:
        if name in TOP_DOWN_EXPLAINERS:  # the method's map: the positive relevance at the input (stored signed)
            finals[name] = np.maximum(stored[f"{name}_input"], 0)
        else:
            finals[name] = stored[name][:, -1] if name in PER_BLOCK_EXPLAINERS else stored[name]
    return finals


def _rows(keys: list[str], unit: str, evaluated: dict[str, dict[str, torch.Tensor]]) -> pd.DataFrame:
    frames = []
    for method, values in evaluated.items():
        columns: dict[str, Any] = {"key": keys, "unit": unit, "method": method}
        for name, value in values.items():
            array = value.float().numpy()  # on the host already
            columns[name] = list(array) if array.ndim > 1 else array
        frames.append(pd.DataFrame(columns))
    table = pd.concat(frames, ignore_index=True)
    for column in (*METRIC_COLUMNS, *CURVE_COLUMNS):
        if column not in table:
            table[column] = np.nan if column in METRIC_COLUMNS else None
    return table
