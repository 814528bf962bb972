"""Evaluation metrics against hand-computed values and a naive per-sample reference."""

from __future__ import annotations

import math
from itertools import pairwise

import pandas as pd
import pytest
import timm
import torch
from torch import nn

from pipeline import DAAM
from pipeline.config import EvaluationConfig
from pipeline.errors import ConfigError, InputError, SchemaError, TargetError
from pipeline.evaluate import (
    baseline_images,
    centre_prior,
    deletion_insertion,
    evaluate_batch,
    localisation,
    perturbation,
    random_map,
)
from pipeline.stats import boxes_to_grid_mask
from pipeline.summaries import summarise, summarise_blocks

NAN = math.nan
TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3, num_classes=4)


class PatchModel(nn.Module):
    """Class 0 has logit 10 * (mean of patch (0, 0), 8 x 8 pixels), class 1 has logit 0."""

    num_classes = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logit = x[:, :, :8, :8].mean(dim=(1, 2, 3)) * 10
        return torch.stack([logit, torch.zeros_like(logit)], dim=-1)


class MeanModel(nn.Module):
    """Class 0 has probability mean(x) ** power (x in [0, 1]): logits log(p), log(1 - p)."""

    num_classes = 2

    def __init__(self, power: float = 1.0) -> None:
        super().__init__()
        self.power = power
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        p = x.mean(dim=(1, 2, 3)) ** self.power
        return torch.stack([p.log(), (1 - p).log()], dim=-1)


class WeightModel(nn.Module):
    """Linear logits of fixed random pixel weights: every patch matters differently."""

    num_classes = 3

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.weight = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(5)) * 0.05

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bchw,kchw->bk", x, self.weight)


def tiny_vit(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **dict(TINY, **kwargs)).eval()


def randn(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def naive_auc(model, image, grid_map, target, steps, baseline):
    """One image, one map, loops over steps and patches: the RISE definitions written out."""
    (h, w), (height, width) = grid_map.shape, image.shape[-2:]
    ph, pw, n = height // h, width // w, h * w
    values = grid_map.flatten().tolist()
    order = sorted(range(n), key=lambda j: (-values[j], j))
    fractions, perturbed = [], {"deletion": [], "insertion": []}
    for s in range(steps + 1):
        k = s * n // steps
        fractions.append(k / n)
        deleted, inserted = image.clone(), baseline.clone()
        for j in order[:k]:
            r, c = divmod(j, w)
            patch = (slice(None), slice(r * ph, (r + 1) * ph), slice(c * pw, (c + 1) * pw))
            deleted[patch], inserted[patch] = baseline[patch], image[patch]
        perturbed["deletion"].append(deleted)
        perturbed["insertion"].append(inserted)
    result = {}
    for name, xs in perturbed.items():
        ys = model(torch.stack(xs)).softmax(-1)[:, target].tolist()
        points = list(zip(fractions, ys, strict=True))
        result[name] = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in pairwise(points))
    return result


