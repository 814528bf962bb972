"""The display mapping of docs/method.md ("Display mapping"): maps as jet heat over the image, for pictures only.

For one image's maps ``D`` ``(L, h, w)``: ``x_l = D_l / max(D_{L-1})``, ``x_l = sigmoid(5 x_l) - 0.5``, each map
min-max normalised to [0, 255] and upsampled bilinearly onto the image; ``overlay = 0.4 jet(map) + 0.8 image``,
clipped to [0, 255]. The stored arrays are never changed: this works on copies.

The maps cover the model's input window in the image (:func:`pipeline.viz.source.input_window`): the whole image
for ``resize`` preprocessing, the centre crop's region for ``crop``. Pixels outside the window carry no heat and
are dimmed to ``OUTSIDE_DIM`` of their brightness.
"""

from __future__ import annotations

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["HEAT_WEIGHT", "IMAGE_WEIGHT", "OUTSIDE_DIM", "display_heat", "jet", "overlay"]

HEAT_WEIGHT = 0.4
IMAGE_WEIGHT = 0.8
OUTSIDE_DIM = 0.4
SIGMOID_GAIN = 5.0

Window = tuple[float, float, float, float]


def jet(values: np.ndarray) -> np.ndarray:
    """matplotlib's ``jet`` colour map (its 256-entry table): values in [0, 1] (clipped) -> RGB in [0, 255], shape
    ``(..., 3)`` float32."""
    x = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)
    return (matplotlib.colormaps["jet"](x)[..., :3] * 255.0).astype(np.float32)


def display_heat(
    maps: np.ndarray | torch.Tensor,
    size: tuple[int, int],
    *,
    window: Window | None = None,
    reference: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One image's maps as display heat on its pixel grid.

    Args:
        maps: ``(L, h, w)`` maps of one image (``D_l``, or ``M_l`` for a per-block row).
        size: ``(width, height)`` of the picture drawn on.
        window: ``(x0, y0, x1, y1)`` in the picture's pixels that the maps cover (may reach outside the picture:
            padding); default the whole picture.
        reference: The value that becomes 1 before the sigmoid; default ``max(maps[-1])`` (``max(D_{L-1})``). A
            reference <= 0 (all-zero maps) gives zero heat.

    Returns:
        ``(L, height, width)`` float32 heat in [0, 255], and the ``(height, width)`` bool mask of the pixels the
        maps cover.
    """
    x = torch.as_tensor(maps, dtype=torch.float32)
    if x.dim() != 3:
        raise ValueError(f"maps must be (L, h, w), got shape {tuple(x.shape)}")
    width, height = size
    ref = float(x[-1].max()) if reference is None else float(reference)
    x = torch.sigmoid(SIGMOID_GAIN * x / ref) - 0.5 if ref > 0 else torch.zeros_like(x)
    low, high = x.amin(dim=(-2, -1), keepdim=True), x.amax(dim=(-2, -1), keepdim=True)
    span = high - low
    x = torch.where(span > 0, (x - low) / span.clamp_min(torch.finfo(x.dtype).tiny), 0.0) * 255.0

    x0, y0, x1, y1 = (round(v) for v in (window or (0, 0, width, height)))
    up = F.interpolate(x[:, None], size=(max(y1 - y0, 1), max(x1 - x0, 1)), mode="bilinear", align_corners=False)
    heat = torch.zeros(x.shape[0], height, width)
    mask = torch.zeros(height, width, dtype=torch.bool)
    top, left, bottom, right = max(y0, 0), max(x0, 0), min(y1, height), min(x1, width)
    if bottom > top and right > left:
        heat[:, top:bottom, left:right] = up[:, 0, top - y0 : bottom - y0, left - x0 : right - x0]
        mask[top:bottom, left:right] = True
    return heat.clamp_(0.0, 255.0).numpy(), mask.numpy()


def overlay(
    maps: np.ndarray | torch.Tensor,
    image: np.ndarray,
    *,
    window: Window | None = None,
    reference: float | None = None,
) -> np.ndarray:
    """The docs/method.md overlays of one image's maps: ``0.4 jet(heat) + 0.8 image`` inside the window.

    Args:
        maps: ``(L, h, w)`` maps of one image.
        image: ``(height, width, 3)`` uint8 RGB picture (any size; the original image's aspect ratio).
        window: See :func:`display_heat`.
        reference: See :func:`display_heat`.

    Returns:
        ``(L, height, width, 3)`` uint8; pixels outside the window are the image dimmed to ``OUTSIDE_DIM``.
    """
    picture = np.asarray(image, dtype=np.float32)
    heat, mask = display_heat(maps, (picture.shape[1], picture.shape[0]), window=window, reference=reference)
    blended = HEAT_WEIGHT * jet(heat / 255.0) + IMAGE_WEIGHT * picture
    result = np.where(mask[..., None], blended, OUTSIDE_DIM * picture)
    return np.clip(np.rint(result), 0, 255).astype(np.uint8)
