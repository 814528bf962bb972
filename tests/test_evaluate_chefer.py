"""Chefer et al.'s perturbation protocol (``protocol="chefer"``) against a naive per-image loop written from the steps
of their ``baselines/ViT/pertubation_eval_from_hdf5.py``, and the ``black`` baseline."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import timm
import torch
import torch.nn.functional as F

from pipeline.config import EvaluationConfig
from pipeline.data.decode import Preprocess
from pipeline.errors import ConfigError, InputError
from pipeline.evaluate import baseline_images, centre_prior, evaluate_batch, perturbation

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
STEPS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]  # their perturbation_steps for --scale per


def tiny_vit(img_size) -> torch.nn.Module:
    torch.manual_seed(3)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=img_size,
        patch_size=8,
        depth=2,
        embed_dim=48,
        num_heads=3,
        num_classes=5,
    ).eval()


def normalize(tensor: torch.Tensor) -> torch.Tensor:
    """Their ``normalize``: in place on a copy, (x - mean) / std per channel."""
    mean = torch.as_tensor(MEAN, dtype=tensor.dtype)
    std = torch.as_tensor(STD, dtype=tensor.dtype)
    return tensor.clone().sub_(mean[None, :, None, None]).div_(std[None, :, None, None])


@torch.no_grad()
def naive_chefer(model, data, grid_map, target, scale_factor=None):
    """One image: their loop. ``data`` (3, H, W) is the [0, 1] image, ``grid_map`` (h, w) the patch map.

    Their ``vis`` is the map upsampled bilinearly (generate_visualizations.py: ``F.interpolate(Res,
    scale_factor=16, mode='bilinear')``) and min-max normalised, which does not change its ranking, so it is left
    out. ``torch.topk(vis, k)`` leaves the choice among tied values open (the clamped borders of a bilinear
    upsampling tie); here it takes the lower pixel index, as a stable sort does.
    """
    data = data[None]
    org_shape = data.shape
    size = None if scale_factor else tuple(org_shape[-2:])
    vis = F.interpolate(grid_map[None, None], size=size, scale_factor=scale_factor, mode="bilinear")
    base_size = org_shape[-2] * org_shape[-1]
    pred = model(normalize(data))
    result = {}
    for neg in (False, True):
        v = (-vis if neg else vis).reshape(org_shape[0], -1)
        probs = [pred.softmax(1)[0, target].item()]
        hits = [float(pred.argmax(1).item() == target)]
        for step in STEPS:
            _data = data.clone()
            idx = v.argsort(dim=-1, descending=True, stable=True)[:, : int(base_size * step)]
            idx = idx.unsqueeze(1).repeat(1, org_shape[1], 1)
            _data = _data.reshape(org_shape[0], org_shape[1], -1)
            _data = _data.scatter_(-1, idx, 0)
            _data = _data.reshape(*org_shape)
            out = model(normalize(_data))
            probs.append(out.softmax(1)[0, target].item())
            hits.append(float(out.argmax(1).item() == target))
        name = "negative" if neg else "positive"
        for suffix, ys in (("", probs), ("_top1", hits)):
            result[name + suffix] = sum(0.1 * (y0 + y1) / 2 for y0, y1 in pairwise(ys))  # auc(arange(0, 1, .1))
            result[f"{name}{suffix}_curve"] = ys
    return result


@pytest.mark.parametrize(("size", "grid", "scale"), [((32, 32), (4, 4), 8), ((24, 40), (3, 5), None)])
def test_chefer_protocol_equals_their_loop(size, grid, scale):
    model = tiny_vit(size)
    generator = torch.Generator().manual_seed(7)
    data = torch.rand(3, 3, *size, generator=generator)  # [0, 1] images
    maps = torch.rand(3, 2, *grid, generator=generator)
    maps[2, 1] = 0.0  # an all-zero map: undefined
    with torch.no_grad():
        predicted = model(normalize(data)).argmax(-1)
    labels = torch.tensor([predicted[0].item(), (predicted[1].item() + 1) % 5, predicted[2].item()])
    result = perturbation(
        model, normalize(data), maps, labels, baseline="black", protocol="chefer", batch_size=11, mean=MEAN, std=STD
    )
    assert result["positive"].shape == (3, 2) and result["negative_top1_curve"].shape == (3, 2, 10)
    assert all(torch.isnan(result[name][2, 1]) for name in ("positive", "negative_top1"))
    hits = 0
    for b in range(3):
        for m in range(2):
            if (b, m) == (2, 1):
                continue
            expected = naive_chefer(model, data[b], maps[b, m], labels[b].item(), scale)
            for name in ("positive_top1", "negative_top1"):  # what their code records: exact
                assert result[f"{name}_curve"][b, m].tolist() == expected[f"{name}_curve"], (b, m, name)
                assert result[name][b, m].item() == pytest.approx(expected[name], abs=1e-6)
            for name in ("positive", "negative"):
                assert result[f"{name}_curve"][b, m].tolist() == pytest.approx(expected[f"{name}_curve"], abs=1e-5)
                assert result[name][b, m].item() == pytest.approx(expected[name], abs=1e-5)
            hits += sum(expected["positive_top1_curve"])
    assert hits > 0  # the top-1 curves are not all zero: the comparison means something


def test_chefer_removes_pixels_not_patches():
    """Removing 10% of a 32 x 32 image's pixels is 102 pixels: not a whole number of 8 x 8 patches."""
    model = tiny_vit((32, 32))
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(args[0].clone()))
    maps = torch.arange(16.0).view(1, 4, 4)
    images = normalize(torch.full((1, 3, 32, 32), 0.5))
    perturbation(model, images, maps, torch.tensor([0]), baseline="black", protocol="chefer", mean=MEAN, std=STD)
    inputs = torch.cat(calls)
    assert len(inputs) == 1 + 2 * 9
    black = torch.tensor([-m / s for m, s in zip(MEAN, STD, strict=True)]).view(3, 1)
    removed = [(x.flatten(1) - black).abs().amax(0) < 1e-6 for x in inputs]
    assert [int(r.sum()) for r in removed[:10]] == [int(1024 * f) for f in [0.0, *STEPS]]
    # positive: the map's top pixels go first, the bottom-right corner of this map
    assert removed[1].view(32, 32)[-1, -1] and not removed[1].view(32, 32)[0, 0]
    assert removed[10].view(32, 32)[0, 0] and not removed[10].view(32, 32)[-1, -1]  # negative: the lowest first


