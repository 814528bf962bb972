"""Model-randomisation sanity checks (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018), batched on
the device.

An explanation that does not change when the model's weights are randomised explains nothing. The cascading check
randomises the blocks of the trained model from the top down, one more block at a time, re-explains the same images
(the trained model's explained class) after each step and measures how similar each map stays to the trained
model's: the Spearman rank correlation and the structural similarity (SSIM) of the two maps.

Blocks are randomised in place and restored bit for bit afterwards, so the explainer's hooks on the model serve the
randomised model too. A block is randomised as timm initialises a new ViT: every ``nn.Linear`` weight is drawn from
a truncated normal with standard deviation 0.02 (seeded, on the host, so every device draws the same weights) and
its bias set to zero; every other module with ``reset_parameters`` (LayerNorm, LayerScale, ...) is reset to its
initial values.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.names import SANITY_COLUMNS
from pipeline.stats import upsample

__all__ = ["CascadingRandomisation", "map_similarity", "spearman", "ssim"]

SSIM_WINDOW = 7  # scikit-image's structural_similarity defaults: 7 x 7 uniform window, K1, K2, sample covariance
SSIM_K1, SSIM_K2 = 0.01, 0.03
TRUNC_NORMAL_STD = 0.02  # timm's init of a ViT's Linear weights (init_weights_vit_timm)
_SIMILARITY_ELEMENTS = 1 << 22  # upsampled pixels per chunk of maps in map_similarity (memory bound)


class CascadingRandomisation:
    """Randomises a model's blocks from the top down, one more at a time, and restores the trained weights.

    Args:
        blocks: The model's blocks, in order (``model.blocks``).
        seed: Seed of the random weights: the same seed gives the same randomised model on every device.

    Example::

        cascade = CascadingRandomisation(model.blocks, seed=0)
        for randomised in cascade.steps():  # 1 .. L blocks randomised; trained again when the loop ends
            maps = explain(images)
    """

    def __init__(self, blocks: Sequence[nn.Module], seed: int) -> None:
        self.blocks = list(blocks)
        self.seed = seed
        self._random: list[dict[str, Tensor]] | None = None  # per block: Linear weights, drawn on first use

    def __len__(self) -> int:
        return len(self.blocks)

    def steps(self) -> Iterator[int]:
        """Randomise block L-1, then L-2, ... down to block 0, yielding the number randomised after each; the
        trained weights are back when the iteration ends, is closed early or raises."""
        trained = [{k: v.detach().clone() for k, v in _state(block).items()} for block in self.blocks]
        try:
            for count in range(1, len(self.blocks) + 1):
                self._randomise(len(self.blocks) - count)
                yield count
        finally:
            with torch.no_grad():
                for block, state in zip(self.blocks, trained, strict=True):
                    for name, value in _state(block).items():
                        value.copy_(state[name])

    @torch.no_grad()
    def _randomise(self, index: int) -> None:
        block = self.blocks[index]
        weights = self._weights()[index]
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(weights[name])
                if module.bias is not None:
                    module.bias.zero_()
            elif hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def _weights(self) -> list[dict[str, Tensor]]:
        """Every block's random Linear weights, on its device, drawn once from the seed on the host."""
        if self._random is None:
            generator = torch.Generator().manual_seed(self.seed)
            self._random = []
            for block in self.blocks:
                drawn = {}
                for name, module in block.named_modules():
                    if isinstance(module, nn.Linear):
                        value = torch.empty(module.weight.shape, dtype=torch.float32)
                        nn.init.trunc_normal_(value, std=TRUNC_NORMAL_STD, generator=generator)
                        drawn[name] = value.to(module.weight.device, module.weight.dtype)
                self._random.append(drawn)
        return self._random


def _state(block: nn.Module) -> dict[str, Tensor]:
    """The block's parameters and buffers by name (live tensors)."""
    return {**dict(block.named_parameters()), **dict(block.named_buffers())}


