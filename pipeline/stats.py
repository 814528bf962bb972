"""Per-block statistics of DAAM maps, batched on the device.

The one implementation of these formulas (``schemas/blocks.schema.json`` describes each column). Maps are
non-negative (docs/method.md: M_l is a ReLU, D_l a sum of them). A map's *mass* is its sum; *normalised* means divided
by the mass. Coordinates are in patch units: patch ``(i, j)`` sits at row ``i``, column ``j`` of the ``h x w`` grid.

Undefined values: every float statistic of an all-zero map is NaN, its peak row/column is -1; box statistics are
NaN for a sample without boxes (an all-False row of ``box_mask``) or without a box mask; mask statistics are NaN for a
sample without a segmentation mask.

Segmentation against object masks follows the ImageNet-Segmentation evaluation of Chefer et al.'s published code
(hila-chefer/Transformer-Explainability, ``baselines/ViT/imagenet_seg_eval.py``), which AttnLRP reuses: the map is
upsampled bilinearly to the input size and min-max normalised; its pixels above the normalised map's mean are the
predicted object.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from pipeline.errors import TargetError

__all__ = [
    "EXPLAINER_STATISTICS",
    "MASK_STATISTICS",
    "STATISTICS",
    "average_precision",
    "block_statistics",
    "box_energy",
    "boxes_to_grid_mask",
    "explainer_statistics",
    "pointing_hit",
    "segmentation_scores",
    "top_iou",
    "upsample",
]

TOP_MASS_FRACTION = 0.1  # map_/daam_top10_mass: share of the patches whose mass is summed
IOU_FRACTION = 0.2  # daam_iou_final: share of the patches in each top set

_MAP_STATISTICS = (
    "entropy",
    "top10_mass",
    "peak_row",
    "peak_col",
    "centroid_row",
    "centroid_col",
    "spread",
    "box_energy",
    "point_hit",
    "mask_pixel_accuracy",
    "mask_miou",
    "mask_ap",
)
STATISTICS: tuple[str, ...] = (
    *(f"map_{name}" for name in _MAP_STATISTICS),
    *(f"daam_{name}" for name in _MAP_STATISTICS),
    "daam_cos_final",
    "daam_iou_final",
    "daam_change",
    "coef_l1",
    "coef_pos_frac",
)
"""Names of :func:`block_statistics`' values, in order; the columns of the blocks table after key, unit, block."""


def boxes_to_grid_mask(
    boxes_per_sample: Sequence[Tensor],
    input_size: tuple[int, int],
    grid: tuple[int, int],
    device: str | torch.device | None = None,
) -> Tensor:
    """Which patches of the grid lie in a sample's boxes.

    A patch is inside when its centre lies in any box of the sample (borders included).

    Args:
        boxes_per_sample: One ``(k, 4)`` tensor per sample, boxes as ``(x0, y0, x1, y1)`` in the pixel
            coordinates of the model input (after resizing/cropping); ``k`` may be 0.
        input_size: ``(H, W)`` of the model input in pixels.
        grid: ``(h, w)`` patch grid.
        device: Where the mask is built; defaults to the boxes' device.

    Returns:
        ``(B, h, w)`` bool mask; all False for a sample without boxes.

    Raises:
        TargetError: a sample's boxes are not of shape ``(k, 4)``.
    """
    for i, boxes in enumerate(boxes_per_sample):
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise TargetError(f"boxes of sample {i} have shape {tuple(boxes.shape)}, expected (k, 4)")
    (height, width), (h, w) = input_size, grid
    # Padding boxes are NaN: every comparison with them is False.
    boxes = pad_sequence(
        [b.to(device=device, dtype=torch.float32) for b in boxes_per_sample], batch_first=True, padding_value=math.nan
    )  # (B, K, 4)
    ys = (torch.arange(h, device=boxes.device) + 0.5) * (height / h)
    xs = (torch.arange(w, device=boxes.device) + 0.5) * (width / w)
    x0, y0, x1, y1 = (c[..., None] for c in boxes.unbind(-1))  # (B, K, 1) each
    in_y = (ys >= y0) & (ys <= y1)  # (B, K, h)
    in_x = (xs >= x0) & (xs <= x1)  # (B, K, w)
    return (in_y[..., :, None] & in_x[..., None, :]).any(dim=1)


def box_energy(maps: Tensor, box_mask: Tensor) -> Tensor:
    """Share of each map's mass inside the boxes.

    Args:
        maps: ``(B, ..., h, w)`` non-negative maps.
        box_mask: ``(B, h, w)`` from :func:`boxes_to_grid_mask`.

    Returns:
        ``(B, ...)`` float32; NaN for an all-zero map or a sample without boxes.
    """
    mask = _broadcast_mask(box_mask, maps)
    flat = maps.float().flatten(-2)
    energy = (flat * mask.flatten(-2)).sum(-1) / flat.sum(-1)
    return energy.masked_fill(~_has_boxes(box_mask, energy), math.nan)