def naive_perturbation(model, image, grid_map, target, baseline):
    """One image, one map, loops over fractions and patches: Chefer et al.'s positive/negative perturbation."""
    (h, w), (height, width) = grid_map.shape, image.shape[-2:]
    ph, pw, n = height // h, width // w, h * w
    values = grid_map.flatten().tolist()
    order = sorted(range(n), key=lambda j: (-values[j], j))  # most relevant first
    result = {}
    for name, ranking in (("positive", order), ("negative", order[::-1])):
        perturbed = []
        for i in range(10):  # removed fractions 0, 0.1, ..., 0.9
            x = image.clone()
            for j in ranking[: i * n // 10]:
                r, c = divmod(j, w)
                patch = (slice(None), slice(r * ph, (r + 1) * ph), slice(c * pw, (c + 1) * pw))
                x[patch] = baseline[patch]
            perturbed.append(x)
        logits = torch.cat([model(x[None]) for x in perturbed])
        curves = {"": logits.softmax(-1)[:, target].tolist(), "_top1": (logits.argmax(-1) == target).tolist()}
        for suffix, ys in curves.items():
            result[name + suffix] = sum(0.1 * (y0 + y1) / 2 for y0, y1 in pairwise(float(y) for y in ys))
            result[f"{name}{suffix}_curve"] = [float(y) for y in ys]
    return result


# -- deletion / insertion -----------------------------------------------------------------------------------------
def test_patch_model_hand_values():
    images = torch.zeros(1, 3, 16, 16)
    images[:, :, :8, :8] = 1.0  # patch (0, 0) of the 2 x 2 grid
    first = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]) + torch.tensor([[[0.0, 0.3], [0.2, 0.1]]])  # (0,0) first
    last = torch.tensor([[[0.0, 0.3], [0.2, 0.1]]])  # (0,0) last
    p = 1 / (1 + math.exp(-10))  # original; the zero baseline gives 0.5
    target = torch.tensor([0])
    good = deletion_insertion(PatchModel(), images, first, target, steps=4, baseline="zero")
    bad = deletion_insertion(PatchModel(), images, last, target, steps=4, baseline="zero")
    torch.testing.assert_close(good["deletion_curve"], torch.tensor([[p, 0.5, 0.5, 0.5, 0.5]]))
    torch.testing.assert_close(good["insertion_curve"], torch.tensor([[0.5, p, p, p, p]]))
    torch.testing.assert_close(bad["deletion_curve"], torch.tensor([[p, p, p, p, 0.5]]))
    torch.testing.assert_close(bad["insertion_curve"], torch.tensor([[0.5, 0.5, 0.5, 0.5, p]]))
    torch.testing.assert_close(good["deletion"], torch.tensor([0.25 * ((p + 0.5) / 2 + 1.5)]))
    torch.testing.assert_close(good["insertion"], torch.tensor([0.25 * ((0.5 + p) / 2 + 3 * p)]))
    torch.testing.assert_close(bad["deletion"], torch.tensor([0.25 * (3 * p + (p + 0.5) / 2)]))
    torch.testing.assert_close(bad["insertion"], torch.tensor([0.25 * (1.5 + (0.5 + p) / 2)]))
    assert good["deletion"] < bad["deletion"] and good["insertion"] > bad["insertion"]


@pytest.mark.parametrize(
    ("power", "steps", "grid", "expected"),
    [
        (1.0, 4, (2, 2), 0.5),  # linear curve: exact
        (1.0, 4, (2, 3), 0.5),  # 6 patches in 4 steps: k = 0, 1, 3, 4, 6, still linear in k / n
        (2.0, 4, (2, 2), 0.25 * (0.5 + 0.75**2 + 0.5**2 + 0.25**2)),  # (1 - x)^2 at x = 0, 1/4, ..., 1
        (1.0, 1, (2, 2), 0.5),  # one step: the original and the baseline only
    ],
)
def test_trapezoid_of_known_curves(power, steps, grid, expected):
    # all-ones images, zero baseline: p(class 0) = (kept fraction) ** power; by symmetry both AUCs are equal
    images = torch.ones(2, 3, 8 * grid[0], 8 * grid[1])
    maps = randn(2, *grid).abs()
    result = deletion_insertion(MeanModel(power), images, maps, torch.tensor([0, 0]), steps=steps, baseline="zero")
    torch.testing.assert_close(result["deletion"], torch.full((2,), expected))
    torch.testing.assert_close(result["insertion"], torch.full((2,), expected))
    assert result["deletion_curve"].shape == (2, steps + 1)