@torch.no_grad()
def map_similarity(randomised: Tensor, trained: Tensor, size: tuple[int, int]) -> dict[str, Tensor]:
    """Spearman rank correlation and SSIM of pairs of maps, both upsampled bilinearly to the input
    (:func:`pipeline.stats.upsample`).

    Args:
        randomised: ``(..., h, w)`` maps of the randomised model.
        trained: ``(..., h, w)`` the trained model's maps.
        size: ``(H, W)`` of the model input.

    Returns:
        :data:`~pipeline.names.SANITY_COLUMNS`, each ``(...)`` float32; NaN where either map is constant.
    """
    lead, (h, w) = randomised.shape[:-2], randomised.shape[-2:]
    a, b = randomised.reshape(-1, h, w), trained.reshape(-1, h, w)
    out = {name: torch.empty(a.shape[0], device=a.device) for name in SANITY_COLUMNS}
    step = max(1, _SIMILARITY_ELEMENTS // (size[0] * size[1]))
    for start in range(0, a.shape[0], step):
        up_a, up_b = upsample(a[start : start + step], size), upsample(b[start : start + step], size)
        out["spearman"][start : start + step] = spearman(up_a.flatten(1), up_b.flatten(1))
        out["ssim"][start : start + step] = ssim(_min_max(up_a), _min_max(up_b))
    return {name: value.view(lead) for name, value in out.items()}


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of each row pair of ``(R, N)`` values: the Pearson correlation of their ranks, tied
    values sharing their average rank (as ``scipy.stats.spearmanr``). ``(R,)`` float32; NaN for a constant row."""
    ra, rb = _average_ranks(a).double(), _average_ranks(b).double()  # float64: sums of squared ranks of 10^5 pixels
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    return ((ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1))).float()  # 0 / 0 = NaN for a constant row


def _average_ranks(values: Tensor) -> Tensor:
    """``(R, N)`` ranks from 1 of each row's values, tied values sharing their average rank."""
    order = values.argsort(dim=-1, stable=True)
    ranked = values.gather(-1, order)
    starts = torch.ones_like(ranked, dtype=torch.bool)
    starts[:, 1:] = ranked[:, 1:] != ranked[:, :-1]
    group = starts.long().cumsum(-1) - 1  # tie group of each sorted position
    position = torch.arange(values.shape[-1], device=values.device, dtype=torch.float32).expand_as(ranked)
    first = torch.full_like(position, math.inf).scatter_reduce(-1, group, position, "amin")
    last = torch.full_like(position, -math.inf).scatter_reduce(-1, group, position, "amax")
    average = (first.gather(-1, group) + last.gather(-1, group)) / 2 + 1
    return torch.empty_like(average).scatter_(-1, order, average)


def ssim(a: Tensor, b: Tensor) -> Tensor:
    """Mean structural similarity of each image pair ``(R, H, W)`` with values in [0, 1], as scikit-image's
    ``structural_similarity(a, b, data_range=1)`` computes it: a 7 x 7 uniform window, sample covariances,
    ``K1 = 0.01``, ``K2 = 0.03``, averaged over the window positions inside the image. ``(R,)`` float32; NaN
    propagates from NaN inputs."""
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    stacked = torch.stack([a, b, a * a, b * b, a * b], dim=1).float()  # (R, 5, H, W)
    means = F.avg_pool2d(stacked, SSIM_WINDOW, stride=1)
    mean_a, mean_b, mean_aa, mean_bb, mean_ab = means.unbind(1)
    unbiased = SSIM_WINDOW**2 / (SSIM_WINDOW**2 - 1)
    var_a, var_b = unbiased * (mean_aa - mean_a**2), unbiased * (mean_bb - mean_b**2)
    cov = unbiased * (mean_ab - mean_a * mean_b)
    index = ((2 * mean_a * mean_b + c1) * (2 * cov + c2)) / ((mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2))
    return index.flatten(1).mean(-1)


def _min_max(maps: Tensor) -> Tensor:
    """Each ``(R, H, W)`` map scaled to [0, 1]; NaN for a constant map."""
    flat = maps.flatten(1)
    low, high = flat.min(-1, keepdim=True).values, flat.max(-1, keepdim=True).values
    return torch.where(high > low, (flat - low) / (high - low), math.nan).view_as(maps)
