"""Random-init timm ViTs the engine tests share: every kind of [class]-token ViT the engine promises to explain,
at sizes that run in seconds on a CPU."""

from __future__ import annotations

import gc

import timm
import torch
from torch import nn

TINY = dict(img_size=32, patch_size=8, depth=3, embed_dim=48, num_heads=3)

# (timm name, kwargs, input size (H, W))
MODELS = {
    "vit": ("vit_tiny_patch16_224", dict(TINY, num_classes=7), (32, 32)),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(TINY, num_classes=7), (32, 32)),
    "dinov2_registers": (
        "vit_small_patch14_reg4_dinov2",
        dict(TINY, patch_size=7, img_size=28, num_classes=7, dynamic_img_size=False),
        (28, 28),
    ),
    "qk_norm": ("vit_tiny_patch16_224", dict(TINY, num_classes=7, qk_norm=True), (32, 32)),
    "non_square": ("vit_tiny_patch16_224", dict(TINY, img_size=(24, 40), num_classes=7), (24, 40)),
}


def make(name: str, **kwargs) -> torch.nn.Module:
    """A random-init model in eval mode, the same weights on every call."""
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def images(batch: int, size: tuple[int, int], seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def assert_close_to_peak(
    actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4, *, allow_zero_maps: bool = False
) -> None:
    """Every map (last two dims) within ``rel`` times the expected map's peak; all-zero expected maps fail the
    check unless ``allow_zero_maps`` (then they must be matched to within 1e-12)."""
    assert actual.shape == expected.shape
    error = (actual.to(expected.dtype) - expected).abs().amax(dim=(-2, -1))
    peak = expected.abs().amax(dim=(-2, -1))
    assert allow_zero_maps or (peak > 0).all()
    assert (error <= rel * peak + 1e-12).all(), (error / peak).max()


def hook_count(model: nn.Module) -> int:
    """Forward and forward-pre hooks registered on any module of ``model``."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def live_tensors() -> int:
    """Tensors alive after a collection: flat across repeated calls means nothing is kept between batches."""
    gc.collect()
    return sum(1 for o in gc.get_objects() if torch.is_tensor(o))
