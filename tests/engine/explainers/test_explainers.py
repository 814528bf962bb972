"""The comparison explainers: rollout, raw attention and Grad-CAM against a naive per-image float64 reference (GAE:
its own reference in naive_gae.py, joined here as NaiveMaps.gae), and the contract every explainer keeps (LRP's
values: test_explainers_lrp.py)."""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline import DAAM
from pipeline.engine.explainers import EXPLAINER_TYPES, ExplainerMaps, Explainers
from pipeline.errors import ConfigError, PipelineError, UnsupportedModelError
from pipeline.names import COMPARISON_EXPLAINERS, EXPLAINER_ARRAYS, PER_BLOCK_EXPLAINERS, TOP_DOWN_EXPLAINERS

sys.path.insert(0, str(Path(__file__).parent.parent))
from naive_gae import naive_gae
from tiny_vits import MODELS, TINY, hook_count, images, live_tensors, make


@dataclass
class NaiveMaps:
    rollout: torch.Tensor  # (L, h, w)
    attention: torch.Tensor  # (L, h, w)
    gradcam: torch.Tensor  # (1, h, w)
    gae: torch.Tensor  # (L, h, w)
    final_norm_patch_gradient: torch.Tensor  # dY/d(model.norm output) on the patch tokens


ATTENTION_EXPLAINERS = ("rollout", "attention", "gradcam", "gae")  # the naive reference's maps, in DAAM's pass


def naive_maps(model: nn.Module, image: torch.Tensor, target: int | None, weights: torch.Tensor | None = None):
    """The three maps of one image (3, H, W) in float64, with every block's full N x N attention materialised."""
    model = copy.deepcopy(model).double().eval().requires_grad_(False)
    for module in model.modules():  # a copy made inside `with DAAM(model)` carries the engine's hooks
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    full, last_input, last_block = [], {}, len(model.blocks) - 1
    for i, block in enumerate(model.blocks):
        attn = block.attn

        def naive_forward(x, attn_mask=None, is_causal=False, attn=attn, last=i == last_block):
            if last:  # x is the last block's norm1 output, Grad-CAM's layer
                x = last_input["x"] = x.detach().requires_grad_(True)
            batch, tokens, _ = x.shape
            qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            q, k = attn.q_norm(q), attn.k_norm(k)
            attention = (q @ k.transpose(-2, -1) * attn.scale).softmax(dim=-1)  # (1, H, N, N)
            full.append(attention[0].detach())
            return attn.proj((attention @ v).transpose(1, 2).reshape(batch, tokens, -1))

        attn.forward = naive_forward

    features = model.forward_features(image[None].double())
    if weights is None:
        score = model.forward_head(features)[0, target]
    else:
        score = (model.forward_head(features, pre_logits=True)[0] * weights.double()).sum()
    grad_x, grad_features = torch.autograd.grad(score, [last_input["x"], features])

    prefix, tokens = model.num_prefix_tokens, full[0].shape[-1]
    h, w = model.patch_embed.dynamic_feat_size(image.shape[-2:])
    product, rollout, attention = torch.eye(tokens, dtype=torch.float64), [], []
    for a in full:
        mixed = 0.5 * a.mean(dim=0) + 0.5 * torch.eye(tokens, dtype=torch.float64)
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        product = mixed @ product  # R_l = Â_l ... Â_1
        rollout.append(product[0, prefix:])
        attention.append(a[:, 0, prefix:].mean(dim=0))
    channel_weights = grad_x[0, prefix:].mean(dim=0)
    gradcam = (last_input["x"][0, prefix:].detach() @ channel_weights).clamp_min(0)
    return NaiveMaps(
        torch.stack(rollout).reshape(-1, h, w),
        torch.stack(attention).reshape(-1, h, w),
        gradcam.reshape(1, h, w),
        naive_gae(model, image, target, weights),
        grad_features[0, prefix:],
    )


def per_map(explained: dict[str, ExplainerMaps]) -> dict[str, torch.Tensor]:
    """Each explainer's maps as ``(B, L, h, w)``, Grad-CAM's one map as ``(B, 1, h, w)``."""
    return {name: m.blocks if m.blocks is not None else m.final[:, None] for name, m in explained.items()}


def assert_maps_match(maps: dict[str, torch.Tensor], index: int, reference: NaiveMaps, rtol=1e-4, atol=1e-6):
    for name in ATTENTION_EXPLAINERS:
        torch.testing.assert_close(maps[name][index].double(), getattr(reference, name), rtol=rtol, atol=atol)