def pointing_hit(maps: Tensor, box_mask: Tensor) -> Tensor:
    """Pointing game: 1.0 when a map's peak patch is inside the boxes, else 0.0.

    Args:
        maps: ``(B, ..., h, w)`` non-negative maps.
        box_mask: ``(B, h, w)`` from :func:`boxes_to_grid_mask`.

    Returns:
        ``(B, ...)`` float32; NaN for an all-zero map or a sample without boxes.
    """
    flat = maps.float().flatten(-2)
    mask = _broadcast_mask(box_mask, maps).flatten(-2).expand_as(flat)
    hit = mask.gather(-1, flat.argmax(-1, keepdim=True)).squeeze(-1).float()
    undefined = ~_has_boxes(box_mask, hit) | (flat.sum(-1) == 0)
    return hit.masked_fill(undefined, math.nan)


MASK_STATISTICS = ("pixel_accuracy", "miou", "ap")
"""Names of :func:`segmentation_scores`' values (``mask_<name>`` in the tables)."""

_SEGMENTATION_ELEMENTS = 1 << 22  # upsampled pixels per chunk of maps in segmentation_scores (memory bound)


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Maps on the patch grid upsampled bilinearly to pixels, as Chefer et al.'s code does (``F.interpolate(...,
    mode='bilinear')``, ``align_corners=False``).

    Args:
        maps: ``(..., h, w)`` maps.
        size: ``(H, W)`` of the model input.

    Returns:
        ``(..., H, W)`` float32.
    """
    h, w = maps.shape[-2:]
    up = F.interpolate(maps.float().reshape(-1, 1, h, w), size=tuple(size), mode="bilinear", align_corners=False)
    return up.view(*maps.shape[:-2], *size)


def average_precision(scores: Tensor, labels: Tensor) -> Tensor:
    """Average precision of each row's scores against its binary labels, as scikit-learn's
    ``average_precision_score``: ``sum_k (R_k - R_{k-1}) P_k`` over the distinct scores taken as thresholds, highest
    first (tied scores enter together).

    Args:
        scores: ``(R, N)`` scores.
        labels: ``(R, N)`` bool labels.

    Returns:
        ``(R,)`` float32; NaN for a row without a positive label.
    """
    order = scores.argsort(dim=-1, descending=True, stable=True)
    ranked = scores.gather(-1, order)
    true_positives = labels.gather(-1, order).float().cumsum(-1)
    last_of_ties = torch.ones_like(ranked, dtype=torch.bool)
    last_of_ties[:, :-1] = ranked[:, 1:] != ranked[:, :-1]
    at_threshold = torch.where(last_of_ties, true_positives, 0.0)
    before = torch.cat([torch.zeros_like(at_threshold[:, :1]), at_threshold.cummax(-1).values[:, :-1]], dim=-1)
    precision = true_positives / torch.arange(1, ranked.shape[-1] + 1, device=scores.device)
    gain = torch.where(last_of_ties, (true_positives - before) * precision, 0.0).sum(-1)
    return gain / true_positives[:, -1]  # 0/0 = NaN without positives


def segmentation_scores(maps: Tensor, masks: Tensor | None) -> dict[str, Tensor]:
    """Pixel accuracy, mIoU and mAP of each map thresholded against its sample's object mask, as Chefer et al.'s
    ImageNet-Segmentation evaluation computes them.

    Each map is upsampled bilinearly to the mask's size (:func:`upsample`) and min-max normalised to ``r`` in
    [0, 1]; the predicted object is ``r > mean(r)`` (the threshold of their code: parameter-free, per image).

    - ``pixel_accuracy``: share of pixels where the prediction equals the mask.
    - ``miou``: mean of the object's and the background's IoU (prediction against mask) on this image; a class
      absent from both is left out of the mean. Their script pools intersections and unions over the dataset
      before dividing; this is the per-image value, so that each sample has its row.
    - ``ap``: average precision (:func:`average_precision`) of the ``2 H W`` scores ``1 - r`` for the background
      and ``r`` for the object against the one-hot mask, as their ``get_ap_scores`` on ``(1 - r, r)``.

    A constant non-zero map (no threshold) predicts background everywhere and scores 0 on both channels, as their
    NaN handling does; an all-zero map is undefined (NaN), as every metric of the project.

    Args:
        maps: ``(B, ..., h, w)`` maps on the patch grid.
        masks: ``(B, H, W)`` float object masks at the input size: 1 on the object, 0 on the background, NaN on
            every pixel of a sample without a mask; None when no sample has one.

    Returns:
        :data:`MASK_STATISTICS`, each ``(B, ...)`` float32 on the maps' device; NaN without a mask.
    """
    lead = maps.shape[:-2]
    if masks is None:
        nan = torch.full(lead, math.nan, device=maps.device)
        return {name: nan.clone() for name in MASK_STATISTICS}
    batch, (h, w), size = maps.shape[0], maps.shape[-2:], tuple(masks.shape[-2:])
    flat = maps.float().reshape(batch, -1, h, w)  # (B, K, h, w)
    count = flat.shape[1]
    rows = flat.flatten(0, 1)  # (B K, h, w), row r of sample r // K
    objects = masks.flatten(1).nan_to_num(0.0) > 0.5  # (B, H W)
    pixels = objects.shape[-1]
    scores = {name: torch.empty(batch * count, device=maps.device) for name in MASK_STATISTICS}
    step = max(1, _SEGMENTATION_ELEMENTS // pixels)
    for start in range(0, rows.shape[0], step):
        up = upsample(rows[start : start + step], size).flatten(1)  # (c, H W)
        truth = objects[torch.arange(start, start + len(up), device=maps.device) // count]
        low, high = up.min(-1, keepdim=True).values, up.max(-1, keepdim=True).values
        defined = high > low
        r = torch.where(defined, (up - low) / (high - low), math.nan)
        predicted = r > r.mean(-1, keepdim=True)  # NaN compares False: all background
        scores["pixel_accuracy"][start : start + step] = (predicted == truth).float().mean(-1)
        ious = torch.stack([_iou(predicted, truth), _iou(~predicted, ~truth)], dim=-1)
        scores["miou"][start : start + step] = ious.nanmean(-1)
        channels = torch.cat([torch.where(defined, 1 - r, 0.0), torch.where(defined, r, 0.0)], dim=-1)
        scores["ap"][start : start + step] = average_precision(channels, torch.cat([~truth, truth], dim=-1))
    undefined = (flat == 0).flatten(-2).all(-1) | masks.flatten(1).isnan().any(-1)[:, None]  # (B, K)
    return {
        name: value.view(batch, count).masked_fill(undefined, math.nan).view(lead) for name, value in scores.items()
    }


def _iou(predicted: Tensor, truth: Tensor) -> Tensor:
    """``(c,)`` IoU of two ``(c, n)`` bool sets; NaN where both are empty."""
    return (predicted & truth).sum(-1).float() / (predicted | truth).sum(-1).float()


@torch.no_grad()
def block_statistics(
    block_maps: Tensor, daam: Tensor, coefficients: Tensor, box_mask: Tensor | None = None, masks: Tensor | None = None
) -> dict[str, Tensor]:
    """All per-block statistics of a batch, on the maps' device.

    Args:
        block_maps: ``(B, L, h, w)`` block maps M_l.
        daam: ``(B, L, h, w)`` accumulated maps D_l.
        coefficients: ``(B, L, C)`` channel coefficients c_l.
        box_mask: ``(B, h, w)`` from :func:`boxes_to_grid_mask`, or None (box statistics are then NaN).
        masks: ``(B, H, W)`` object masks at the input size (see :func:`segmentation_scores`), or None (mask
            statistics are then NaN).

    Returns:
        The values named in :data:`STATISTICS`, in that order, each ``(B, L)``: float32, int16 for peaks.
    """
    stats = {
        **_map_statistics(block_maps, box_mask, masks, "map_"),
        **_map_statistics(daam, box_mask, masks, "daam_"),
        **_accumulation_statistics(daam),
        "coef_l1": coefficients.float().abs().sum(-1),
        "coef_pos_frac": (coefficients > 0).float().mean(-1),
    }
    assert tuple(stats) == STATISTICS
    return stats


EXPLAINER_STATISTICS: tuple[str, ...] = (*_MAP_STATISTICS, "cos_final", "iou_final", "change")
"""Names of :func:`explainer_statistics`' values: the columns of the explainer_blocks table after its keys."""


