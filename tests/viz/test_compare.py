"""The comparison tables of real outputs of models of different depth and patch grid against naive pandas and numpy
computations: per-block curves on relative depth, settle blocks, agreement on partially shared keys, per class,
evaluation metrics; outputs without shared keys; the CLI."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.compare import CURVE_STATISTICS, compare
from pipeline.errors import ConfigError
from pipeline.store.results import open_results
from pipeline.summaries import ranking_reached, summarise

NAMES = ["deep", "fine"]  # crop_output: 4 blocks, 4x4 grid; other_output: 2 blocks, 8x8 grid
SHARED = ["img1_00", "img1_01", "img1_02", "img1_04"]  # img1_03 is corrupt in both; img0_* and img2_* in one each


def test_models_and_the_grid_note(comparison):
    models = comparison.models
    assert list(models.index) == NAMES and models.index.name == "model"
    assert models["blocks"].tolist() == [4, 2] and models["grid"].tolist() == ["4x4", "8x8"]
    assert models["samples"].tolist() == [10, 10] and models["ok"].tolist() == [9, 9]
    assert comparison.grid == (4, 4)
    assert any("area-averaged onto the common 4x4 grid" in note for note in comparison.notes)


def test_curves_are_naive_per_block_statistics_on_relative_depth(comparison, crop_output, other_output):
    for name, out, blocks, side in (("deep", crop_output, 4, 4), ("fine", other_output, 2, 8)):
        table = open_results(out).blocks
        curves = comparison.curves.loc[name]
        stats = list(dict.fromkeys(curves.index.get_level_values("statistic")))
        # every statistic with values, in the blocks table's order; box statistics exist (the shards have boxes)
        assert stats == [s for s in CURVE_STATISTICS if table[s].notna().any()] and "daam_box_energy" in stats
        for stat in stats:
            values = table[stat].astype(float) / (side if stat.endswith("_spread") else 1)  # grids differ: sqrt(h w)
            naive = values.groupby(table["block"]).agg(["mean", "count"])
            got = curves.loc[stat]
            np.testing.assert_allclose(got["mean"], naive["mean"], rtol=1e-12)
            assert got["samples"].tolist() == naive["count"].tolist()
            np.testing.assert_allclose(got["q25"], values.groupby(table["block"]).quantile(0.25), rtol=1e-12)
            # relative depth: (block + 1) / L, the last block of either model at 1.0
            assert got.index.tolist() == list(range(blocks))
            assert got["depth"].tolist() == [(b + 1) / blocks for b in range(blocks)]
    depth = comparison.curves.xs("daam_entropy", level="statistic")["depth"]
    assert depth.loc["deep"].tolist() == [0.25, 0.5, 0.75, 1.0] and depth.loc["fine"].tolist() == [0.5, 1.0]


def naive_settle(blocks: pd.DataFrame) -> dict[tuple[str, str], float]:
    """Per sample, walking back from the last block: the first block of the trailing run with IoU >= 0.9."""
    settled = {}
    for (unit, key), rows in blocks.groupby(["unit", "key"]):
        ious = rows.sort_values("block")["daam_iou_final"].tolist()
        first = math.nan
        for block in range(len(ious) - 1, -1, -1):
            if not ious[block] >= 0.9:
                break
            first = block
        settled[(unit, key)] = first
    return settled


def test_settle_blocks_are_the_one_definition(comparison, crop_output, other_output):
    for name, out, blocks in (("deep", crop_output, 4), ("fine", other_output, 2)):
        results = open_results(out)
        naive = naive_settle(results.blocks)
        got = comparison.settle_samples.loc[name]
        assert len(got) == len(naive) == 9
        for sample, block in naive.items():
            assert got.loc[sample, "block"] == block and got.loc[sample, "depth"] == (block + 1) / blocks
        pd.testing.assert_frame_equal(
            comparison.settle.loc[name], ranking_reached(results.blocks, results.explainer_blocks)
        )
        # the share settled by each block, on relative depth
        curve = comparison.settle_curve.loc[name]
        expected = [np.mean([b <= block for b in naive.values()]) for block in range(blocks)]
        assert curve["settled"].tolist() == pytest.approx(expected) and curve["depth"].iloc[-1] == 1.0


def test_classes_are_naive_groupbys_of_the_settle_blocks(comparison, crop_output, other_output):
    for name, out, blocks in (("deep", crop_output, 4), ("fine", other_output, 2)):
        samples = open_results(out).samples
        labels = samples[samples.status == "ok"].set_index(["unit", "key"])["label"]
        settled = pd.Series(naive_settle(open_results(out).blocks))
        frame = pd.DataFrame({"block": settled, "label": labels.reindex(settled.index).astype(int)})
        naive = frame.groupby("label")["block"].agg(["size", "mean"])
        got = comparison.classes.loc[name]
        assert got["samples"].to_dict() == naive["size"].to_dict()
        assert got["mean_depth"].to_dict() == pytest.approx(((naive["mean"] + 1) / blocks).to_dict())
        assert got["mean_depth"].is_monotonic_increasing  # earliest first
    differences = comparison.class_differences
    assert list(differences.columns) == [*NAMES, "difference"]
    np.testing.assert_allclose(differences["difference"], (differences.deep - differences.fine).abs())
    assert differences["difference"].is_monotonic_decreasing


def naive_top_iou(a: np.ndarray, b: np.ndarray) -> float:
    k = math.ceil(0.2 * a.size)
    top_a, top_b = (set(np.argsort(-m.ravel(), kind="stable")[:k]) for m in (a, b))
    return len(top_a & top_b) / len(top_a | top_b)


def test_agreement_on_partially_shared_keys_against_naive_per_sample_maps(comparison, crop_output, other_output):
    deep, fine = open_results(crop_output), open_results(other_output)
    agreement = comparison.agreement.loc[("deep", "fine")]
    assert agreement.index.tolist() == SHARED  # the keys ok in both outputs, and only those
    assert set(agreement["unit"]) == set(agreement["other_unit"]) == {"part1-000000"}
    for key in SHARED:
        a = deep.maps(key).daam[-1]  # 4x4
        b = fine.maps(key).daam[-1].reshape(4, 2, 4, 2).mean(axis=(1, 3))  # 8x8 area-averaged onto 4x4
        rho = pd.Series(a.ravel()).rank().corr(pd.Series(b.ravel()).rank())  # Spearman: Pearson of the ranks
        assert agreement.loc[key, "top20_iou"] == pytest.approx(naive_top_iou(a, b))
        assert agreement.loc[key, "rank_correlation"] == pytest.approx(rho, abs=1e-6)
    summary = comparison.agreement_summary.loc[("deep", "fine")]
    assert summary["samples"] == 4
    assert summary["top20_iou_mean"] == pytest.approx(agreement["top20_iou"].mean())
    assert summary["rank_correlation_median"] == pytest.approx(agreement["rank_correlation"].median())


def test_a_model_agrees_with_itself(crop_output):
    same = compare(crop_output, crop_output, names=["a", "b"])
    assert (same.agreement["top20_iou"] == 1.0).all() and np.allclose(same.agreement["rank_correlation"], 1.0)
    assert len(same.agreement) == 9 and not any("grids differ" in note for note in same.notes)


def test_metrics_side_by_side(comparison, crop_output, other_output):
    for name, out in zip(NAMES, (crop_output, other_output), strict=True):
        pd.testing.assert_frame_equal(comparison.metrics.loc[name], summarise(open_results(out).evaluation))


def test_outputs_without_shared_keys_compare_their_dataset_level_tables(apart):
    assert apart.agreement.empty and apart.agreement_summary.empty
    assert [n for n in apart.notes if "share" in n] == [
        "deep and apart share no sample key: only their dataset-level tables are compared"
    ]
    assert set(apart.curves.index.get_level_values("model")) == {"deep", "apart"}
    assert apart.settle_curve.loc["apart", "depth"].tolist() == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert list(apart.metrics.index.get_level_values("model").unique()) == ["deep"]  # apart has no evaluation


def test_names_and_outputs_are_checked(crop_output, other_output):
    with pytest.raises(ConfigError, match="two outputs or more"):
        compare(crop_output)
    with pytest.raises(ConfigError, match="one unique name per output"):
        compare(crop_output, other_output, names=["a", "a"])
    # both jobs are named "viz" and both folders "out": the job names, numbered
    assert compare(crop_output, other_output).names == ["viz #1", "viz #2"]


def test_cli_refuses_unknown_names_and_a_single_output(crop_output, other_output):
    args = ["compare", str(crop_output), str(other_output), "--name", f"{crop_output}=deep"]
    wrong = CliRunner().invoke(main, [*args, "--name", "elsewhere=fine"])
    assert wrong.exit_code == 2 and wrong.output.strip().splitlines() == [
        "error: --name elsewhere=fine: elsewhere is not one of the compared outputs"
    ]
    alone = CliRunner().invoke(main, ["compare", str(crop_output)])
    assert alone.exit_code == 2 and "two outputs or more" in alone.output