def test_every_explainer_has_its_class_and_arrays():
    assert tuple(EXPLAINER_TYPES) == COMPARISON_EXPLAINERS
    assert all(cls.name == name for name, cls in EXPLAINER_TYPES.items())
    assert set(TOP_DOWN_EXPLAINERS) <= set(PER_BLOCK_EXPLAINERS)
    assert {n for n, arrays in EXPLAINER_ARRAYS.items() if len(arrays) == 2} == set(TOP_DOWN_EXPLAINERS)


@pytest.mark.parametrize("key", sorted(MODELS))
def test_supervised_maps_equal_naive(key):
    name, kwargs, size = MODELS[key]
    model = make(name, **kwargs)
    x = images(3, size)
    with DAAM(model) as daam, Explainers(daam, ATTENTION_EXPLAINERS) as explainers:
        result = daam(x)
        explained = explainers.explain(x, result)
    h, w = daam.grid_size(size)
    blocks = kwargs["depth"]
    assert list(explained) == list(ATTENTION_EXPLAINERS)
    assert {k: {a: tuple(v.shape) for a, v in m.arrays.items()} for k, m in explained.items()} == dict(
        rollout={"rollout": (3, blocks, h, w)},
        attention={"attention": (3, blocks, h, w)},
        gradcam={"gradcam": (3, h, w)},
        gae={"gae": (3, blocks, h, w)},
    )
    for m in explained.values():
        assert all(v.dtype == torch.float32 for v in m.arrays.values()) and not m.top_down
        assert m.blocks is None or torch.equal(m.final, m.blocks[:, -1])  # the last block's map is the method's
        assert torch.equal(m.through_final, m.final[:, None] if m.blocks is None else m.blocks)
    maps = per_map(explained)
    assert maps["gradcam"].sum() > 0 and (maps["gradcam"] >= 0).all()
    for i in range(3):
        reference = naive_maps(model, x[i], int(result.target[i]))
        assert_maps_match(maps, i, reference)
        # why Grad-CAM's layer is the last attention's input: at model.norm's output patch tokens get no gradient
        assert torch.count_nonzero(reference.final_norm_patch_gradient) == 0