@torch.no_grad()
def explainer_statistics(
    maps: Tensor, box_mask: Tensor | None = None, masks: Tensor | None = None, final: Tensor | None = None
) -> dict[str, Tensor]:
    """The blocks-table statistics of a comparison explainer's per-block maps (rollout, raw attention, GAE, LRP).

    The same formulas as D_l's in :func:`block_statistics`, with the explainer's last map as the final one unless
    ``final`` is given.

    Args:
        maps: ``(B, L, h, w)`` non-negative per-block maps of the explainer.
        box_mask: ``(B, h, w)`` or None.
        masks: ``(B, H, W)`` object masks or None.
        final: ``(B, h, w)`` the final map when it is not the last block's (the LRP explainers' input map).

    Returns:
        The values named in :data:`EXPLAINER_STATISTICS`, each ``(B, L)``.
    """
    stats = _map_statistics(maps, box_mask, masks, "")
    accumulation = _accumulation_statistics(maps, final)
    stats |= {name.removeprefix("daam_"): value for name, value in accumulation.items()}
    return {name: stats[name] for name in EXPLAINER_STATISTICS}


def _map_statistics(maps: Tensor, box_mask: Tensor | None, masks: Tensor | None, prefix: str) -> dict[str, Tensor]:
    h, w = maps.shape[-2:]
    n = h * w
    flat = maps.float().flatten(-2)  # (B, L, n)
    mass = flat.sum(-1)
    p = flat / mass[..., None]  # NaN rows for all-zero maps
    rows = torch.arange(h, device=maps.device, dtype=torch.float32).repeat_interleave(w)
    cols = torch.arange(w, device=maps.device, dtype=torch.float32).repeat(h)
    centroid_row = (p * rows).sum(-1)
    centroid_col = (p * cols).sum(-1)
    spread = (p * ((rows - centroid_row[..., None]) ** 2 + (cols - centroid_col[..., None]) ** 2)).sum(-1).sqrt()
    peak = flat.argmax(-1).masked_fill(mass == 0, -1)
    if box_mask is None:
        energy = hit = torch.full_like(mass, math.nan)
    else:
        energy, hit = box_energy(maps, box_mask), pointing_hit(maps, box_mask)
    values = {
        "entropy": -torch.special.xlogy(p, p).sum(-1) / (math.log(n) if n > 1 else 1.0),
        "top10_mass": flat.topk(math.ceil(TOP_MASS_FRACTION * n), dim=-1).values.sum(-1) / mass,
        "peak_row": torch.where(peak >= 0, peak // w, -1).to(torch.int16),
        "peak_col": torch.where(peak >= 0, peak % w, -1).to(torch.int16),
        "centroid_row": centroid_row,
        "centroid_col": centroid_col,
        "spread": spread,
        "box_energy": energy,
        "point_hit": hit,
        **{f"mask_{name}": value for name, value in segmentation_scores(maps, masks).items()},
    }
    return {prefix + name: value for name, value in values.items()}


def _accumulation_statistics(daam: Tensor, final_map: Tensor | None = None) -> dict[str, Tensor]:
    flat = daam.float().flatten(-2)  # (B, L, n)
    final = flat[:, -1:] if final_map is None else final_map.float().flatten(-2)[:, None]
    mass = flat.sum(-1)
    cos = (flat * final).sum(-1) / (flat.norm(dim=-1) * final.norm(dim=-1))  # 0/0 = NaN for all-zero maps
    top = _top_set(flat)
    top_final = top[:, -1:] if final_map is None else _top_set(final)
    iou = _set_iou(top, top_final).masked_fill((mass == 0) | (final.sum(-1) == 0), math.nan)
    p = flat / mass[..., None]
    change = (p[:, 1:] - p[:, :-1]).abs().sum(-1)
    change = torch.cat([torch.full_like(mass[:, :1], math.nan), change], dim=1)
    return {"daam_cos_final": cos, "daam_iou_final": iou, "daam_change": change}


def _top_set(flat: Tensor) -> Tensor:
    """Which patches of each flat map ``(..., n)`` are among its ``ceil(IOU_FRACTION * n)`` highest."""
    k = math.ceil(IOU_FRACTION * flat.shape[-1])
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, flat.topk(k, dim=-1).indices, True)


