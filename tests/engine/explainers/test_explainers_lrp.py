"""AttnLRP and CP-LRP: conservation, the reference implementation (PyPI ``lxt``) as an oracle, and forwards that are
swapped per module instance, leave the outputs unchanged and are restored on exit."""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from torch import nn

from pipeline import DAAM
from pipeline.engine.explainers import Explainers
from pipeline.engine.explainers.lrp import QKV_GRADIENT, relevance, relevance_rules
from pipeline.errors import UnsupportedModelError
from pipeline.names import EXPLAINER_ARRAYS, TOP_DOWN_EXPLAINERS

sys.path.insert(0, str(Path(__file__).parent.parent))
from tiny_vits import MODELS, TINY, assert_close_to_peak, images, make

RULES = list(QKV_GRADIENT)


def bias_free(name: str = "vit_tiny_patch16_224", **kwargs) -> nn.Module:
    """A float64 tiny ViT with every bias, the position embedding and the [class] token zero: nothing but the
    image's patches can hold relevance, so CP-LRP's input relevance sums to the explained score."""
    model = make(name, **dict(TINY, **kwargs)).double().requires_grad_(False)
    with torch.no_grad():
        for path, parameter in model.named_parameters():
            if path.endswith("bias") or path in ("pos_embed", "cls_token"):
                parameter.zero_()
    return model