def test_self_supervised_gradcam_explains_the_feature_score():
    model = make("vit_small_patch16_224", **dict(TINY, num_classes=0))
    x = images(2, (32, 32))
    weights = torch.rand(2, 48, generator=torch.Generator().manual_seed(3))
    with DAAM(model) as daam, Explainers(daam, ["gradcam", "rollout"]) as explainers:
        maps = per_map(explainers.explain(x, daam(x, weights=weights)))
    assert list(maps) == ["gradcam", "rollout"]
    for i in range(2):
        reference = naive_maps(model, x[i], None, weights=weights[i])
        torch.testing.assert_close(maps["gradcam"][i].double(), reference.gradcam, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(maps["rollout"][i].double(), reference.rollout, rtol=1e-4, atol=1e-6)


def test_dynamic_image_size_several_grids():
    model = make("vit_tiny_patch16_224", **dict(TINY, num_classes=7, dynamic_img_size=True))
    with DAAM(model) as daam, Explainers(daam, COMPARISON_EXPLAINERS) as explainers:
        for size in [(32, 32), (48, 16)]:
            x = images(2, size)
            result = daam(x)
            explained = explainers.explain(x, result)
            grid = (size[0] // 8, size[1] // 8)
            assert explained["rollout"].blocks.shape == (2, 3, *grid)
            assert explained["attnlrp"].arrays["attnlrp_input"].shape == (2, *grid)
            assert_maps_match(per_map(explained), 1, naive_maps(model, x[1], int(result.target[1])))


# -- the contract every explainer keeps -------------------------------------------------------------------------
def test_maps_do_not_depend_on_the_rest_of_the_batch():
    name, kwargs, size = MODELS["dinov2_registers"]
    model = make(name, **kwargs)
    x = images(5, size)
    with DAAM(model) as daam, Explainers(daam, COMPARISON_EXPLAINERS) as explainers:
        together = explainers.explain(x, daam(x))
        alone = explainers.explain(x[3:4], daam(x[3:4]))
        shuffled = explainers.explain(x[[4, 3, 0]], daam(x[[4, 3, 0]]))
    for name in COMPARISON_EXPLAINERS:
        for array in EXPLAINER_ARRAYS[name]:
            values = together[name].arrays[array]
            torch.testing.assert_close(values[3:4], alone[name].arrays[array], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(values[[4, 3, 0]], shuffled[name].arrays[array], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["float32", "bfloat16"])
def test_daam_results_unchanged_when_explainers_attach(autocast):
    model = make("deit_tiny_distilled_patch16_224", **MODELS["deit_distilled"][1])
    x = images(4, (32, 32))
    with DAAM(model, autocast_dtype=autocast) as daam:
        alone = daam(x)
        with Explainers(daam, COMPARISON_EXPLAINERS) as explainers:
            attached = daam(x)
            explained = explainers.explain(x, attached)
            again = daam(x)  # after an LRP pass too
    for name in ("block_maps", "daam", "coefficients", "output", "target"):
        assert torch.equal(getattr(alone, name), getattr(attached, name)), name
        assert torch.equal(getattr(alone, name), getattr(again, name)), name
    assert all(v.dtype == torch.float32 for m in explained.values() for v in m.arrays.values())
    if autocast is not None:  # the explainers' own arithmetic stays float32 from the bfloat16 activations
        with DAAM(model) as daam, Explainers(daam, ATTENTION_EXPLAINERS) as explainers:
            exact = per_map(explainers.explain(x, daam(x, target=alone.target)))
        maps = per_map(explained)
        for name in ATTENTION_EXPLAINERS:
            cosine = nn.functional.cosine_similarity(maps[name].flatten(1), exact[name].flatten(1))
            assert (cosine > 0.98).all(), (name, cosine)


def test_hooks_removed_and_memory_flat():
    model = make("vit_tiny_patch16_224", **MODELS["vit"][1])
    x = images(2, (32, 32))

    with DAAM(model) as daam:
        with Explainers(daam, COMPARISON_EXPLAINERS) as explainers:
            # each pass explainer's start hook on patch_embed; per block of 3, rollout's q_norm and k_norm,
            # attention's proj, GAE's q_norm, k_norm and proj; Grad-CAM's last attn; LRP swaps forwards instead
            assert hook_count(model) == 4 * 3 + 4 + 2 * 3 + 3 + 3 * 3 + 1
            explainers.explain(x, daam(x))
            before = live_tensors()
            for _ in range(20):
                explained = explainers.explain(x, daam(x))
            del explained
            assert live_tensors() <= before
        assert hook_count(model) == 4 * 3
        daam(x)
    assert hook_count(model) == 0
    assert all(p.grad is None for p in model.parameters())
    assert not [m for m in model.modules() if "forward" in m.__dict__]


def test_hooks_silent_outside_explanations_and_maps_read_once():
    model = make("vit_tiny_patch16_224", **MODELS["vit"][1])
    x, y = images(2, (32, 32)), images(3, (32, 32), seed=2)
    expected = model(x)
    daam = DAAM(model)
    with Explainers(daam, COMPARISON_EXPLAINERS) as explainers:  # attached before DAAM opens: follows its capture
        with pytest.raises(PipelineError, match="no maps for"):
            explainers.explain(x, None)
        with daam:
            torch.testing.assert_close(model(x), expected)
            result = daam(x)
            model(y)  # a plain forward pass between the call and the read changes nothing
            explained = explainers.explain(x, result)
            with pytest.raises(PipelineError, match=r"no maps for \['rollout', 'attention', 'gradcam', 'gae'\]"):
                explainers.explain(x, result)
            again = explainers.explain(x, daam(x))
    for name in COMPARISON_EXPLAINERS:
        for array, values in explained[name].arrays.items():
            assert torch.equal(again[name].arrays[array], values), array
    assert explained["rollout"].blocks.shape[0] == 2


def test_configuration_errors():
    model = make("vit_tiny_patch16_224", **MODELS["vit"][1])
    valid = "rollout, attention, gradcam, gae, attnlrp, cplrp"
    with DAAM(model) as daam:
        with pytest.raises(ConfigError, match=rf"\['lrp'\]; valid names: {valid}"):
            Explainers(daam, ["rollout", "lrp"])
        with pytest.raises(ConfigError, match="valid names"):
            Explainers(daam, [])
        assert Explainers(daam, "gradcam").names == ("gradcam",)
    with DAAM(make("vit_tiny_patch16_224", **dict(TINY, depth=1, num_classes=7))) as daam:
        hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in daam.model.modules())
        with pytest.raises(UnsupportedModelError, match="at least 2 blocks: VisionTransformer has 1, and block 0's"):
            Explainers(daam, ["rollout", "gradcam"])
        assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in daam.model.modules()) == hooks
        with Explainers(daam, ["rollout", "attnlrp"]) as explainers:
            x = images(1, (32, 32))
            explained = explainers.explain(x, daam(x))
            assert explained["rollout"].blocks.shape == (1, 1, 4, 4)
            assert explained["attnlrp"].arrays["attnlrp"].shape == (1, 1, 4, 4)