def _set_iou(a: Tensor, b: Tensor) -> Tensor:
    return (a & b).sum(-1).float() / (a | b).sum(-1).float()


@torch.no_grad()
def top_iou(maps: Tensor, others: Tensor) -> Tensor:
    """IoU of the top-20% patches (:data:`IOU_FRACTION`) of two sets of maps on the same grid, pairwise: the
    formula of ``daam_iou_final``, for maps of two models.

    Args:
        maps: ``(..., h, w)`` non-negative maps.
        others: Maps of the same shape.

    Returns:
        ``(...)`` float32; NaN where either map is all zero.
    """
    a, b = maps.float().flatten(-2), others.float().flatten(-2)
    undefined = (a.sum(-1) == 0) | (b.sum(-1) == 0)
    return _set_iou(_top_set(a), _top_set(b)).masked_fill(undefined, math.nan)


def _broadcast_mask(box_mask: Tensor, maps: Tensor) -> Tensor:
    """``(B, h, w)`` mask viewed as ``(B, 1, ..., h, w)`` to match ``maps``."""
    return box_mask.view(box_mask.shape[0], *[1] * (maps.dim() - 3), *box_mask.shape[1:])


def _has_boxes(box_mask: Tensor, like: Tensor) -> Tensor:
    """``(B,)`` whether each sample has a box, viewed to broadcast against ``like`` ``(B, ...)``."""
    return box_mask.flatten(1).any(-1).view(-1, *[1] * (like.dim() - 1))
