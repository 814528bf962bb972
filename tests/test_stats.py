"""Per-block statistics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.errors import TargetError
from pipeline.stats import (
    STATISTICS,
    block_statistics,
    box_energy,
    boxes_to_grid_mask,
    pointing_hit,
    top_iou,
)
from pipeline.store.schemas import BLOCKS

NAN = math.nan


def stats_of(maps: torch.Tensor, box_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Statistics of ``(B, L, h, w)`` maps used as both M and D, with zero coefficients."""
    return block_statistics(maps, maps, torch.zeros(*maps.shape[:2], 3), box_mask)


def assert_values(actual: torch.Tensor, expected: list) -> None:
    torch.testing.assert_close(actual.double(), torch.tensor(expected, dtype=torch.float64), equal_nan=True)


def test_one_hot_map():
    maps = torch.zeros(1, 1, 4, 5)
    maps[0, 0, 2, 3] = 7.0
    s = stats_of(maps)
    for prefix in ("map_", "daam_"):
        assert_values(s[prefix + "entropy"], [[0.0]])
        assert_values(s[prefix + "top10_mass"], [[1.0]])
        assert s[prefix + "peak_row"].item() == 2 and s[prefix + "peak_col"].item() == 3
        assert_values(s[prefix + "centroid_row"], [[2.0]])
        assert_values(s[prefix + "centroid_col"], [[3.0]])
        assert_values(s[prefix + "spread"], [[0.0]])


def test_uniform_map():
    s = stats_of(torch.full((1, 1, 4, 5), 0.3))
    assert_values(s["map_entropy"], [[1.0]])
    assert_values(s["map_top10_mass"], [[2 / 20]])  # ceil(0.1 * 20) = 2 of 20 equal patches
    assert (s["map_peak_row"].item(), s["map_peak_col"].item()) == (0, 0)  # first maximum on ties
    assert_values(s["map_centroid_row"], [[1.5]])
    assert_values(s["map_centroid_col"], [[2.0]])
    # mean squared row offset (2.25 + 0.25 + 0.25 + 2.25) / 4, column offset (4 + 1 + 0 + 1 + 4) / 5
    assert_values(s["map_spread"], [[math.sqrt(1.25 + 2.0)]])


def test_two_patch_map():
    maps = torch.tensor([[[[3.0, 1.0], [0.0, 0.0]]]])
    s = stats_of(maps)
    p = (0.75, 0.25)
    assert_values(s["map_entropy"], [[-sum(x * math.log(x) for x in p) / math.log(4)]])
    assert_values(s["map_top10_mass"], [[0.75]])  # ceil(0.4) = 1 patch
    assert_values(s["map_centroid_row"], [[0.0]])
    assert_values(s["map_centroid_col"], [[0.25]])
    assert_values(s["map_spread"], [[math.sqrt(0.75 * 0.25**2 + 0.25 * 0.75**2)]])


def test_all_zero_map_is_undefined():
    s = stats_of(torch.zeros(1, 1, 3, 3), torch.ones(1, 3, 3, dtype=torch.bool))
    for name in ("entropy", "top10_mass", "centroid_row", "centroid_col", "spread", "box_energy", "point_hit"):
        assert math.isnan(s["map_" + name].item()), name
    assert s["map_peak_row"].item() == -1 and s["map_peak_col"].item() == -1
    for name in ("daam_cos_final", "daam_iou_final", "daam_change"):
        assert math.isnan(s[name].item()), name


def test_accumulation_statistics():
    # D_l on a 2 x 5 grid (top-20% sets have ceil(0.2 * 10) = 2 patches); M_l = D_l - D_(l-1).
    daam = torch.zeros(1, 3, 10)
    daam[0, 0, :2] = torch.tensor([2.0, 1.0])  # top {0, 1}
    daam[0, 1, :3] = torch.tensor([2.0, 1.0, 3.0])  # top {2, 0}
    daam[0, 2, :4] = torch.tensor([2.0, 1.0, 3.0, 4.0])  # top {3, 2}
    daam = daam.view(1, 3, 2, 5)
    block_maps = torch.diff(daam, dim=1, prepend=torch.zeros(1, 1, 2, 5))
    s = block_statistics(block_maps, daam, torch.zeros(1, 3, 4))
    assert_values(s["daam_cos_final"], [[5 / math.sqrt(5 * 30), 14 / math.sqrt(14 * 30), 1.0]])
    assert_values(s["daam_iou_final"], [[0.0, 1 / 3, 1.0]])
    # normalised maps (2, 1, 0, 0)/3, (2, 1, 3, 0)/6, (2, 1, 3, 4)/10
    step1 = abs(2 / 3 - 2 / 6) + abs(1 / 3 - 1 / 6) + 3 / 6
    step2 = abs(2 / 6 - 2 / 10) + abs(1 / 6 - 1 / 10) + abs(3 / 6 - 3 / 10) + 4 / 10
    assert_values(s["daam_change"], [[NAN, step1, step2]])
    assert [s["map_peak_col"][0, i].item() for i in range(3)] == [0, 2, 3]  # M_1, M_2 are one-hot