# -- conservation -----------------------------------------------------------------------------------------------
def test_cplrp_conserves_the_logit_at_the_input_and_at_every_block():
    model = bias_free(num_classes=7)
    x = images(3, (32, 32)).double()
    logits = model(x)
    target = torch.tensor([0, 3, 6])
    blocks, embedding = relevance(model, x, QKV_GRADIENT["cplrp"], target=target)
    score = logits.gather(1, target[:, None])[:, 0]
    assert blocks.dtype == embedding.dtype == torch.float64
    torch.testing.assert_close(embedding.sum(-1), score, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(blocks.sum(-1), score[:, None].expand(3, 3), rtol=1e-12, atol=1e-12)  # all tokens


def test_cplrp_conserves_the_self_supervised_score():
    model = bias_free(num_classes=0)
    x = images(2, (32, 32)).double()
    weights = torch.rand(2, 48, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    _, embedding = relevance(model, x, QKV_GRADIENT["cplrp"], weights=weights)
    torch.testing.assert_close(embedding.sum(-1), (model(x) * weights).sum(-1), rtol=1e-12, atol=1e-12)


def test_the_stored_cplrp_input_map_sums_to_the_logit_in_float32():
    model = bias_free(num_classes=7).float()
    x = images(4, (32, 32))
    with DAAM(model) as daam, Explainers(daam, ["cplrp"]) as explainers:
        result = daam(x)
        maps = explainers.explain(x, result)["cplrp"]
    score = result.output.gather(1, result.target[:, None])[:, 0]
    torch.testing.assert_close(maps.arrays["cplrp_input"].sum(dim=(-2, -1)), score, rtol=1e-5, atol=1e-5)
    # at block 0's input the [class] token is zero: the patches hold all of it there too
    torch.testing.assert_close(maps.arrays["cplrp"][:, 0].sum(dim=(-2, -1)), score, rtol=1e-5, atol=1e-5)


def test_the_explainer_explains_daams_self_supervised_score():
    model = bias_free(num_classes=0).float()
    x = images(2, (32, 32))
    weights = torch.rand(2, 48, generator=torch.Generator().manual_seed(3))
    with DAAM(model) as daam, Explainers(daam, ["cplrp"]) as explainers:
        result = daam(x, weights=weights)
        maps = explainers.explain(x, result)["cplrp"]
    score = (model(x) * weights).sum(-1)
    torch.testing.assert_close(maps.arrays["cplrp_input"].sum(dim=(-2, -1)), score, rtol=1e-5, atol=1e-5)


def test_attnlrp_does_not_conserve_where_the_softmax_absorbs_relevance():
    """AttnLRP's softmax rule is not conservative (Achtibat et al., Prop. 3.1): the two rule sets differ exactly
    there, so on the same model CP-LRP conserves and AttnLRP does not."""
    model = bias_free(num_classes=7)
    x = images(2, (32, 32)).double()
    target = model(x).argmax(1)
    score = model(x).gather(1, target[:, None])[:, 0]
    _, attnlrp = relevance(model, x, QKV_GRADIENT["attnlrp"], target=target)
    assert ((attnlrp.sum(-1) - score).abs() > 1e-6 * score.abs()).all()


# -- the explainers ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", sorted(MODELS))
def test_explainer_maps_are_the_relevance_of_the_patch_tokens(key):
    name, kwargs, size = MODELS[key]
    model = make(name, **kwargs)
    x = images(3, size)
    with DAAM(model) as daam, Explainers(daam, ["attnlrp", "cplrp"]) as explainers:
        result = daam(x)
        explained = explainers.explain(x, result)
    h, w = daam.grid_size(size)
    prefix = daam.num_prefix_tokens
    for rule, maps in explained.items():
        blocks, embedding = relevance(model, x, QKV_GRADIENT[rule], target=result.target)
        block_array, input_array = EXPLAINER_ARRAYS[rule]
        assert maps.top_down and rule in TOP_DOWN_EXPLAINERS
        assert maps.arrays[block_array].shape == (3, kwargs["depth"], h, w)
        assert maps.arrays[input_array].shape == (3, h, w)
        assert all(v.dtype == torch.float32 for v in maps.arrays.values())
        assert torch.equal(maps.arrays[block_array], blocks[..., prefix:].unflatten(-1, (h, w)))
        assert torch.equal(maps.arrays[input_array], embedding.unflatten(-1, (h, w)))
        assert torch.equal(maps.blocks, maps.arrays[block_array].clamp_min(0))
        assert torch.equal(maps.final, maps.arrays[input_array].clamp_min(0))
        assert torch.equal(maps.through_final, maps.final[:, None])  # the sanity check compares the input map
        assert (maps.arrays[input_array] < 0).any()  # signed relevance is stored; statistics take its positive part


def test_bfloat16_autocast_gives_float32_maps_close_to_float32():
    model = make("vit_tiny_patch16_224", **dict(TINY, num_classes=7))
    x = images(4, (32, 32))
    with DAAM(model, autocast_dtype=torch.bfloat16) as daam, Explainers(daam, RULES) as explainers:
        result = daam(x)
        low = explainers.explain(x, result)
    with DAAM(model) as daam, Explainers(daam, RULES) as explainers:
        exact = explainers.explain(x, daam(x, target=result.target))
    for rule in RULES:
        array = f"{rule}_input"
        assert low[rule].arrays[array].dtype == torch.float32
        low_map, exact_map = low[rule].arrays[array].flatten(1), exact[rule].arrays[array].flatten(1)
        cosine = nn.functional.cosine_similarity(low_map, exact_map)
        assert (cosine > 0.95).all(), (rule, cosine)


# -- the forwards: per instance, outputs unchanged, restored ------------------------------------------------------
def _own_forwards(model: nn.Module) -> dict[str, object]:
    return {path: m.__dict__["forward"] for path, m in model.named_modules() if "forward" in m.__dict__}


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("key", ["vit", "qk_norm", "dinov2_registers"])
def test_swapped_forwards_leave_outputs_unchanged_and_are_restored(rule, key):
    name, kwargs, size = MODELS[key]
    model = make(name, **kwargs)
    x = images(2, size)
    expected = model(x)
    other = make(name, **kwargs)  # another instance of the same classes: nothing global may change
    with relevance_rules(model, QKV_GRADIENT[rule]):
        assert torch.equal(model(x), expected)
        with torch.enable_grad():
            assert torch.equal(model(x), expected)
        assert _own_forwards(other) == {}
        swapped = _own_forwards(model)
        norms = [p for p, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
        assert set(norms) <= set(swapped) and "patch_embed" in swapped and "blocks.0.mlp.act" in swapped
        assert "blocks.0.attn.qkv" in swapped and "blocks.0" in swapped
    assert _own_forwards(model) == {}
    assert torch.equal(model(x), expected)


def test_forwards_restored_on_an_exception_and_an_own_forward_kept():
    model = make("vit_tiny_patch16_224", **dict(TINY, num_classes=7))
    x = images(2, (32, 32))
    own = model.blocks[1].mlp.act.forward  # an instance attribute before the rules: restored as it was
    model.blocks[1].mlp.act.forward = own
    with pytest.raises(RuntimeError, match="boom"), relevance_rules(model, QKV_GRADIENT["attnlrp"]):
        assert model.blocks[1].mlp.act.forward is not own
        raise RuntimeError("boom")
    assert _own_forwards(model) == {"blocks.1.mlp.act": own}
    del model.blocks[1].mlp.act.forward
    with pytest.raises(RuntimeError), relevance_rules(model, QKV_GRADIENT["cplrp"]):
        relevance(model, x[:, :2], QKV_GRADIENT["cplrp"], target=torch.tensor([0, 1]))  # wrong channels: fails
    assert _own_forwards(model) == {}


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (dict(norm_layer=timm.layers.RmsNorm), "RmsNorm; the LRP rules"),
        (dict(mlp_layer=timm.layers.SwiGLU), "SwiGLU MLP"),
    ],
)
def test_models_without_the_rules_are_refused(layer, message):
    model = make("vit_tiny_patch16_224", **dict(TINY, num_classes=7, **layer))
    with DAAM(model) as daam, pytest.raises(UnsupportedModelError, match=message):
        Explainers(daam, ["rollout", "attnlrp"])
    assert not [m for m in model.modules() if m._forward_hooks or m._forward_pre_hooks]  # the rollout's hooks went


# -- the oracle: lxt, the reference implementation --------------------------------------------------------------
@pytest.fixture(scope="module")
def lxt():
    """lxt's rules, patches and torchvision ViT patch map, loaded on their own: ``import lxt.efficient`` imports the
    Hugging Face model patches, which need transformers (and fail with transformers 5), so the package's
    ``__init__`` files are stood in for while the three modules load, then taken out of ``sys.modules``."""
    spec = importlib.util.find_spec("lxt")
    if spec is None:
        pytest.skip(
            "the oracle is the PyPI package `lxt` 2.1, installed without its dependencies by the README's test command "
            "(they are transformers, accelerate, bitsandbytes and open_clip_torch, none of which these tests use): "
            "`pip install --no-deps 'lxt==2.1'`"
        )
    root = Path(spec.origin).parent
    packages = {"lxt": root, "lxt.efficient": root / "efficient", "lxt.efficient.models": root / "efficient" / "models"}
    names = ["lxt.efficient.rules", "lxt.efficient.patches", "lxt.efficient.models.vit_torch"]
    saved = {name: sys.modules.get(name) for name in [*packages, *names]}
    try:
        for name, path in packages.items():
            sys.modules[name] = types.ModuleType(name)
            sys.modules[name].__path__ = [str(path)]
        loaded = types.SimpleNamespace(**{name.rsplit(".", 1)[1]: importlib.import_module(name) for name in names})
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return loaded


def _eager_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Hugging Face's eager attention, which lxt's attention wrappers wrap: softmax(q k^T * scale) v."""
    return (query @ key.transpose(-2, -1) * module.scale).softmax(dim=-1) @ value


def tap(embedding: nn.Module, blocks: nn.Module) -> list[torch.Tensor]:
    """Hooks that collect the embedding's output, made a leaf of the graph, and each block's input."""
    taps = []

    def leaf(module, args, out):
        taps.append(out.detach().requires_grad_(True))
        return taps[-1]

    embedding.register_forward_hook(leaf)
    for block in blocks:
        block.register_forward_pre_hook(lambda module, args: taps.append(args[0]))
    return taps


def lxt_relevance(lxt, model: nn.Module, x: torch.Tensor, target: torch.Tensor, rule: str):
    """Relevance by lxt's own rule functions on a float64 copy of a timm ViT: its LayerNorm forward, its identity
    rule on the activations, its AttnLRP or CP-LRP attention wrapper around an eager attention; read as input x
    gradient at the patch embedding and at each block's input, as the engine reads it."""
    model = copy.deepcopy(model).double().eval().requires_grad_(False)
    for module in model.modules():  # a copy made inside `with DAAM(model)` carries the engine's hooks
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    wrap = {"attnlrp": lxt.patches.wrap_attention_forward, "cplrp": lxt.patches.cp_wrap_attention_forward}[rule]
    attention = wrap(_eager_attention)
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.forward = types.MethodType(lxt.patches.layer_norm_forward, module)
    for block in model.blocks:
        act, attn = block.mlp.act, block.attn
        act.original_forward = act.forward
        act.forward = types.MethodType(lxt.patches.non_linear_forward, act)

        def attn_forward(x, attn_mask=None, is_causal=False, attn=attn):
            batch, tokens, channels = x.shape
            qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            out = attention(attn, attn.q_norm(q), attn.k_norm(k), v)
            return attn.proj(out.transpose(1, 2).reshape(batch, tokens, channels))

        attn.forward = attn_forward
    taps = tap(model.patch_embed, model.blocks)
    with torch.enable_grad():
        logits = model(x.double())
        grads = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), taps)
    relevances = [(t * g).sum(-1).flatten(1) for t, g in zip(taps, grads, strict=True)]
    return torch.stack(relevances[1:], dim=1), relevances[0]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("key", sorted(MODELS))
