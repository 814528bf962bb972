"""Segmentation against object masks (pixel accuracy, mIoU, mAP) against a naive per-image computation written from
Chefer et al.'s ``baselines/ViT/imagenet_seg_eval.py`` and ``utils/metrices.py``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.stats import (
    MASK_STATISTICS,
    average_precision,
    block_statistics,
    explainer_statistics,
    segmentation_scores,
)


def naive_ap(labels: np.ndarray, scores: np.ndarray) -> float:
    """scikit-learn's average_precision_score written out: each distinct score a threshold, highest first."""
    positives, ap, recall_before = labels.sum(), 0.0, 0.0
    for threshold in sorted(set(scores.tolist()), reverse=True):
        chosen = scores >= threshold
        true_positives = (chosen & labels).sum()
        recall = true_positives / positives
        ap += (recall - recall_before) * true_positives / chosen.sum()
        recall_before = recall
    return float(ap)


@torch.no_grad()
def naive_segmentation(grid_map: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """One map (h, w) against one mask (H, W) of 0 and 1: their eval_batch, batch size 1, in float32 as theirs."""
    res = F.interpolate(grid_map[None, None].float(), size=tuple(labels.shape), mode="bilinear")
    res = (res - res.min()) / (res.max() - res.min())
    ret = res.mean()
    res_1, res_0 = res.gt(ret).float(), res.le(ret).float()
    res_1_ap, res_0_ap = res.clone(), 1 - res
    for t in (res_1, res_0, res_1_ap, res_0_ap):
        t[t != t] = 0
    output = torch.cat((res_0, res_1), 1)[0]  # (2, H, W)
    output_ap = torch.cat((res_0_ap, res_1_ap), 1)[0]
    predict = output.argmax(0).numpy()  # torch.max: the first of equal values, background on (0, 0)
    target = labels.long().numpy()
    ious = []
    for c in (0, 1):
        union = ((predict == c) | (target == c)).sum()
        if union:
            ious.append(((predict == c) & (target == c)).sum() / union)
    onehot = np.stack([target == 0, target == 1]).reshape(-1)
    return {
        "pixel_accuracy": float((predict == target).mean()),
        "miou": float(np.mean(ious)),
        "ap": naive_ap(onehot, output_ap.numpy().reshape(-1)),
    }


def test_average_precision_hand_values_and_ties():
    scores = torch.tensor([[0.9, 0.8, 0.8, 0.1], [0.5, 0.5, 0.5, 0.5], [0.1, 0.2, 0.3, 0.4]])
    labels = torch.tensor([[1, 0, 1, 0], [1, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)
    ap = average_precision(scores, labels)
    # 0.9: recall 1/2 at precision 1; 0.8 (two tied, one positive): recall 1 at precision 2/3
    assert ap[0].item() == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert ap[1].item() == pytest.approx(0.5)  # all tied: the share of positives
    assert math.isnan(ap[2].item())  # no positive
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 20, (5, 300), generator=generator).float() / 20  # many ties
    labels = torch.rand(5, 300, generator=generator) > 0.6
    for row in range(5):
        expected = naive_ap(labels[row].numpy(), scores[row].numpy())
        assert average_precision(scores, labels)[row].item() == pytest.approx(expected, abs=1e-6)


def test_segmentation_equals_the_naive_per_image_computation():
    generator = torch.Generator().manual_seed(4)
    maps = torch.rand(4, 3, 4, 5, generator=generator)  # 4 samples, 3 maps each, on a 4 x 5 grid
    maps[0, 1] = 0.0  # all zero: undefined
    maps[0, 2] = 0.25  # constant: no threshold, background everywhere
    maps[3, 0] = (maps[3, 0] * 4).round()  # ties
    masks = torch.zeros(4, 32, 40)
    masks[0, 8:20, 10:30] = 1
    masks[1, 20:, :15] = 1
    masks[2] = (torch.rand(32, 40, generator=generator) > 0.5).float()
    masks[3] = float("nan")  # no mask
    scores = segmentation_scores(maps, masks)
    assert tuple(scores) == MASK_STATISTICS and all(v.shape == (4, 3) for v in scores.values())
    for b in range(4):
        for m in range(3):
            if b == 3 or (b, m) == (0, 1):
                assert all(math.isnan(v[b, m].item()) for v in scores.values())
                continue
            expected = naive_segmentation(maps[b, m], masks[b])
            for name in MASK_STATISTICS:
                assert scores[name][b, m].item() == pytest.approx(expected[name], abs=2e-6), (b, m, name)
    assert scores["pixel_accuracy"][0, 2].item() == pytest.approx(1 - masks[0].mean().item())  # all background
    assert scores["ap"][0, 2].item() == pytest.approx(0.5)


def test_segmentation_known_values_and_chunks(monkeypatch):
    grid = torch.zeros(1, 4, 4)
    grid[0, 1:3, 1:3] = 1.0  # the object's patches
    upsampled = F.interpolate(grid[None], size=(32, 32), mode="bilinear")[0]
    masks = (upsampled > upsampled.mean()).float()  # exactly what the thresholded map predicts
    scores = segmentation_scores(grid, masks)
    assert scores["pixel_accuracy"].item() == scores["miou"].item() == 1.0
    # AP ranks the 2 H W scores: an object pixel's background score 1 - r can beat another's object score r
    assert scores["ap"].item() == pytest.approx(naive_segmentation(grid[0], masks[0])["ap"], abs=1e-6)
    # chunking: one map per chunk gives the same values
    maps = torch.rand(3, 6, 4, 4, generator=torch.Generator().manual_seed(1))
    masks = (torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    whole = segmentation_scores(maps, masks)
    monkeypatch.setattr("pipeline.stats._SEGMENTATION_ELEMENTS", 1)
    for name, value in segmentation_scores(maps, masks).items():
        torch.testing.assert_close(value, whole[name])
    assert all(torch.isnan(v).all() for v in segmentation_scores(maps, None).values())


def test_block_and_explainer_statistics_carry_the_mask_columns():
    generator = torch.Generator().manual_seed(3)
    block_maps = torch.rand(2, 3, 4, 4, generator=generator)
    daam = block_maps.cumsum(1)
    masks = torch.zeros(2, 32, 32)
    masks[:, 4:20, 8:24] = 1
    stats = block_statistics(block_maps, daam, torch.randn(2, 3, 6, generator=generator), None, masks)
    expected = segmentation_scores(daam, masks)
    for name in MASK_STATISTICS:
        torch.testing.assert_close(stats[f"daam_mask_{name}"], expected[name])
        torch.testing.assert_close(stats[f"map_mask_{name}"], segmentation_scores(block_maps, masks)[name])
        torch.testing.assert_close(explainer_statistics(daam, None, masks)[f"mask_{name}"], expected[name])
    assert torch.isnan(block_statistics(block_maps, daam, torch.randn(2, 3, 6))["daam_mask_miou"]).all()
