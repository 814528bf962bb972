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
import sys
from pathlib import Path

import pytest
import torch

from pipeline import DAAM

sys.path.insert(0, str(Path(__file__).parent))
from tiny_vits import MODELS, TINY, assert_close_to_peak, make

oracle = pytest.importorskip("daam", reason="the oracle is the `daam-timm-vit` package (test extra)")

# (timm name, kwargs, input size (H, W), batch)
CASES = {
    **{key: (*case, 3) for key, case in MODELS.items()},
    "vit_small_224": ("vit_small_patch16_224", {}, (224, 224), 2),
}


@pytest.mark.parametrize("key", list(CASES))
def test_supervised_maps_equal_daam_timm_vit(key):
    name, kwargs, size, batch = CASES[key]
    model = make(name, **kwargs)
    x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(5))
    with DAAM(model) as daam:
        ours = daam(x)
    with oracle.DAAM(copy.deepcopy(model)) as theirs:  # it switches the copy's attention to the non-fused path
        reference = theirs(x)
    assert torch.equal(ours.target, reference.target)
    torch.testing.assert_close(ours.output, reference.output, rtol=1e-5, atol=1e-5)
    assert (reference.block_maps > 0).any()
    assert ours.daam.dtype == reference.maps.dtype == torch.float32
    assert_close_to_peak(ours.block_maps, reference.block_maps, allow_zero_maps=True)
    assert_close_to_peak(ours.daam, reference.maps, allow_zero_maps=True)


def test_given_targets_equal_daam_timm_vit():
    model = make("vit_tiny_patch16_224", **dict(TINY, num_classes=7))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    target = torch.tensor([0, 6, 3, 3])
    with DAAM(model) as daam:
        ours = daam(x, target=target)
    with oracle.DAAM(copy.deepcopy(model)) as theirs:
        reference = theirs(x, target=target)
    assert_close_to_peak(ours.daam, reference.maps, allow_zero_maps=True)