def test_ties_broken_by_patch_index():
    model, images = WeightModel((16, 24)), randn(2, 3, 16, 24)
    target = torch.tensor([0, 2])
    tied = torch.tensor([[[0.0, 1.0, 1.0], [1.0, 0.5, 0.5]]]).expand(2, 2, 3)
    strict = torch.tensor([[[0.0, 6.0, 5.0], [4.0, 3.0, 2.0]]]).expand(2, 2, 3)  # tied patches in index order
    a = deletion_insertion(model, images, tied, target, steps=6, baseline="mean")
    b = deletion_insertion(model, images, strict, target, steps=6, baseline="mean")
    for name in ("deletion_curve", "insertion_curve"):
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_all_zero_map_is_undefined():
    result = deletion_insertion(
        PatchModel(), torch.ones(2, 3, 16, 16), torch.stack([torch.zeros(2, 2), torch.ones(2, 2)]), torch.tensor([0, 0])
    )
    assert torch.isnan(result["deletion"][0]) and torch.isnan(result["insertion"][0])
    assert torch.isfinite(result["deletion"][1]) and torch.isfinite(result["insertion_curve"][1]).all()


@pytest.mark.parametrize("baseline", ["blur", "zero", "mean"])
def test_equals_naive_reference_on_a_non_square_vit(baseline):
    model = tiny_vit(img_size=(24, 40))
    images, maps = randn(3, 3, 24, 40), randn(3, 2, 3, 5, seed=2).relu()
    target = torch.tensor([0, 3, 1])
    result = deletion_insertion(model, images, maps, target, steps=5, baseline=baseline, batch_size=7)
    base = baseline_images(images, baseline)
    for b in range(3):
        for m in range(2):
            expected = naive_auc(model, images[b], maps[b, m], target[b].item(), 5, base[b])
            for name in ("deletion", "insertion"):
                torch.testing.assert_close(result[name][b, m].item(), expected[name], rtol=1e-5, atol=1e-6)


def test_chunking_does_not_change_the_result():
    model, images, maps = tiny_vit(), randn(3, 3, 32, 32), randn(3, 4, 4, seed=3)
    target = torch.tensor([1, 2, 3])
    runs = [deletion_insertion(model, images, maps, target, steps=4, batch_size=size) for size in (1, 5, 64)]
    for run in runs[1:]:
        for name in ("deletion", "insertion", "deletion_curve", "insertion_curve"):
            torch.testing.assert_close(run[name], runs[0][name], rtol=1e-5, atol=1e-6)
    # one map per sample: 2 + 2 * (steps - 1) = 8 forward passes per sample, 24 in chunks of 5
    counting = MeanModel()
    deletion_insertion(counting, torch.rand(3, 3, 32, 32), maps, target % 2, steps=4, batch_size=5)
    assert counting.calls == [5, 5, 5, 5, 4]


def test_several_maps_equal_one_map_each():
    model, images, maps = tiny_vit(), randn(2, 3, 32, 32), randn(2, 3, 4, 4, seed=4)
    target = torch.tensor([0, 1])
    together = deletion_insertion(model, images, maps, target, steps=4)
    for m in range(3):
        alone = deletion_insertion(model, images, maps[:, m], target, steps=4)
        for name in ("deletion", "insertion"):
            torch.testing.assert_close(together[name][:, m], alone[name], rtol=1e-5, atol=1e-6)


def test_autocast_is_close():
    model, images, maps = tiny_vit(), randn(2, 3, 32, 32), randn(2, 4, 4, seed=6)
    target = torch.tensor([0, 1])
    exact = deletion_insertion(model, images, maps, target, steps=4)
    bf16 = deletion_insertion(model, images, maps, target, steps=4, autocast_dtype=torch.bfloat16)
    assert bf16["deletion"].dtype == torch.float32
    torch.testing.assert_close(bf16["deletion"], exact["deletion"], rtol=0, atol=0.02)


