"""The engine against an independent implementation: PyPI ``daam-timm-vit`` (import name ``daam``), supervised path.

``daam.DAAM(model)(x)`` hooks timm's non-fused attention (it sets ``attn.fused_attn = False`` and reads the
materialised attention after its ``attn_drop``), takes V from a separate ``F.linear`` with the value rows of the
qkv weight, and differentiates ``model(x)`` with a one-hot ``grad_outputs`` on the argmax class: Y is the
pre-softmax logit of the top-1 class, as in docs/method.md (for distilled DeiT ``model(x)`` in eval is the mean of
both heads, our Y too). Its block map is ``ReLU(sum_{h,d} a^h[j] ReLU(c)[h,d] v^h[j,d])`` over the patch tokens,
unnormalised, and ``result.maps`` is their cumulative sum over blocks: exactly our ``block_maps`` and ``daam``, so
the comparison needs no transform (its ``heatmap`` display normalisation is not used). The values differ only by
float32 rounding (its softmax runs inside the model, ours is recomputed; its V comes from another matmul).

Only the supervised path is compared: its self-supervised ("feature") mode applies ReLU to the coefficients too
(``g[:, rows].relu()`` in both modes), where docs/method.md step 4 keeps them signed, and its default weights
(``f_hat ** 2`` or a mean over reference features) are not the memory bank's dimension-wise weights.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from pipeline import DAAM

oracle = pytest.importorskip("daam", reason="the oracle is the `daam-timm-vit` package (test extra)")

TINY = dict(img_size=32, patch_size=8, depth=3, embed_dim=48, num_heads=3)

# (timm name, kwargs, input size (H, W), batch)
MODELS = {
    "vit": ("vit_tiny_patch16_224", dict(TINY, num_classes=7), (32, 32), 3),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(TINY, num_classes=7), (32, 32), 3),
    "dinov2_registers": (
        "vit_small_patch14_reg4_dinov2",
        dict(TINY, patch_size=7, img_size=28, num_classes=7, dynamic_img_size=False),
        (28, 28),
        3,
    ),
    "qk_norm": ("vit_tiny_patch16_224", dict(TINY, num_classes=7, qk_norm=True), (32, 32), 3),
    "non_square": ("vit_tiny_patch16_224", dict(TINY, img_size=(24, 40), num_classes=7), (24, 40), 3),
    "vit_small_224": ("vit_small_patch16_224", {}, (224, 224), 2),
}


def make(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def assert_close_to_peak(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    """(B, L, h, w) maps: every map within ``rel`` times the expected map's peak."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype == torch.float32
    error = (actual - expected).abs().amax(dim=(-2, -1))
    peak = expected.abs().amax(dim=(-2, -1))
    assert (error <= rel * peak + 1e-12).all(), (error / peak).max()


@pytest.mark.parametrize("key", list(MODELS))
def test_supervised_maps_equal_daam_timm_vit(key):
    name, kwargs, size, batch = MODELS[key]
    model = make(name, **kwargs)
    x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(5))
    with DAAM(model) as daam:
        ours = daam(x)
    with oracle.DAAM(copy.deepcopy(model)) as theirs:  # it switches the copy's attention to the non-fused path
        reference = theirs(x)
    assert torch.equal(ours.target, reference.target)
    torch.testing.assert_close(ours.output, reference.output, rtol=1e-5, atol=1e-5)
    assert (reference.block_maps > 0).any()
    assert_close_to_peak(ours.block_maps, reference.block_maps)
    assert_close_to_peak(ours.daam, reference.maps)


def test_given_targets_equal_daam_timm_vit():
    model = make("vit_tiny_patch16_224", **dict(TINY, num_classes=7))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    target = torch.tensor([0, 6, 3, 3])
    with DAAM(model) as daam:
        ours = daam(x, target=target)
    with oracle.DAAM(copy.deepcopy(model)) as theirs:
        reference = theirs(x, target=target)
    assert_close_to_peak(ours.daam, reference.maps)