def test_coefficient_statistics():
    coefficients = torch.tensor([[[1.0, -2.0, 3.0, 0.0], [-1.0, -1.0, -1.0, -1.0]]])
    s = block_statistics(torch.ones(1, 2, 2, 2), torch.ones(1, 2, 2, 2), coefficients)
    assert_values(s["coef_l1"], [[6.0, 4.0]])
    assert_values(s["coef_pos_frac"], [[0.5, 0.0]])


def test_boxes_to_grid_mask():
    # 32 x 40 input, 4 x 5 grid: 8-pixel patches, centres at y = 4, 12, 20, 28 and x = 4, 12, ..., 36.
    boxes = [
        torch.tensor([[0.0, 0.0, 16.0, 16.0], [30.0, 20.0, 40.0, 32.0]]),
        torch.zeros(0, 4),
        torch.tensor([[5.0, 5.0, 11.0, 11.0]]),  # covers no patch centre
    ]
    mask = boxes_to_grid_mask(boxes, (32, 40), (4, 5), "cpu")
    expected = torch.zeros(3, 4, 5, dtype=torch.bool)
    expected[0, :2, :2] = True
    expected[0, 2:, 4] = True
    assert torch.equal(mask, expected)
    with pytest.raises(TargetError, match="sample 1"):
        boxes_to_grid_mask([torch.zeros(1, 4), torch.zeros(4)], (32, 40), (4, 5))


def test_box_energy_and_pointing_hit():
    mask = boxes_to_grid_mask(
        [torch.tensor([[0.0, 0.0, 16.0, 16.0]]), torch.tensor([[30.0, 20.0, 40.0, 32.0]]), torch.zeros(0, 4)],
        (32, 40),
        (4, 5),
    )
    maps = torch.zeros(3, 2, 4, 5)
    maps[:, 0] = 1.0  # uniform
    maps[0, 1, 3, 4] = maps[1, 1, 3, 4] = maps[2, 1, 3, 4] = 2.0  # one-hot at (3, 4)
    maps[0, 1, 0, 0] = 1.0  # and a third of the mass at (0, 0) in sample 0
    assert_values(box_energy(maps, mask), [[4 / 20, 1 / 3], [2 / 20, 1.0], [NAN, NAN]])
    assert_values(pointing_hit(maps, mask), [[1.0, 0.0], [0.0, 1.0], [NAN, NAN]])
    s = stats_of(maps, mask)
    assert_values(s["map_box_energy"], [[4 / 20, 1 / 3], [2 / 20, 1.0], [NAN, NAN]])
    assert_values(s["daam_point_hit"], [[1.0, 0.0], [0.0, 1.0], [NAN, NAN]])
    assert torch.isnan(stats_of(maps)["map_box_energy"]).all()  # no box mask


def test_batched_equals_per_sample_and_names_match_schema():
    torch.manual_seed(0)
    block_maps = torch.relu(torch.randn(5, 4, 3, 6))
    daam, coefficients = block_maps.cumsum(1), torch.randn(5, 4, 7)
    mask = torch.rand(5, 3, 6) > 0.5
    batch = block_statistics(block_maps, daam, coefficients, mask)
    for i in range(5):
        one = block_statistics(block_maps[i : i + 1], daam[i : i + 1], coefficients[i : i + 1], mask[i : i + 1])
        for name in STATISTICS:
            torch.testing.assert_close(batch[name][i : i + 1], one[name], equal_nan=True)
    assert tuple(batch) == STATISTICS == tuple(BLOCKS.names[3:])
    for name, value in batch.items():
        assert value.shape == (5, 4)
        assert value.dtype == (torch.int16 if str(BLOCKS.field(name).type) == "int16" else torch.float32), name


def test_top_iou_of_two_sets_of_maps():
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(6, 4, 5, generator=generator)
    others = torch.rand(6, 4, 5, generator=generator)
    others[1] = 0.0  # all zero: undefined
    iou = top_iou(maps, others)
    for i in (0, 2, 3, 4, 5):  # ceil(0.2 * 20) = 4 patches in each top set
        a, b = (set(m[i].flatten().argsort(descending=True)[:4].tolist()) for m in (maps, others))
        assert iou[i].item() == pytest.approx(len(a & b) / len(a | b))
    assert torch.isnan(iou[1])
    one_hot = torch.zeros(2, 4, 5)
    one_hot[0, 0, :4] = one_hot[1, 0, 2:] = one_hot[1, 1, 0] = 1.0  # top-20%: these 4 patches each, 2 shared
    assert_values(top_iou(one_hot[:1], one_hot[1:]), [2 / 6])
    assert_values(top_iou(one_hot, one_hot), [1.0, 1.0])