def test_black_baseline():
    images = torch.randn(2, 3, 8, 12)
    black = baseline_images(images, "black", mean=MEAN, std=STD)
    preprocess = Preprocess(size=(8, 12), mean=MEAN, std=STD)
    expected = preprocess.normalize(torch.zeros(2, 3, 8, 12, dtype=torch.uint8))
    torch.testing.assert_close(black, expected, rtol=0, atol=1e-6)
    with pytest.raises(InputError, match="mean and std"):
        baseline_images(images, "black")
    with pytest.raises(ConfigError, match=r"evaluate\.protocol"):
        perturbation(tiny_vit((32, 32)), torch.zeros(1, 3, 32, 32), torch.rand(1, 4, 4), [0], protocol="pixels")


def test_evaluate_batch_scores_chefer_against_the_labels():
    model = tiny_vit((32, 32))
    generator = torch.Generator().manual_seed(2)
    images = normalize(torch.rand(3, 3, 32, 32, generator=generator))
    daam = torch.rand(3, 2, 4, 4, generator=generator)
    config = EvaluationConfig(metrics=["perturbation"], references=["centre"], protocol="chefer")
    labels = torch.tensor([4, -1, 1])  # the second sample has no label
    explained = torch.tensor([0, 0, 0])  # not what the chefer protocol scores against
    out = evaluate_batch(model, images, daam, explained, None, config, labels=labels, mean=MEAN, std=STD)
    assert all(math.isnan(out[m][c][1].item()) for m in ("daam", "centre") for c in config.columns)
    stacked = torch.stack([daam[:, -1], centre_prior(4, 4).expand(3, 4, 4)], dim=1)
    rows = torch.tensor([0, 2])
    expected = perturbation(
        model, images[rows], stacked[rows], labels[rows], baseline="black", protocol="chefer", mean=MEAN, std=STD
    )
    for i, method in enumerate(("daam", "centre")):
        for name in ("positive", "negative", "positive_top1", "negative_top1"):
            torch.testing.assert_close(out[method][f"{name}_auc"][rows], expected[name][:, i])
    with pytest.raises(InputError, match="mean and std"):
        evaluate_batch(model, images, daam, explained, None, config, labels=labels)
