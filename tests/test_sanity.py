"""Cascading randomisation (Adebayo et al. 2018): the similarity measures against naive references, and the check on
real timm ViTs whose randomisation has known effects on the maps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from builders import TINY_MODEL, job_dict, make_shards

from pipeline import DAAM
from pipeline.config import parse_job
from pipeline.engine.explainers import Explainers
from pipeline.names import SANITY_COLUMNS
from pipeline.runner import run_job
from pipeline.sanity import CascadingRandomisation, map_similarity, spearman, ssim
from pipeline.store.results import open_results

DEPTH = 4


def tiny_vit(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    options = dict(img_size=32, patch_size=8, depth=DEPTH, embed_dim=48, num_heads=3, num_classes=5) | kwargs
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **options).eval()


def naive_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, tied values sharing the mean of their positions (scipy.stats.rankdata's 'average')."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = np.empty(len(values))
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def naive_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """scikit-image's structural_similarity(a, b, data_range=1) with its defaults, window by window."""
    window, n = 7, 49
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for i in range(a.shape[0] - window + 1):
        for j in range(a.shape[1] - window + 1):
            x, y = a[i : i + window, j : j + window].ravel(), b[i : i + window, j : j + window].ravel()
            mx, my = x.mean(), y.mean()
            vx, vy = x.var() * n / (n - 1), y.var() * n / (n - 1)
            cov = ((x - mx) * (y - my)).sum() / (n - 1)
            values.append(((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_spearman_equals_naive_with_ties():
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(0, 6, (4, 50), generator=generator).float()  # many ties
    b = torch.rand(4, 50, generator=generator) + a * 0.3
    result = spearman(a, b)
    for row in range(4):
        expected = np.corrcoef(naive_ranks(a[row].numpy()), naive_ranks(b[row].numpy()))[0, 1]
        assert result[row].item() == pytest.approx(expected, abs=1e-6)
    assert spearman(a, a).tolist() == pytest.approx([1.0] * 4)
    assert spearman(a, -a).tolist() == pytest.approx([-1.0] * 4)
    assert math.isnan(spearman(torch.ones(1, 5), torch.rand(1, 5))[0].item())  # a constant map has no ranking


def test_ssim_equals_naive():
    generator = torch.Generator().manual_seed(1)
    a = torch.rand(3, 12, 15, generator=generator)
    b = (a + 0.3 * torch.rand(3, 12, 15, generator=generator)).clamp(0, 1)
    b[2] = torch.rand(12, 15, generator=generator)
    result = ssim(a, b)
    for row in range(3):
        assert result[row].item() == pytest.approx(naive_ssim(a[row].double().numpy(), b[row].double().numpy()), 1e-5)
    assert ssim(a, a).tolist() == pytest.approx([1.0] * 3)


def test_map_similarity_upsamples_and_normalises():
    generator = torch.Generator().manual_seed(2)
    trained = torch.rand(2, 3, 4, 4, generator=generator)
    randomised = torch.rand(2, 3, 4, 4, generator=generator)
    randomised[1, 2] = 0.5  # constant: undefined
    result = map_similarity(randomised, trained, (32, 32))
    assert tuple(result) == SANITY_COLUMNS and all(v.shape == (2, 3) for v in result.values())
    assert all(math.isnan(v[1, 2].item()) for v in result.values())
    up = F.interpolate(torch.stack([randomised[0, 0], trained[0, 0]])[:, None], size=(32, 32), mode="bilinear")[:, 0]
    low, high = up.flatten(1).min(1).values[:, None, None], up.flatten(1).max(1).values[:, None, None]
    scaled = ((up - low) / (high - low)).double().numpy()
    assert result["ssim"][0, 0].item() == pytest.approx(naive_ssim(scaled[0], scaled[1]), abs=1e-5)
    expected = np.corrcoef(naive_ranks(up[0].flatten().numpy()), naive_ranks(up[1].flatten().numpy()))[0, 1]
    assert result["spearman"][0, 0].item() == pytest.approx(expected, abs=1e-6)
    # a monotone rescaling of a map keeps both at 1
    same = map_similarity(trained * 3 + 1, trained, (32, 32))
    assert torch.allclose(same["spearman"], torch.ones(2, 3)) and torch.allclose(same["ssim"], torch.ones(2, 3))


def cascade_maps(model, images, seed=0, stop=None):
    """{explainer: (steps, B, L, h, w)} of DAAM (D_l), rollout and attention after each randomisation step."""
    cascade = CascadingRandomisation(model.blocks, seed)
    steps = []
    with DAAM(model) as daam, Explainers(daam, ["rollout", "attention"]) as explainers:

        def explain() -> dict[str, torch.Tensor]:
            result = daam(images, target=torch.tensor([1, 3]))
            return {"daam": result.daam, **{n: m.blocks for n, m in explainers.explain(images, result).items()}}

        for count in cascade.steps():
            steps.append(explain())
            if count == stop:
                break
        trained = explain()
    return {name: torch.stack([s[name] for s in steps]) for name in trained}, trained


def test_cascade_known_effects_and_restored_weights():
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    steps, trained = cascade_maps(model, images)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # trained again, bit for bit
    for name in ("rollout", "attention"):
        similarity = map_similarity(steps[name], trained[name].expand_as(steps[name]), (32, 32))  # (K, B, L)
        for k in range(DEPTH):  # step k randomised blocks DEPTH-1-k .. DEPTH-1
            first_random = DEPTH - 1 - k
            for block in range(DEPTH):
                values = similarity["spearman"][k, :, block]
                if block < first_random:  # a forward-only map of block l does not see the blocks above it
                    assert torch.equal(steps[name][k, :, block], trained[name][:, block]), (name, k, block)
                    assert values.tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
                    assert similarity["ssim"][k, :, block].tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
                else:  # its own block or one below it is random
                    assert (values < 0.999).all(), (name, k, block)
    # DAAM's coefficients are gradients through every later block: randomising the top block moves every D_l
    daam = map_similarity(steps["daam"], trained["daam"].expand_as(steps["daam"]), (32, 32))
    assert (daam["spearman"][0] < 0.999).all()
    assert daam["spearman"][-1, :, -1].abs().max() < 0.5  # everything random: the final map's ranking is gone


def test_cascade_is_seeded_and_restores_when_stopped_early():
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    first, _ = cascade_maps(model, images, seed=5, stop=2)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    again, _ = cascade_maps(model, images, seed=5, stop=2)
    other, _ = cascade_maps(model, images, seed=6, stop=2)
    assert torch.equal(first["daam"], again["daam"]) and not torch.equal(first["daam"], other["daam"])
    assert len(first["daam"]) == 2


def test_layer_scale_and_norms_are_reset():
    model = tiny_vit(init_values=0.1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    cascade = CascadingRandomisation(model.blocks, 0)
    for count in cascade.steps():
        block = model.blocks[DEPTH - count]
        assert torch.equal(block.norm1.weight, torch.ones(48)) and torch.equal(block.norm1.bias, torch.zeros(48))
        assert torch.equal(block.ls1.gamma, torch.full((48,), 0.1))
        assert torch.equal(block.attn.qkv.bias, torch.zeros(144))
        assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.2)
    assert model.blocks[0].ls1.gamma[0].item() == pytest.approx(0.6)  # trained again


def test_job_writes_the_sanity_table(tmp_path):
    shards = make_shards(tmp_path / "shards", shards=3, per_shard=3)
    evaluate = {"metrics": ["localisation"], "sanity": "cascading", "sanity_samples": 4}
    job = job_dict(shards, tmp_path / "out", explainers=["daam", "rollout", "gradcam"], evaluate=evaluate)
    summary = run_job(parse_job(job), use_ray=False, progress=False)
    assert summary.samples_ok == 9
    sanity = open_results(tmp_path / "out").sanity
    depth = TINY_MODEL["kwargs"]["depth"]
    # 4 samples over 3 units: 2, 1, 1; DAAM and rollout per block, Grad-CAM's one map at the last block
    assert sanity.groupby("unit")["key"].nunique().tolist() == [2, 1, 1]
    assert len(sanity) == 4 * depth * (2 * depth + 1)
    assert set(sanity.randomised) == set(range(1, depth + 1))
    assert set(sanity[sanity.explainer == "gradcam"].block) == {depth - 1}
    keys = open_results(tmp_path / "out").samples.sort_values(["unit", "row"]).groupby("unit").key.first()
    assert set(keys) <= set(sanity.key)  # the first samples of each unit
    # rollout's map of block 0 with only block 1 random: unchanged
    kept = sanity[(sanity.explainer == "rollout") & (sanity.block == 0) & (sanity.randomised == 1)]
    assert kept.spearman.tolist() == pytest.approx([1.0] * 4, abs=1e-6)