def test_deletion_insertion_errors():
    images, maps = torch.zeros(2, 3, 16, 16), torch.ones(2, 2, 2)
    with pytest.raises(TargetError, match=r"outside \[0, 2\)"):
        deletion_insertion(PatchModel(), images, maps, torch.tensor([0, 2]))
    with pytest.raises(TargetError, match="one class per image"):
        deletion_insertion(PatchModel(), images, maps, torch.tensor([0]))
    with pytest.raises(TargetError, match="no classifier"):
        deletion_insertion(tiny_vit(num_classes=0), torch.zeros(2, 3, 32, 32), maps, torch.tensor([0, 0]))
    with pytest.raises(InputError, match="does not divide"):
        deletion_insertion(PatchModel(), torch.zeros(2, 3, 16, 15), maps, torch.tensor([0, 0]))
    with pytest.raises(InputError, match="maps"):
        deletion_insertion(PatchModel(), images, torch.ones(3, 2, 2), torch.tensor([0, 0]))
    with pytest.raises(ConfigError, match="steps"):
        deletion_insertion(PatchModel(), images, maps, torch.tensor([0, 0]), steps=0)
    with pytest.raises(ConfigError, match="baseline"):
        deletion_insertion(PatchModel(), images, maps, torch.tensor([0, 0]), baseline="noise")


# -- positive / negative perturbation -----------------------------------------------------------------------------
def test_perturbation_hand_values():
    images = torch.zeros(1, 3, 16, 16)
    images[:, :, :8, :8] = 1.0  # patch (0, 0) of the 2 x 2 grid
    first = torch.tensor([[[1.0, 0.3], [0.2, 0.1]]])  # (0, 0) most relevant
    p = 1 / (1 + math.exp(-10))  # original; the zero baseline gives 0.5
    result = perturbation(PatchModel(), images, first, torch.tensor([0]), baseline="zero")
    # n = 4 patches: k_i = floor(4 i / 10) = 0, 0, 0, 1, 1, 2, 2, 2, 3, 3; (0, 0) goes at k = 1 (positive) and
    # would go only at k = 4 (negative, removed last)
    torch.testing.assert_close(result["positive_curve"], torch.tensor([[p] * 3 + [0.5] * 7]))
    torch.testing.assert_close(result["negative_curve"], torch.tensor([[p] * 10]))
    torch.testing.assert_close(result["positive"], torch.tensor([0.1 * (2 * p + (p + 0.5) / 2 + 3)]))
    torch.testing.assert_close(result["negative"], torch.tensor([0.9 * p]))
    assert result["positive"] < result["negative"]


@pytest.mark.parametrize("baseline", ["zero", "blur"])
def test_perturbation_equals_naive_reference_on_a_non_square_vit(baseline):
    model = tiny_vit(img_size=(24, 40))
    images, maps = randn(3, 3, 24, 40), randn(3, 2, 3, 5, seed=2).relu()
    maps[0, 1] = 0.0  # an all-zero map: undefined
    target = torch.tensor([0, 3, 1])
    result = perturbation(model, images, maps, target, baseline=baseline, batch_size=7)
    assert result["positive"].shape == (3, 2) and result["negative_top1_curve"].shape == (3, 2, 10)
    assert torch.isnan(result["positive"][0, 1]) and torch.isnan(result["negative_top1"][0, 1])
    base = baseline_images(images, baseline)
    for b in range(3):
        for m in range(2):
            if b == 0 and m == 1:
                continue
            expected = naive_perturbation(model, images[b], maps[b, m], target[b].item(), base[b])
            for name in ("positive", "negative", "positive_top1", "negative_top1"):
                assert result[name][b, m].item() == pytest.approx(expected[name], abs=1e-6), name
                assert result[f"{name}_curve"][b, m].tolist() == pytest.approx(expected[f"{name}_curve"], abs=1e-6)
    # top-1 correctness: the original image's argmax is not always the target here, and the curves show it
    assert set(result["positive_top1_curve"][~torch.isnan(result["positive_top1_curve"])].tolist()) <= {0.0, 1.0}


