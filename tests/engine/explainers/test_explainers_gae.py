"""GAE (Chefer et al. 2021) in DAAM's pass, against a float64 per-image reference written from the paper."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline import DAAM
from pipeline.engine.explainers import Explainers

sys.path.insert(0, str(Path(__file__).parent.parent))
from naive_gae import naive_gae
from tiny_vits import MODELS, TINY, assert_close_to_peak, images, make


def per_block(explained: dict) -> dict[str, torch.Tensor]:
    """The per-block maps ``(B, L, h, w)`` of each explainer."""
    return {name: maps.blocks for name, maps in explained.items()}


MODELS = {**MODELS, "one_block": ("vit_tiny_patch16_224", dict(TINY, depth=1, num_classes=7), (32, 32))}


@pytest.mark.parametrize("key", sorted(MODELS))
def test_gae_equals_float64_reference(key):
    name, kwargs, size = MODELS[key]
    model = make(name, **kwargs)
    x = images(3, size)
    with DAAM(model) as daam, Explainers(daam, ["gae"]) as explainers:
        result = daam(x)
        maps = per_block(explainers.explain(x, result))
    h, w = daam.grid_size(size)
    assert list(maps) == ["gae"] and maps["gae"].shape == (3, kwargs["depth"], h, w)
    assert maps["gae"].dtype == torch.float32 and (maps["gae"] >= 0).all()
    for i in range(3):
        assert_close_to_peak(maps["gae"][i], naive_gae(model, x[i], int(result.target[i])))


def test_gae_full_size_architecture_equals_float64_reference():
    model = make("vit_small_patch16_224")
    x = images(2, (224, 224), seed=4)
    with DAAM(model) as daam, Explainers(daam, ["gae", "rollout"]) as explainers:
        result = daam(x, target=[3, 999])
        maps = per_block(explainers.explain(x, result))
    assert maps["gae"].shape == (2, 12, 14, 14)
    for i, target in enumerate([3, 999]):
        assert int(result.target[i]) == target
        assert_close_to_peak(maps["gae"][i], naive_gae(model, x[i], target))


def test_gae_explains_the_self_supervised_feature_score():
    model = make("vit_small_patch16_224", **dict(TINY, num_classes=0))
    x = images(2, (32, 32))
    weights = torch.rand(2, 48, generator=torch.Generator().manual_seed(3))
    with DAAM(model) as daam, Explainers(daam, ["gae"]) as explainers:
        maps = per_block(explainers.explain(x, daam(x, weights=weights)))
    for i in range(2):
        assert_close_to_peak(maps["gae"][i], naive_gae(model, x[i], None, weights=weights[i]))


def test_gae_first_block_is_the_gradient_weighted_class_attention():
    """R_1 = I + Ā_1, whose [class] row over the patches is Ā_1's: a hand check of the recursion's start."""
    model = make("vit_tiny_patch16_224", **dict(TINY, num_classes=7))
    x = images(2, (32, 32))
    with DAAM(model) as daam, Explainers(daam, ["gae", "attention"]) as explainers:
        maps = per_block(explainers.explain(x, daam(x)))
    reference = naive_gae(model, x[0], int(model(x[:1]).argmax()))
    assert_close_to_peak(maps["gae"][0, :1], reference[:1])
    # the maps grow with depth: R_l = R_{l-1} + Ā_l R_{l-1} with non-negative Ā_l
    assert (maps["gae"][:, 1:] >= maps["gae"][:, :-1] - 1e-7).all()


def test_gae_under_bfloat16_autocast_is_float32_and_close():
    model = make("vit_tiny_patch16_224", **dict(TINY, num_classes=7))
    x = images(4, (32, 32))
    with DAAM(model, autocast_dtype=torch.bfloat16) as daam, Explainers(daam, ["gae"]) as explainers:
        result = daam(x)
        low = explainers.explain(x, result)["gae"].blocks
    with DAAM(model) as daam, Explainers(daam, ["gae"]) as explainers:
        exact = explainers.explain(x, daam(x, target=result.target))["gae"].blocks
    assert low.dtype == torch.float32
    cosine = nn.functional.cosine_similarity(low.flatten(2), exact.flatten(2), dim=-1)
    assert (cosine > 0.98).all(), cosine
