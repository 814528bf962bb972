"""The DAAM engine against METHOD.md: a naive float64 reference, identities, batching, modes and errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from pipeline import DAAM
from pipeline.engine.hooks import BlockCapture
from pipeline.engine.transfer import to_host
from pipeline.errors import InputError, TargetError, UnsupportedModelError

sys.path.insert(0, str(Path(__file__).parent))
from naive_daam import naive_daam
from tiny_vits import MODELS, TINY, hook_count, images, live_tensors, make

MODELS = {**MODELS, "deit3": ("deit3_small_patch16_224", dict(TINY, num_classes=7), (32, 32))}


def assert_matches_naive(result, index, reference, *, rtol=1e-4, atol=1e-6):
    torch.testing.assert_close(result.coefficients[index].double(), reference.coefficients, rtol=rtol, atol=atol)
    torch.testing.assert_close(result.block_maps[index].double(), reference.block_maps, rtol=rtol, atol=atol)
    torch.testing.assert_close(result.daam[index].double(), reference.daam, rtol=rtol, atol=atol)


@pytest.mark.parametrize("key", sorted(MODELS))
def test_supervised_equals_naive(key):
    name, kwargs, size = MODELS[key]
    model = make(name, **kwargs)
    x = images(3, size)
    with DAAM(model) as daam:
        result = daam(x)
    blocks, (h, w) = kwargs["depth"], daam.grid_size(size)
    assert result.block_maps.shape == (3, blocks, h, w) and result.block_maps.dtype == torch.float32
    assert result.coefficients.shape == (3, blocks, kwargs["embed_dim"])
    assert (result.block_maps >= 0).all() and result.block_maps.sum() > 0
    for i in range(3):
        reference = naive_daam(model, x[i])
        assert result.target[i] == reference.target
        torch.testing.assert_close(result.output[i].double(), reference.output, rtol=1e-4, atol=1e-5)
        assert_matches_naive(result, i, reference)


def test_full_size_architecture_equals_naive():
    model = make("vit_small_patch16_224", num_classes=10)
    x = images(2, (224, 224))
    with DAAM(model) as daam:
        result = daam(x)
    assert result.daam.shape == (2, 12, 14, 14) and result.coefficients.shape == (2, 12, 384)
    for i in range(2):
        assert_matches_naive(result, i, naive_daam(model, x[i]), rtol=1e-3, atol=1e-6)


def test_class_row_identity_on_fused_timm_attention():
    """sum_j S_l[j, :] = T_l[0, :]: the engine's [class] attention and values rebuild the input of attn.proj."""
    model = make("vit_small_patch14_reg4_dinov2", **MODELS["dinov2_registers"][1])
    assert model.blocks[0].attn.fused_attn
    class_rows = {}
    handles = [
        block.attn.proj.register_forward_pre_hook(lambda m, args, i=i: class_rows.__setitem__(i, args[0][:, 0]))
        for i, block in enumerate(model.blocks)
    ]
    seen = []
    with BlockCapture(model, on_gradient=lambda i, g: None) as capture, torch.no_grad():
        capture.active = True
        for i, block in enumerate(model.blocks):
            block.attn.proj.register_forward_hook(
                lambda m, a, o, i=i: seen.append((capture.blocks[i].attention, capture.blocks[i].values))
            )
        model(images(2, (28, 28)))
    for handle in handles:
        handle.remove()
    for i, (attention, values) in enumerate(seen):
        batch, _tokens, heads, dim = values.shape
        rebuilt = torch.einsum("bhn,bnhd->bhd", attention, values).reshape(batch, heads * dim)
        torch.testing.assert_close(rebuilt, class_rows[i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(attention.sum(-1), torch.ones(batch, heads))


def test_maps_do_not_depend_on_the_rest_of_the_batch():
    model = make("vit_tiny_patch16_224", **MODELS["vit"][1])
    x = images(5, (32, 32))
    with DAAM(model) as daam:
        together = daam(x)
        alone = daam(x[3:4])
        shuffled = daam(x[[4, 3, 0]])
    torch.testing.assert_close(together.daam[3:4], alone.daam, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(together.daam[3], shuffled.daam[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(together.coefficients[[4, 3, 0]], shuffled.coefficients, rtol=1e-5, atol=1e-7)


def test_given_targets_are_explained():
    model = make("vit_tiny_patch16_224", **MODELS["vit"][1])
    x = images(3, (32, 32))
    with DAAM(model) as daam:
        predicted = daam(x).target
        target = (predicted + 1) % 7
        result = daam(x, target=target.tolist())
    assert torch.equal(result.target, target)
    for i in range(3):
        assert_matches_naive(result, i, naive_daam(model, x[i], target=int(target[i])))


@pytest.mark.parametrize("head", [0, 7], ids=["no_head", "with_head"])
def test_self_supervised_weights_equal_naive(head):
    model = make("vit_small_patch16_224", **dict(TINY, num_classes=head))
    x = images(2, (32, 32))
    weights = torch.rand(2, 48, generator=torch.Generator().manual_seed(3))
    with DAAM(model) as daam:
        result = daam(x, weights=weights)
        via_function = daam(x, weights=lambda features: weights.clone())
    assert result.target is None and result.output.shape == (2, head or 48)
    torch.testing.assert_close(result.daam, via_function.daam)
    for i in range(2):
        reference = naive_daam(model, x[i], weights=weights[i])
        torch.testing.assert_close(result.output[i].double(), reference.output, rtol=1e-4, atol=1e-5)
        assert_matches_naive(result, i, reference)


def test_dynamic_image_size_several_sizes():
    model = make("vit_tiny_patch16_224", **dict(TINY, num_classes=7, dynamic_img_size=True))
    with DAAM(model) as daam:
        for size in [(32, 32), (24, 40), (48, 16)]:
            x = images(2, size)
            result = daam(x)
            assert result.daam.shape[-2:] == (size[0] // 8, size[1] // 8)
            assert_matches_naive(result, 1, naive_daam(model, x[1]))


def test_bfloat16_autocast_returns_float32_close_to_float32():
    model = make("vit_tiny_patch16_224", **MODELS["vit"][1])
    x = images(4, (32, 32))
    with DAAM(model) as daam:
        exact = daam(x)
    with DAAM(model, autocast_dtype=torch.bfloat16) as daam:
        approx = daam(x, target=exact.target)
    for name in ("block_maps", "daam", "coefficients"):
        value = getattr(approx, name)
        assert value.dtype == torch.float32
        cosine = torch.nn.functional.cosine_similarity(value.flatten(1), getattr(exact, name).flatten(1))
        assert (cosine > 0.98).all(), (name, cosine)


def test_hooks_removed_and_model_restored_and_memory_flat():
    model = make("vit_tiny_patch16_224", **MODELS["vit"][1]).train()
    x = images(2, (32, 32))

    with DAAM(model) as daam:
        assert hook_count(model) == 4 * 3 and not model.training
        assert not any(p.requires_grad for p in model.parameters())
        daam(x)
        before = live_tensors()
        for _ in range(100):
            result = daam(x)
        del result
        assert live_tensors() <= before
    assert hook_count(model) == 0 and model.training
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_model_runs_as_usual_between_explanations():
    model = make("vit_tiny_patch16_224", **MODELS["vit"][1])
    x = images(2, (32, 32))
    expected = model(x)
    with DAAM(model) as daam:
        torch.testing.assert_close(model(x), expected)
        daam(x)
        x.requires_grad_(True)
        model(x).sum().backward()  # hooks stay silent outside an explanation
    assert x.grad is not None


def test_no_grad_context_of_the_caller_is_overridden():
    model = make("vit_tiny_patch16_224", **MODELS["vit"][1])
    x = images(2, (32, 32))
    with DAAM(model) as daam:
        expected = daam(x)
        with torch.no_grad():
            result = daam(x)
    torch.testing.assert_close(result.daam, expected.daam)


@pytest.mark.parametrize(
    ("name", "kwargs", "reason"),
    [
        ("xcit_nano_12_p16_224", dict(depth=2), "XCA"),
        ("vit_medium_patch16_gap_256", dict(depth=2, img_size=32), "no [class] token"),
        ("vit_base_patch16_siglip_224", dict(depth=2, img_size=32), "no [class] token"),
        ("eva02_tiny_patch14_224", dict(depth=2, img_size=28), "global_pool='avg'"),
        ("beit_base_patch16_224", dict(depth=2, img_size=32, global_pool="token"), "not timm's token attention"),
        ("vit_tiny_patch16_224", dict(TINY, global_pool="avg"), "global_pool='avg'"),
        ("vit_tiny_patch16_224", dict(TINY, scale_attn_norm=True), "normalises or gates"),
    ],
)
def test_unsupported_models_are_refused_with_the_reason(name, kwargs, reason):
    model = make(name, **kwargs)
    with pytest.raises(UnsupportedModelError, match=reason.replace("[", r"\[").replace("]", r"\]")):
        DAAM(model)


def test_input_errors():
    model = make("vit_tiny_patch16_224", **MODELS["vit"][1])
    headless = make("vit_tiny_patch16_224", **dict(TINY, num_classes=0))
    x = images(2, (32, 32))
    with DAAM(model) as daam:
        with pytest.raises(InputError, match=r"\(40, 32\)"):
            daam(images(2, (40, 32)))
        with pytest.raises(InputError, match="must be"):
            daam(x[0])
        with pytest.raises(TargetError, match=r"outside \[0, 7\)"):
            daam(x, target=[1, 7])
        with pytest.raises(TargetError, match="one class per image"):
            daam(x, target=[1, 2, 3])
        with pytest.raises(TargetError, match="pooled features' shape"):
            daam(x, weights=torch.ones(2, 5))
        with pytest.raises(TargetError, match="not both"):
            daam(x, target=[1, 2], weights=torch.ones(2, 48))
        # the engine stays usable after an error
        assert daam(x).daam.shape == (2, 3, 4, 4)
    with DAAM(headless) as daam, pytest.raises(TargetError, match="no classifier"):
        daam(x)


def test_result_moves_with_one_packed_copy_keeping_dtypes():
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7), "c": torch.randn(2, 2).half()}
    moved = to_host(tensors, "meta")
    assert {k: (v.dtype, v.shape, v.device.type) for k, v in moved.items()} == {
        k: (v.dtype, v.shape, "meta") for k, v in tensors.items()
    }
    back = to_host(tensors, "cpu")
    for key, value in tensors.items():
        assert torch.equal(back[key], value)