def test_perturbation_forward_passes_and_chunking():
    maps, target = randn(3, 2, 4, 4, seed=3), torch.tensor([0, 1, 0])
    counting = MeanModel()
    perturbation(counting, torch.rand(3, 3, 32, 32), maps, target, batch_size=16)
    assert sum(counting.calls) == 3 * (1 + 2 * 2 * 9)  # the original once per sample
    model, images = tiny_vit(), randn(3, 3, 32, 32)
    runs = [perturbation(model, images, maps, target, batch_size=size) for size in (1, 64)]
    for name in ("positive", "negative", "positive_top1", "negative_top1"):
        torch.testing.assert_close(runs[1][name], runs[0][name], rtol=1e-5, atol=1e-6)
    with pytest.raises(TargetError, match="perturbation need class probabilities"):
        perturbation(tiny_vit(num_classes=0), images, maps, target)


# -- baselines and reference maps ---------------------------------------------------------------------------------
def test_baselines():
    images = randn(2, 3, 24, 40)
    assert torch.equal(baseline_images(images, "zero"), torch.zeros_like(images))
    mean = baseline_images(images, "mean")
    torch.testing.assert_close(mean, images.mean(dim=(2, 3), keepdim=True).expand(2, 3, 24, 40))
    assert mean.shape == images.shape
    # blur kernel: (24 // 4) | 1 = 7 rows by (40 // 4) | 1 = 11 columns; reflect padding keeps constants
    delta = torch.zeros(1, 3, 24, 40)
    delta[..., 12, 20] = 1.0
    support = baseline_images(delta, "blur")[0, 0] > 0
    assert support.any(dim=1).sum() == 7 and support.any(dim=0).sum() == 11
    torch.testing.assert_close(
        baseline_images(torch.full((1, 3, 24, 40), 0.7), "blur"), torch.full((1, 3, 24, 40), 0.7)
    )
    blurred = baseline_images(images, "blur")
    assert blurred.shape == images.shape and blurred.std() < 0.3 * images.std()


def test_centre_prior():
    odd = centre_prior(3, 5)
    assert odd.shape == (3, 5) and odd.argmax() == 1 * 5 + 2 and odd[1, 2] == 1.0
    sigma = 3 / 4
    torch.testing.assert_close(odd[0, 0], torch.tensor(math.exp(-(1 + 4) / (2 * sigma**2))))
    torch.testing.assert_close(odd, odd.flip(0).flip(1), rtol=0, atol=0)  # symmetric
    even = centre_prior(4, 4)
    assert (even[1:3, 1:3] == even.max()).all() and (even.flatten().topk(4).values == even.max()).all()
    torch.testing.assert_close(even[1, 1], torch.tensor(math.exp(-0.5 / (2 * 1.0**2))))


def test_random_map_is_seeded():
    a = random_map((2, 3, 5), torch.Generator().manual_seed(7))
    b = random_map((2, 3, 5), torch.Generator().manual_seed(7))
    c = random_map((2, 3, 5), torch.Generator().manual_seed(8))
    assert a.shape == (2, 3, 5) and torch.equal(a, b) and not torch.equal(a, c)
    assert (a >= 0).all() and (a < 1).all() and a[0].unique().numel() == 15


# -- localisation -------------------------------------------------------------------------------------------------
def test_localisation_with_known_boxes():
    # 32 x 40 input, 4 x 5 grid; sample 0: box over the top-left 2 x 2 patches, sample 1: no box
    mask = boxes_to_grid_mask([torch.tensor([[0.0, 0.0, 16.0, 16.0]]), torch.zeros(0, 4)], (32, 40), (4, 5))
    maps = torch.zeros(2, 2, 4, 5)
    maps[:, 0, 0, 0], maps[:, 0, 3, 4] = 3.0, 1.0  # peak in the box, 3/4 of the mass inside
    maps[:, 1, 3, 4] = 1.0  # peak outside, nothing inside
    result = localisation(maps, mask)
    torch.testing.assert_close(result["pointing_hit"], torch.tensor([[1.0, 0.0], [NAN, NAN]]), equal_nan=True)
    torch.testing.assert_close(result["box_energy"], torch.tensor([[0.75, 0.0], [NAN, NAN]]), equal_nan=True)
    assert torch.isnan(localisation(maps, None)["box_energy"]).all() and localisation(maps, None)[
        "box_energy"
    ].shape == (2, 2)


