"""Dataset-level tables of an output, with pandas: what ``run`` and ``summary`` print and the report shows.

Blocks are numbered from 0, as in every table of an output.
"""

from __future__ import annotations

import pandas as pd

from pipeline.errors import SchemaError
from pipeline.names import REFERENCE_MAPS

__all__ = ["headline_tables", "label_accuracy", "summarise", "summarise_blocks"]

_SUMMARY_ROWS = {"daam": "DAAM", "random": "random", "centre": "centre prior"}
_SUMMARY_COLUMNS = {"pointing_hit": "pointing_accuracy"}  # the mean of hits is the pointing accuracy
_KEYS = ("key", "unit", "method")


def label_accuracy(samples: pd.DataFrame) -> float | None:
    """Share of the ok, labelled samples whose ``predicted`` class is their ``label`` (top-1 accuracy, or k-NN
    accuracy in self-supervised jobs); None when no such sample has a prediction."""
    scored = samples[(samples.status == "ok") & samples.label.notna() & samples.predicted.notna()]
    return float((scored.predicted == scored.label).mean()) if len(scored) else None


def summarise(evaluation: pd.DataFrame) -> pd.DataFrame:
    """Per-method means of the evaluation table (NaN skipped): the headline table.

    Args:
        evaluation: The evaluation table, one row per sample and ``method`` (``open_results(OUT).evaluation``).

    Returns:
        One row per method (DAAM first, then the references, then any other explainer); a column per metric
        column of the table, in its order (every numeric column but ``key``, ``unit``, ``method``; ``pointing_hit``
        as ``pointing_accuracy``: ``pointing_accuracy``, ``box_energy``, ``deletion_auc``, ``insertion_auc`` and
        the perturbation AUCs today), then ``samples``, the rows of the method.

    Raises:
        SchemaError: the table lacks the ``method`` column or every metric column.
    """
    metrics = [c for c in evaluation.columns if c not in _KEYS and pd.api.types.is_numeric_dtype(evaluation[c])]
    if "method" not in evaluation or not metrics:
        raise SchemaError(f"not an evaluation table: columns {list(evaluation.columns)}")
    grouped = evaluation.groupby("method", sort=False)
    table = grouped[metrics].mean().rename(columns=_SUMMARY_COLUMNS)
    table["samples"] = grouped.size()
    first = ("daam", *REFERENCE_MAPS)
    order = [m for m in first if m in table.index] + sorted(set(table.index) - set(first))
    return table.loc[order].rename(index=_SUMMARY_ROWS).rename_axis("method")


def summarise_blocks(blocks: pd.DataFrame) -> pd.DataFrame:
    """Localisation per block from the blocks table: mean pointing accuracy and box energy (NaN skipped).

    Returns:
        One row per ``block``; columns ``map_pointing_accuracy``, ``map_box_energy`` (block maps M_l) and
        ``daam_pointing_accuracy``, ``daam_box_energy`` (accumulated maps D_l).
    """
    columns = {
        "map_point_hit": "map_pointing_accuracy",
        "map_box_energy": "map_box_energy",
        "daam_point_hit": "daam_pointing_accuracy",
        "daam_box_energy": "daam_box_energy",
    }
    missing = [c for c in ("block", *columns) if c not in blocks]
    if missing:
        raise SchemaError(f"blocks table lacks columns {missing}")
    return blocks.groupby("block")[list(columns)].mean().rename(columns=columns)


def headline_tables(out: str) -> str:
    """The tables a finished job prints: per-block localisation of M_l and D_l where boxes exist, and the
    per-method evaluation (DAAM against the reference maps) when the job evaluated.
    """
    from pipeline.store.results import open_results

    results = open_results(out)
    samples = results.samples
    ok = samples[samples.status == "ok"]
    parts = [f"{len(ok)} of {len(samples)} samples explained in {out}"]
    if (accuracy := label_accuracy(samples)) is not None:
        parts.append(f"accuracy of `predicted` against `label`: {accuracy:.4f}")
    blocks = results.blocks
    if len(blocks) and blocks.daam_box_energy.notna().any():
        per_block = summarise_blocks(blocks)
        parts.append("localisation per block (boxes), accumulated maps D_l and block maps M_l:")
        parts.append(per_block.to_string(float_format=lambda v: f"{v:.3f}"))
    evaluation = results.evaluation
    if len(evaluation):
        parts.append("final map against reference maps:")
        parts.append(summarise(evaluation).to_string(float_format=lambda v: f"{v:.3f}"))
    return "\n".join(parts)