def test_equal_to_lxt_rules_on_the_same_timm_modules(lxt, key, rule):
    name, kwargs, size = MODELS[key]
    model = make(name, **kwargs)
    x = images(2, size)
    target = model(x).argmax(1)
    blocks, embedding = relevance(copy.deepcopy(model).double(), x.double(), QKV_GRADIENT[rule], target=target)
    expected_blocks, expected_embedding = lxt_relevance(lxt, model, x, target, rule)
    assert_close_to_peak(embedding, expected_embedding, rel=1e-6)
    assert_close_to_peak(blocks, expected_blocks, rel=1e-6)


@contextlib.contextmanager
def lxt_torchvision_patches(lxt):
    """lxt's CP-LRP patch map for torchvision's ViT, which patches torch's GELU, LayerNorm and MultiheadAttention
    classes globally; undone on exit."""
    classes = list(lxt.vit_torch.cp_LRP)
    saved = {cls: dict(cls.__dict__) for cls in classes}
    try:
        for cls, patch in lxt.vit_torch.cp_LRP.items():
            assert patch(cls)
        yield
    finally:
        for cls, attributes in saved.items():
            for attribute in ("forward", "original_forward"):
                if attribute in attributes:
                    setattr(cls, attribute, attributes[attribute])
                elif attribute in cls.__dict__:
                    delattr(cls, attribute)


