"""Dataset-level tables of an output, with pandas: what ``run`` and ``summary`` print and the report shows.

Blocks are numbered from 0, as in every table of an output.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from pipeline.errors import SchemaError
from pipeline.names import REFERENCE_MAPS, SANITY_COLUMNS, TOP_DOWN_EXPLAINERS

__all__ = [
    "RANKING_IOU",
    "first_stable_block",
    "headline_tables",
    "label_accuracy",
    "ranking_reached",
    "summarise",
    "summarise_blocks",
    "summarise_sanity",
]

_SUMMARY_ROWS = {"daam": "DAAM", "random": "random", "centre": "centre prior"}
_SUMMARY_COLUMNS = {"pointing_hit": "pointing_accuracy"}  # the mean of hits is the pointing accuracy
_KEYS = ("key", "unit", "method")
_SAMPLE = ["unit", "key"]

RANKING_IOU = 0.9
"""IoU of a block's top-20% patches with the final map's from which a method's ranking counts as reached."""


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
    """Localisation per block from the blocks table: mean pointing accuracy and box energy (NaN skipped), and the
    accumulated maps' segmentation scores where the samples have masks.

    Returns:
        One row per ``block``; columns ``map_pointing_accuracy``, ``map_box_energy`` (block maps M_l) and
        ``daam_pointing_accuracy``, ``daam_box_energy`` (accumulated maps D_l); then ``daam_mask_pixel_accuracy``,
        ``daam_mask_miou`` and ``daam_mask_ap`` when any sample has a mask.
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
    masks = [c for c in _MASK_COLUMNS if c in blocks and blocks[c].notna().any()]
    return blocks.groupby("block")[[*columns, *masks]].mean().rename(columns=columns)


_MASK_COLUMNS = ("daam_mask_pixel_accuracy", "daam_mask_miou", "daam_mask_ap")


def summarise_sanity(sanity: pd.DataFrame) -> pd.DataFrame:
    """How similar each explainer's final map stays as blocks are randomised from the top (the sanity table).

    Returns:
        One row per explainer (DAAM first) and number of blocks randomised (``randomised``, 1 .. L): the mean
        ``spearman`` and ``ssim`` (NaN skipped) of the final map (block L-1), and ``samples``.
    """
    if sanity.empty:
        return pd.DataFrame(columns=[*SANITY_COLUMNS, "samples"])
    final = sanity[sanity["block"] == sanity["block"].max()]
    grouped = final.groupby(["explainer", "randomised"])
    table = grouped[list(SANITY_COLUMNS)].mean()
    table["samples"] = grouped.size()
    order = sorted(table.index.get_level_values(0).unique(), key=lambda name: (name != "daam", name))
    return table.reindex(order, level=0)


def first_stable_block(table: pd.DataFrame, column: str, threshold: float, *, top_down: bool = False) -> pd.Series:
    """Per sample of a per-block table: the first block from which ``column >= threshold`` holds at that block and
    every later one; NA where it never holds at the last block (a NaN statistic: an all-zero final map).

    With ``top_down`` (maps read from the last block down, whose final map is the input map: AttnLRP, CP-LRP), the
    same from the other end: the last block up to which it holds at that block and every earlier one; NA where it
    does not hold at block 0.

    Args:
        table: Rows of ``unit``, ``key``, ``block`` and ``column`` (the blocks table, or one explainer's rows of the
            explainer_blocks table).

    Returns:
        Nullable Int16, indexed by ``(unit, key)``.
    """
    ordered = table[[*_SAMPLE, "block", column]].sort_values([*_SAMPLE, "block"], ascending=[True, True, top_down])
    close = (ordered[column] >= threshold).astype("int8")
    groups = [ordered["unit"], ordered["key"]]
    held = close.groupby(groups).cummin().astype(bool)  # from the final map's end, while every block holds
    blocks = ordered["block"].where(held).groupby(groups)
    return (blocks.max() if top_down else blocks.min()).round().astype("Int16").rename_axis(_SAMPLE)


def ranking_reached(
    blocks: pd.DataFrame, explainer_blocks: pd.DataFrame, threshold: float = RANKING_IOU
) -> pd.DataFrame:
    """How early each method's final ranking of the patches is reached: per sample, the first block from which the
    top-20% patches of the method's block-l map overlap those of its final map with IoU >= ``threshold`` at every
    later block (``daam_iou_final`` for DAAM's D_l, ``iou_final`` for each explainer with per-block maps). For the
    explainers read from the last block down (:data:`~pipeline.names.TOP_DOWN_EXPLAINERS`, whose final map is the
    input map), the last block up to which it holds at every earlier block: how deep the input map's ranking is
    already there.

    Returns:
        One row per method (DAAM first): ``median_block``, ``mean_block``, ``mean_depth`` (the block + 1 over the
        number of blocks, so 1.0 means only at the last block) and ``samples`` (samples where it is defined).
    """
    if blocks.empty:
        return pd.DataFrame(columns=["median_block", "mean_block", "mean_depth", "samples"])
    depth = int(blocks["block"].max()) + 1
    reached = {"DAAM": first_stable_block(blocks, "daam_iou_final", threshold)}
    if len(explainer_blocks):
        for name, rows in explainer_blocks.groupby("explainer", sort=True):
            top_down = name in TOP_DOWN_EXPLAINERS
            reached[str(name)] = first_stable_block(rows, "iou_final", threshold, top_down=top_down)
    table = pd.DataFrame(
        {
            method: {
                "median_block": first.median(),
                "mean_block": first.mean(),
                "mean_depth": ((first + 1) / depth).mean(),
                "samples": int(first.notna().sum()),
            }
            for method, first in reached.items()
        }
    ).T
    return table.astype({"samples": int}).rename_axis("method")


def headline_tables(out: Any) -> str:
    """The tables a finished job prints: per-block localisation of M_l and D_l where boxes exist, and the
    per-method evaluation (DAAM against the reference maps) when the job evaluated.
    """
    from pipeline.store.results import open_results

    results = open_results(out)
    samples = results.samples
    ok = samples[samples.status == "ok"]
    parts = [f"{len(ok)} of {len(samples)} samples explained in {results.output.url}"]
    if (accuracy := label_accuracy(samples)) is not None:
        parts.append(f"accuracy of `predicted` against `label`: {accuracy:.4f}")
    blocks = results.blocks
    if len(blocks) and blocks.daam_box_energy.notna().any():
        per_block = summarise_blocks(blocks)
        parts.append("localisation per block (boxes, and masks where samples have them), maps D_l and M_l:")
        parts.append(per_block.to_string(float_format=lambda v: f"{v:.3f}"))
    if len(blocks):
        parts.append(
            f"block from which each method's top-20% patches stay within IoU {RANKING_IOU} of its final map's:"
        )
        parts.append(ranking_reached(blocks, results.explainer_blocks).to_string(float_format=lambda v: f"{v:.3f}"))
    evaluation = results.evaluation
    if len(evaluation):
        parts.append("final map against reference maps:")
        parts.append(summarise(evaluation).to_string(float_format=lambda v: f"{v:.3f}"))
    sanity = results.sanity
    if len(sanity):
        parts.append("sanity check, cascading randomisation: mean similarity of the final map to the trained model's")
        parts.append("as blocks are randomised from the top (1 .. L blocks):")
        table = summarise_sanity(sanity)[list(SANITY_COLUMNS)].unstack("randomised")
        parts.append(table.to_string(float_format=lambda v: f"{v:.3f}"))
    return "\n".join(parts)
