"""Dataset-level tables: how early each method reaches its final ranking; segmentation per block; the sanity
check's curves."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.summaries import first_stable_block, ranking_reached, summarise_blocks, summarise_sanity


def per_block(values: dict[str, list[float]], column: str, **extra: str) -> pd.DataFrame:
    rows = [
        {"unit": "u", "key": key, "block": block, column: value, **extra}
        for key, series in values.items()
        for block, value in enumerate(series)
    ]
    return pd.DataFrame(rows)


def test_first_stable_block_needs_every_later_block():
    table = per_block(
        {
            "early": [0.95, 0.97, 1.0, 1.0],  # from block 0
            "dips": [0.95, 0.5, 0.92, 1.0],  # block 1 breaks the run: from block 2
            "late": [0.1, 0.2, 0.3, 1.0],  # only the last block
            "zero": [np.nan] * 4,  # an all-zero final map: undefined
        },
        "iou",
    )
    first = first_stable_block(table, "iou", 0.9)
    assert first.loc[("u", "early")] == 0 and first.loc[("u", "dips")] == 2 and first.loc[("u", "late")] == 3
    assert pd.isna(first.loc[("u", "zero")]) and str(first.dtype) == "Int16"


def test_ranking_reached_per_method():
    blocks = per_block({"a": [0.95, 1, 1, 1], "b": [0.2, 0.95, 1, 1]}, "daam_iou_final")
    rollout = per_block({"a": [0.1, 0.2, 0.3, 1], "b": [0.1, 0.2, 0.95, 1]}, "iou_final", explainer="rollout")
    attention = per_block({"a": [0.9, 0.9, 0.9, 1], "b": [np.nan] * 4}, "iou_final", explainer="attention")
    table = ranking_reached(blocks, pd.concat([rollout, attention]), threshold=0.9)
    assert list(table.index) == ["DAAM", "attention", "rollout"]
    assert table.loc["DAAM"].tolist() == [0.5, 0.5, (1 / 4 + 2 / 4) / 2, 2]
    assert table.loc["rollout", "median_block"] == 2.5 and table.loc["rollout", "mean_depth"] == (4 / 4 + 3 / 4) / 2
    assert table.loc["attention", "mean_block"] == 0 and table.loc["attention", "samples"] == 1
    empty = ranking_reached(blocks.iloc[:0], rollout.iloc[:0])
    assert empty.empty and list(empty.columns) == ["median_block", "mean_block", "mean_depth", "samples"]


def test_summarise_blocks_adds_the_mask_columns_where_samples_have_masks():
    blocks = per_block({"a": [1.0, 0.0], "b": [0.0, 1.0]}, "map_point_hit")
    for column in ("map_box_energy", "daam_point_hit", "daam_box_energy"):
        blocks[column] = 0.5
    assert list(summarise_blocks(blocks).columns)[-1] == "daam_box_energy"
    blocks["daam_mask_miou"] = [0.2, 0.4, np.nan, 0.8]  # sample b has no mask at block 0
    blocks["daam_mask_ap"] = np.nan  # no sample has it: left out
    table = summarise_blocks(blocks)
    assert list(table.columns)[-1] == "daam_mask_miou" and table["daam_mask_miou"].tolist() == pytest.approx([0.2, 0.6])


def test_summarise_sanity_takes_the_final_map_per_step():
    rows = [
        {"unit": "u", "key": key, "explainer": name, "randomised": k, "block": block, "spearman": value, "ssim": value}
        for key, offset in (("a", 0.0), ("b", 0.2))
        for name in ("rollout", "daam")
        for k in (1, 2)
        for block, value in ((0, 9.0), (1, 1.0 - 0.4 * k + offset))
    ]
    table = summarise_sanity(pd.DataFrame(rows))
    assert list(table.index) == [("daam", 1), ("daam", 2), ("rollout", 1), ("rollout", 2)]
    assert table["spearman"].tolist() == pytest.approx([0.7, 0.3, 0.7, 0.3])  # block 1, the last: mean of a and b
    assert table["samples"].tolist() == [2] * 4
    assert summarise_sanity(pd.DataFrame(columns=rows[0].keys())).empty


def test_top_down_maps_settle_from_block_0_up():
    """LRP's block maps are relevance at each block's input and its final map the input map: the settle block is
    the last block up to which every block from 0 is within the threshold."""
    table = per_block(
        {
            "deep": [1.0, 0.97, 0.95, 0.92],  # every block: the last one
            "dips": [1.0, 0.5, 0.92, 0.1],  # block 1 breaks the run from block 0: block 0 only
            "none": [0.3, 0.95, 1.0, 1.0],  # not even block 0: undefined
        },
        "iou_final",
        explainer="cplrp",
    )
    last = first_stable_block(table, "iou_final", 0.9, top_down=True)
    assert last.loc[("u", "deep")] == 3 and last.loc[("u", "dips")] == 0 and pd.isna(last.loc[("u", "none")])
    blocks = per_block({k: [1.0] * 4 for k in ("deep", "dips", "none")}, "daam_iou_final")
    reached = ranking_reached(blocks, table, threshold=0.9)
    assert reached.loc["cplrp"].tolist() == [1.5, 1.5, (4 / 4 + 1 / 4) / 2, 2]