# -- per batch ----------------------------------------------------------------------------------------------------
class Forbidden(nn.Module):
    def forward(self, x):
        raise AssertionError("the model must not run")


def test_evaluate_batch_localisation_only():
    config = EvaluationConfig(metrics=["localisation"])
    daam = torch.zeros(2, 3, 4, 4)
    daam[:, -1, 0, 0] = 1.0  # final map: one-hot in the top-left corner; earlier blocks ignored
    daam[:, 0, 3, 3] = 5.0
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, :2, :2] = True  # sample 0: top-left box; sample 1: a centre box
    mask[1, 1:3, 1:3] = True
    out = evaluate_batch(Forbidden(), torch.zeros(2, 3, 32, 32), daam, None, mask, config)
    assert list(out) == ["daam", "random", "centre"]
    assert all(tuple(metrics) == config.columns == ("pointing_hit", "box_energy") for metrics in out.values())
    torch.testing.assert_close(out["daam"]["pointing_hit"], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(out["daam"]["box_energy"], torch.tensor([1.0, 0.0]))
    prior = centre_prior(4, 4)
    torch.testing.assert_close(
        out["centre"]["box_energy"], torch.stack([prior[:2, :2].sum(), prior[1:3, 1:3].sum()]) / prior.sum()
    )
    torch.testing.assert_close(out["centre"]["pointing_hit"], torch.tensor([1.0, 1.0]))  # first maximum: (1, 1)
    expected = localisation(random_map((2, 4, 4), torch.Generator().manual_seed(0)), mask)
    torch.testing.assert_close(out["random"]["box_energy"], expected["box_energy"])
    no_boxes = evaluate_batch(Forbidden(), torch.zeros(2, 3, 32, 32), daam, None, None, config)
    assert all(torch.isnan(v).all() for metrics in no_boxes.values() for v in metrics.values())


def test_evaluate_batch_with_the_engine():
    model, images = tiny_vit(), randn(4, 3, 32, 32)
    groups = ["localisation", "segmentation", "faithfulness", "perturbation"]
    config = EvaluationConfig(steps=4, baseline="mean", batch_size=16, seed=3, metrics=groups)
    mask = boxes_to_grid_mask([torch.tensor([[0.0, 0.0, 16.0, 16.0]])] * 2 + [torch.zeros(0, 4)] * 2, (32, 32), (4, 4))
    with DAAM(model) as explainer:
        result = explainer(images)
        out = evaluate_batch(model, images, result.daam, result.target, mask, config)  # hooks stay quiet
    assert list(out) == ["daam", "random", "centre"] and all(tuple(m) == config.columns for m in out.values())
    assert all(v.shape == (4,) and v.dtype == torch.float32 for m in out.values() for v in m.values())
    maps = torch.stack(
        [
            result.daam[:, -1],
            random_map((4, 4, 4), torch.Generator().manual_seed(3)),
            centre_prior(4, 4).expand(4, 4, 4),
        ],
        dim=1,
    )
    expected = deletion_insertion(model, images, maps, result.target, steps=4, baseline="mean")
    perturbed = perturbation(model, images, maps, result.target, baseline="mean")
    for i, method in enumerate(("daam", "random", "centre")):
        torch.testing.assert_close(out[method]["positive_auc"], perturbed["positive"][:, i])
        torch.testing.assert_close(out[method]["negative_top1_auc"], perturbed["negative_top1"][:, i])
        torch.testing.assert_close(out[method]["deletion_auc"], expected["deletion"][:, i])
        torch.testing.assert_close(out[method]["insertion_auc"], expected["insertion"][:, i])
        assert (
            torch.isnan(out[method]["pointing_hit"][2:]).all() and torch.isfinite(out[method]["box_energy"][:2]).all()
        )
    with pytest.raises(TargetError, match="self-supervised"):
        evaluate_batch(model, images, result.daam, None, mask, config)


def test_config_round_trip_and_errors():
    config = EvaluationConfig(
        steps=8, baseline="zero", batch_size=32, metrics=["faithfulness"], references=["centre"], seed=4
    )
    data = config.model_dump()
    assert data == dict(
        steps=8,
        baseline="zero",
        protocol="patch",
        batch_size=32,
        metrics=("faithfulness",),
        references=("centre",),
        seed=4,
        sanity=None,
        sanity_samples=32,
    )
    assert EvaluationConfig.model_validate(data) == config
    assert EvaluationConfig.model_validate({}) == EvaluationConfig()
    assert EvaluationConfig().metrics == ("localisation", "segmentation", "faithfulness")  # perturbation: opt-in
    assert config.columns == ("deletion_auc", "insertion_auc")
    assert EvaluationConfig(metrics=["faithfulness", "localisation", "localisation"]).metrics == (
        "localisation",
        "faithfulness",
    )
    for bad, match in [
        ({"step": 3}, "evaluate.step: unknown key"),
        ({"steps": 0}, "evaluate.steps"),
        ({"batch_size": 2.5}, "evaluate.batch_size"),
        ({"baseline": "grey"}, "evaluate.baseline"),
        ({"protocol": "pixels"}, "evaluate.protocol"),
        ({"sanity": "independent"}, "evaluate.sanity"),
        ({"sanity_samples": 0}, "evaluate.sanity_samples"),
        ({"metrics": ["pointing"]}, "evaluate.metrics"),
        ({"references": "random"}, "evaluate.references"),
        ({"seed": "x"}, "evaluate.seed"),
    ]:
        with pytest.raises(ConfigError, match=match):
            EvaluationConfig(**bad)


# -- tables -------------------------------------------------------------------------------------------------------
def test_summarise():
    nan = float("nan")
    df = pd.DataFrame(
        {
            "key": ["a", "b", "c", "a", "b", "c"],
            "method": ["centre"] * 3 + ["daam"] * 3,
            "pointing_hit": [1.0, 1.0, nan, 1.0, 0.0, nan],
            "box_energy": [nan, nan, nan, 0.5, 0.3, nan],
            "deletion_auc": [0.4, 0.4, 0.4, 0.1, 0.2, 0.3],
            "insertion_auc": [0.6, 0.6, 0.6, 0.9, 0.8, 0.7],
        }
    )
    table = summarise(df)
    assert list(table.index) == ["DAAM", "centre prior"] and table.index.name == "method"
    assert list(table.columns) == ["pointing_accuracy", "box_energy", "deletion_auc", "insertion_auc", "samples"]
    assert table.loc["DAAM"].tolist() == pytest.approx([0.5, 0.4, 0.2, 0.8, 3])
    assert table.loc["centre prior", "pointing_accuracy"] == 1.0 and math.isnan(table.loc["centre prior", "box_energy"])
    with pytest.raises(SchemaError, match="not an evaluation table"):
        summarise(pd.DataFrame({"key": ["a"]}))


def test_summarise_blocks():
    blocks = pd.DataFrame(
        {
            "block": [0, 1, 0, 1],
            "map_point_hit": [1.0, 0.0, 0.0, NAN],
            "map_box_energy": [0.2, 0.4, 0.6, NAN],
            "daam_point_hit": [1.0, 1.0, 0.0, NAN],
            "daam_box_energy": [0.1, 0.3, 0.5, NAN],
        }
    )
    table = summarise_blocks(blocks)
    assert table.loc[0].tolist() == pytest.approx([0.5, 0.4, 0.5, 0.3])
    assert table.loc[1].tolist() == pytest.approx([0.0, 0.4, 1.0, 0.3])
    with pytest.raises(SchemaError, match="daam_box_energy"):
        summarise_blocks(blocks.drop(columns="daam_box_energy"))