def torchvision_twin(model: nn.Module) -> nn.Module:
    """torchvision's VisionTransformer with a timm ``vit_*`` model's sizes and weights."""
    blocks = len(model.blocks)
    twin = torchvision.models.VisionTransformer(
        image_size=model.patch_embed.img_size[0],
        patch_size=model.patch_embed.patch_size[0],
        num_layers=blocks,
        num_heads=model.blocks[0].attn.num_heads,
        hidden_dim=model.embed_dim,
        mlp_dim=model.blocks[0].mlp.fc1.out_features,
        num_classes=model.num_classes,
    )
    paths = {
        "class_token": "cls_token",
        "conv_proj.weight": "patch_embed.proj.weight",
        "conv_proj.bias": "patch_embed.proj.bias",
        "encoder.pos_embedding": "pos_embed",
    }
    for kind in ("weight", "bias"):
        paths |= {f"encoder.ln.{kind}": f"norm.{kind}", f"heads.head.{kind}": f"head.{kind}"}
        for i in range(blocks):
            theirs, ours = f"encoder.layers.encoder_layer_{i}.", f"blocks.{i}."
            paths |= {
                f"{theirs}ln_1.{kind}": f"{ours}norm1.{kind}",
                f"{theirs}self_attention.in_proj_{kind}": f"{ours}attn.qkv.{kind}",
                f"{theirs}self_attention.out_proj.{kind}": f"{ours}attn.proj.{kind}",
                f"{theirs}ln_2.{kind}": f"{ours}norm2.{kind}",
                f"{theirs}mlp.0.{kind}": f"{ours}mlp.fc1.{kind}",
                f"{theirs}mlp.3.{kind}": f"{ours}mlp.fc2.{kind}",
            }
    state = {theirs: model.get_parameter(ours) for theirs, ours in paths.items()}
    twin.load_state_dict(state)
    return twin.double().eval().requires_grad_(False)


def test_cplrp_equals_lxt_on_torchvision_vit_with_the_same_weights(lxt):
    """The whole reference path: lxt's own CP-LRP patch map on torchvision's VisionTransformer, another
    implementation of the same architecture, against the engine on the timm model."""
    model = make("vit_tiny_patch16_224", **dict(TINY, num_classes=7))
    x = images(3, (32, 32)).double()
    twin = torchvision_twin(model)
    model = model.double()
    torch.testing.assert_close(twin(x), model(x), rtol=1e-10, atol=1e-10)
    target = model(x).argmax(1)
    blocks, embedding = relevance(model, x, QKV_GRADIENT["cplrp"], target=target)
    taps = tap(twin.conv_proj, twin.encoder.layers)
    with lxt_torchvision_patches(lxt), torch.enable_grad():
        score = twin(x).gather(1, target[:, None]).sum()
        grads = torch.autograd.grad(score, taps)
    assert nn.GELU.forward is not lxt.patches.non_linear_forward  # the global patches are undone
    expected_embedding = (taps[0] * grads[0]).sum(1).flatten(1)  # conv output (B, C, h, w)
    expected_blocks = torch.stack([(t * g).sum(-1) for t, g in zip(taps[1:], grads[1:], strict=True)], dim=1)
    assert_close_to_peak(embedding, expected_embedding, rel=1e-6)
    assert_close_to_peak(blocks, expected_blocks, rel=1e-6)
