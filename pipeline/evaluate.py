"""Evaluation of DAAM maps: localisation against boxes and faithfulness to the model, batched on the device.

- Localisation: the pointing game and the energy inside the boxes, the formulas of :mod:`pipeline.stats`
  (:func:`~pipeline.stats.pointing_hit`, :func:`~pipeline.stats.box_energy`) on the patch grid.
- Faithfulness: deletion and insertion AUC (Petsiuk et al., "RISE", BMVC 2018) on the patch grid.
- Perturbation: positive and negative perturbation AUC (Chefer, Gur & Wolf, "Transformer Interpretability Beyond
  Attention Visualization", CVPR 2021), of the target's probability and of top-1 correctness: on the patch grid
  (``protocol="patch"``), or exactly as their published code removes pixels (``protocol="chefer"``).
- Segmentation: pixel accuracy, mIoU and mAP of the thresholded map against object masks
  (:func:`pipeline.stats.segmentation_scores`, their ImageNet-Segmentation evaluation).
- Reference maps for comparison rows: a seeded uniform random map and a centre prior.

Undefined values are NaN, as in :mod:`pipeline.stats`: box metrics of a sample without boxes, and every metric of
an all-zero map (it ranks no patch above another).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms.functional import gaussian_blur

from pipeline.config import EvaluationConfig
from pipeline.errors import InputError, TargetError
from pipeline.stats import box_energy, pointing_hit, segmentation_scores, upsample

__all__ = [
    "baseline_images",
    "centre_prior",
    "deletion_insertion",
    "evaluate_batch",
    "localisation",
    "perturbation",
    "random_map",
]

PERTURBATION_FRACTIONS = tuple(i / 10 for i in range(10))
"""Removed fractions of the perturbation curves: 0, 0.1, ..., 0.9, as in Chefer et al.'s protocol."""


# -- reference maps -----------------------------------------------------------------------------------------------
def random_map(shape: Sequence[int], generator: torch.Generator) -> Tensor:
    """Uniform random maps in [0, 1) of ``shape`` on the generator's device (ties have probability zero).

    The values depend on the generator's device type as well as its seed (CPU and CUDA streams differ).
    """
    return torch.rand(tuple(shape), generator=generator, device=generator.device)


def centre_prior(h: int, w: int, device: str | torch.device | None = None) -> Tensor:
    """An isotropic Gaussian centred on the ``h x w`` grid, peak 1 at the centre.

    ``exp(-d^2 / (2 sigma^2))`` with ``d`` the distance in patches from the grid centre ``((h - 1) / 2, (w - 1) /
    2)`` and ``sigma = min(h, w) / 4``. Its ranking (by distance from the centre) and its peak do not depend on
    ``sigma``; only its box energy does.

    Returns:
        ``(h, w)`` float32.
    """
    sigma = min(h, w) / 4
    rows = torch.arange(h, device=device, dtype=torch.float32) - (h - 1) / 2
    cols = torch.arange(w, device=device, dtype=torch.float32) - (w - 1) / 2
    return torch.exp(-(rows[:, None] ** 2 + cols[None, :] ** 2) / (2 * sigma**2))


# -- localisation -------------------------------------------------------------------------------------------------
def localisation(maps: Tensor, box_mask: Tensor | None) -> dict[str, Tensor]:
    """Pointing-game hit and box energy of each map, e.g. per block of ``(B, L, h, w)`` DAAM.

    Args:
        maps: ``(B, ..., h, w)`` non-negative maps.
        box_mask: ``(B, h, w)`` from :func:`pipeline.stats.boxes_to_grid_mask`, or None.

    Returns:
        ``pointing_hit`` and ``box_energy``, each ``(B, ...)`` float32; NaN without boxes or for all-zero maps.
    """
    if box_mask is None:
        nan = torch.full(maps.shape[:-2], math.nan, device=maps.device)
        return {"pointing_hit": nan, "box_energy": nan.clone()}
    return {"pointing_hit": pointing_hit(maps, box_mask), "box_energy": box_energy(maps, box_mask)}


# -- faithfulness -------------------------------------------------------------------------------------------------
def baseline_images(
    images: Tensor,
    baseline: str,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Tensor:
    """What deletion puts in place of removed patches and insertion starts from.

    Args:
        images: ``(B, 3, H, W)`` normalised images.
        baseline: ``"blur"``: a Gaussian blur with an odd kernel of about a quarter of the image size per side
            (``(H // 4) | 1`` by ``(W // 4) | 1``, 57 x 57 for 224 x 224) and torchvision's default sigma for
            that kernel (``0.3 * ((k - 1) / 2 - 1) + 0.8``, 8.9 for 57); ``"zero"``: zeros in normalised space,
            i.e. the dataset mean colour; ``"mean"``: each image's per-channel mean; ``"black"``: zeros of the
            unnormalised [0, 1] image, ``-mean / std`` in normalised space (what Chefer et al.'s code removes
            pixels with).
        mean: The normalisation's per-channel mean of [0, 1] pixels; needed for ``"black"``.
        std: Its per-channel standard deviation; needed for ``"black"``.

    Returns:
        ``(B, 3, H, W)`` like ``images``.

    Raises:
        InputError: ``"black"`` without ``mean`` and ``std``.
    """
    EvaluationConfig(baseline=baseline)  # the job's rule for baselines, raising ConfigError
    if baseline == "zero":
        return torch.zeros_like(images)
    if baseline == "mean":
        return images.mean(dim=(-2, -1), keepdim=True).expand_as(images).contiguous()
    if baseline == "black":
        if mean is None or std is None:
            raise InputError("baseline 'black' needs the normalisation's mean and std")
        black = -torch.tensor(mean, dtype=torch.float64) / torch.tensor(std, dtype=torch.float64)
        return black.to(images.device, images.dtype).view(1, -1, 1, 1).expand_as(images).contiguous()
    height, width = images.shape[-2:]
    return gaussian_blur(images, kernel_size=[(width // 4) | 1, (height // 4) | 1])


@torch.no_grad()
def deletion_insertion(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    target: Tensor,
    *,
    steps: int = 16,
    baseline: str = "blur",
    batch_size: int = 64,
    autocast_dtype: torch.dtype | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> dict[str, Tensor]:
    """Deletion and insertion AUC of maps on the patch grid (RISE), batched on the device.

    Patches are ranked by the map, highest first, ties by patch index (row-major). At step ``s`` of ``steps`` the
    top ``k_s = floor(s * n / steps)`` of the ``n`` patches are removed (deletion: replaced by the baseline) or
    revealed (insertion: the original on the baseline); the grid is upsampled to pixels with nearest
    interpolation, so whole patches move. The curve is the softmax probability of ``target`` at the ``steps + 1``
    points, the AUC its trapezoid integral over the removed fraction ``k_s / n`` in [0, 1]. Lower deletion and
    higher insertion AUC mean a more faithful map.

    The unperturbed image and the baseline are shared by every curve of a sample, so a sample costs
    ``2 + 2 * M * (steps - 1)`` forward passes for ``M`` maps, run in chunks of ``batch_size`` images.

    Args:
        model: The classifier, in eval mode, on the images' device; ``model(images)`` gives ``(B, K)`` logits.
        images: ``(B, 3, H, W)`` normalised images.
        maps: ``(B, h, w)`` or ``(B, M, h, w)`` maps on the model's patch grid (any ``h x w`` dividing the image
            into whole patches).
        target: ``(B,)`` class whose probability is followed.
        steps: Number of steps.
        baseline: See :func:`baseline_images`.
        batch_size: Images per forward pass; does not change the result.
        autocast_dtype: Run the model under ``torch.autocast`` with this dtype; probabilities are float32.
        mean, std: The images' normalisation, for the ``"black"`` baseline.

    Returns:
        ``deletion`` and ``insertion``: ``(B,)`` or ``(B, M)`` AUCs; ``deletion_curve`` and ``insertion_curve``:
        the curves, ``(B, [M,] steps + 1)``; all float32, NaN for all-zero maps.

    Raises:
        InputError: shapes that do not fit together.
        TargetError: a model without a classifier, or target classes outside its logits.
        ConfigError: invalid ``steps``, ``baseline`` or ``batch_size``.
    """
    EvaluationConfig(steps=steps, baseline=baseline, batch_size=batch_size)  # the job's rules, raising ConfigError
    single, maps, target = _check_inputs(model, images, maps, target, "deletion/insertion")
    batch, num_maps, h, w = maps.shape
    n = h * w
    keep = _keep_masks(maps.flatten(-2), steps)  # (B, Q, n)
    base = baseline_images(images, baseline, mean=mean, std=std)
    masks = _patch_masks(keep, (h, w), images.shape[-2:])
    probs, _ = _target_probabilities(model, images, base, masks, keep.shape[1], target, batch_size, autocast_dtype)

    # Q = [original, baseline, deletion steps 1..steps-1 per map, insertion steps 1..steps-1 per map]
    original, base = probs[:, 0, None, None].expand(-1, num_maps, 1), probs[:, 1, None, None].expand(-1, num_maps, 1)
    inner = probs[:, 2:].view(batch, 2, num_maps, steps - 1)
    curves = {
        "deletion": torch.cat([original, inner[:, 0], base], dim=-1),
        "insertion": torch.cat([base, inner[:, 1], original], dim=-1),
    }
    fractions = _removed_counts(n, steps, maps.device).float() / n
    undefined = (maps.flatten(-2) == 0).all(-1)  # (B, M)
    result = {}
    for name, curve in curves.items():
        curve = curve.masked_fill(undefined[..., None], math.nan)
        result[name] = torch.trapezoid(curve, fractions, dim=-1)
        result[f"{name}_curve"] = curve
    return {k: v[:, 0] for k, v in result.items()} if single else result


@torch.no_grad()
def perturbation(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    target: Tensor,
    *,
    baseline: str = "blur",
    protocol: str = "patch",
    batch_size: int = 64,
    autocast_dtype: torch.dtype | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> dict[str, Tensor]:
    """Positive and negative perturbation AUC of maps (Chefer et al. 2021), batched on the device.

    At each fraction ``f_i = i / 10`` of :data:`PERTURBATION_FRACTIONS` the ``k_i`` most relevant units of the map
    are replaced by the baseline for *positive* perturbation (a faithful map's curve drops fast: lower AUC is
    better), the ``k_i`` least relevant for *negative* (higher is better). Two curves follow each: the softmax
    probability of ``target`` and top-1 correctness (1 where the perturbed image's argmax is ``target``); the AUCs
    are their trapezoid integrals over the nominal fractions 0 ... 0.9, ``auc(arange(0, 1, 0.1), curve)``, the
    unperturbed image at 0.

    - ``protocol="patch"``: the units are the ``n`` patches of the grid, ranked as in :func:`deletion_insertion`
      (highest first, ties by patch index); ``k_i = floor(i * n / 10)``; negative removes the last ``k_i`` of
      that ranking.
    - ``protocol="chefer"``: what hila-chefer/Transformer-Explainability's
      ``baselines/ViT/pertubation_eval_from_hdf5.py`` does. The units are the ``H W`` pixels of the map upsampled
      bilinearly to the input (:func:`pipeline.stats.upsample`, their ``F.interpolate(..., mode='bilinear')``);
      ``k_i = int(H W * f_i)`` (their ``int(base_size * perturbation_steps[i])``); positive removes the top
      ``k_i`` of the map and negative the top ``k_i`` of its negation (their ``torch.topk(vis, k)`` on ``vis`` or
      ``-vis``, whose choice among tied values torch leaves open: ties go to the lower pixel index here). Their
      code zeroes the removed pixels of the [0, 1] image (``baseline="black"``) and scores top-1 against the
      dataset label (pass the labels as ``target``); :func:`evaluate_batch` does both.

    The unperturbed image is shared by every curve of a sample, so a sample costs ``1 + 2 * M * 9`` forward passes
    for ``M`` maps, run in chunks of ``batch_size`` images.

    Args:
        model, images, maps, target, baseline, batch_size, autocast_dtype, mean, std: As for
            :func:`deletion_insertion`.
        protocol: ``"patch"`` or ``"chefer"``.

    Returns:
        ``positive``, ``negative`` (probability AUCs), ``positive_top1``, ``negative_top1`` (top-1 correctness
        AUCs): ``(B,)`` or ``(B, M)``; the curves ``<name>_curve``: ``(B, [M,] 10)``; all float32, NaN for all-zero
        maps.

    Raises:
        InputError, TargetError, ConfigError: as :func:`deletion_insertion`, and an unknown ``protocol``.
    """
    EvaluationConfig(baseline=baseline, batch_size=batch_size, protocol=protocol)  # the job's rules: ConfigError
    single, maps, target = _check_inputs(model, images, maps, target, "perturbation")
    batch, num_maps, h, w = maps.shape
    points = len(PERTURBATION_FRACTIONS)
    base = baseline_images(images, baseline, mean=mean, std=std)
    if protocol == "chefer":
        masks, queries = _pixel_masks(maps, images.shape[-2:])
    else:
        n = h * w
        rank = _ranks(maps.flatten(-2))[:, :, None, :]  # (B, M, 1, n)
        counts = torch.arange(1, points, device=maps.device)[:, None] * n // points  # (9, 1): k_1 ... k_9
        keep = torch.cat(
            [
                torch.ones(batch, 1, n, dtype=torch.bool, device=maps.device),  # the original
                (rank >= counts).flatten(1, 2),  # positive: the top k_i removed
                (rank < n - counts).flatten(1, 2),  # negative: the bottom k_i removed
            ],
            dim=1,
        )
        masks, queries = _patch_masks(keep, (h, w), images.shape[-2:]), keep.shape[1]
    probs, correct = _target_probabilities(model, images, base, masks, queries, target, batch_size, autocast_dtype)
    fractions = torch.tensor(PERTURBATION_FRACTIONS, device=maps.device)
    undefined = (maps.flatten(-2) == 0).all(-1)  # (B, M)
    result = {}
    for suffix, values in (("", probs), ("_top1", correct)):
        original = values[:, 0, None, None].expand(-1, num_maps, 1)
        inner = values[:, 1:].view(batch, 2, num_maps, points - 1)
        for i, name in enumerate(("positive", "negative")):
            curve = torch.cat([original, inner[:, i]], dim=-1).masked_fill(undefined[..., None], math.nan)
            result[name + suffix] = torch.trapezoid(curve, fractions, dim=-1)
            result[f"{name}{suffix}_curve"] = curve
    return {k: v[:, 0] for k, v in result.items()} if single else result


MaskMaker = Callable[[int, int], Tensor]
"""``masks(start, stop)``: which pixels keep the original image in the perturbed images ``start ... stop - 1`` of
a batch's ``(B, Q)`` perturbed images (row-major), as ``(stop - start, 1, H, W)`` bool."""


def _patch_masks(keep: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> MaskMaker:
    """The pixel masks of keep masks ``(B, Q, n)`` on the ``h x w`` patch grid: nearest upsampling, so whole patches
    move.

    Raises:
        InputError: the grid does not divide the images into whole patches.
    """
    (height, width), (h, w) = size, grid
    if height % h or width % w:
        raise InputError(f"a {h}x{w} patch grid does not divide {height}x{width} images into patches")
    flat = keep.flatten(0, 1)

    def masks(start: int, stop: int) -> Tensor:
        chunk = flat[start:stop].view(-1, 1, h, w).float()
        return F.interpolate(chunk, size=(height, width), mode="nearest").bool()

    return masks


def _pixel_masks(maps: Tensor, size: tuple[int, int]) -> tuple[MaskMaker, int]:
    """The pixel masks of Chefer et al.'s protocol for maps ``(B, M, h, w)``: the original, then per map the
    positive steps, then per map the negative steps (the query order of :func:`perturbation`), and their number
    ``Q = 1 + 2 * M * 9`` per sample.

    Only the pixel ranks are held, ``(B, M, H W)`` int32 for each direction; a chunk's masks are made when asked.
    """
    num_maps = maps.shape[1]
    height, width = size
    pixels = height * width
    flat = upsample(maps, (height, width)).flatten(-2)  # (B, M, H W)
    ranks = torch.stack([_ranks(flat), _ranks(-flat)]).to(torch.int32)  # (2, B, M, H W): positive, negative
    counts = torch.tensor([0] + [int(pixels * f) for f in PERTURBATION_FRACTIONS[1:]], device=maps.device)
    steps = len(PERTURBATION_FRACTIONS) - 1
    queries = 1 + 2 * num_maps * steps

    def masks(start: int, stop: int) -> Tensor:
        index = torch.arange(start, stop, device=maps.device)
        sample, query = index // queries, index % queries
        inner = (query - 1).clamp(min=0)  # 0 for the original, whose count is 0: nothing removed
        direction, rest = inner // (num_maps * steps), inner % (num_maps * steps)
        step = torch.where(query == 0, 0, rest % steps + 1)
        rank = ranks[direction, sample, rest // steps]  # (c, H W)
        return (rank >= counts[step, None]).view(-1, 1, height, width)

    return masks, queries


def _check_inputs(
    model: nn.Module, images: Tensor, maps: Tensor, target: Tensor, metric: str
) -> tuple[bool, Tensor, Tensor]:
    """Whether ``maps`` is one map per image, the maps as ``(B, M, h, w)`` and ``target`` as a long tensor."""
    single = maps.dim() == 3
    maps = (maps[:, None] if single else maps).to(images.device)
    if images.dim() != 4 or maps.dim() != 4 or maps.shape[0] != images.shape[0]:
        raise InputError(
            f"need images (B, 3, H, W) and maps (B, [M,] h, w), got {tuple(images.shape)} and {tuple(maps.shape)}"
        )
    target = torch.as_tensor(target, device=images.device).long()
    if target.shape != images.shape[:1]:
        raise TargetError(f"target must hold one class per image ({images.shape[0]},), got {tuple(target.shape)}")
    if getattr(model, "num_classes", None) == 0:
        raise TargetError(f"{type(model).__name__} has no classifier: {metric} need class probabilities")
    return single, maps, target


def _ranks(maps: Tensor) -> Tensor:
    """``rank[..., j]``: the position of patch j when ``maps (..., n)`` is sorted highest first, ties by index."""
    order = maps.argsort(dim=-1, descending=True, stable=True)  # stable: equal values keep patch order
    positions = torch.arange(maps.shape[-1], device=maps.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def _removed_counts(n: int, steps: int, device: torch.device) -> Tensor:
    """``floor(s * n / steps)`` for ``s = 0 ... steps``: 0 first, ``n`` last."""
    return torch.arange(steps + 1, device=device) * n // steps


def _keep_masks(maps: Tensor, steps: int) -> Tensor:
    """Which patches keep the original image in each perturbed image.

    Args:
        maps: ``(B, M, n)`` flat maps.

    Returns:
        ``(B, Q, n)`` bool with ``Q = 2 + 2 * M * (steps - 1)``: all patches (the original), none (the baseline),
        then per map the deletion steps 1 ... steps-1 (all but the top k), then the insertion steps (the top k).
    """
    batch, _, n = maps.shape
    rank = _ranks(maps)  # rank[b, m, j]: position of patch j
    counts = _removed_counts(n, steps, maps.device)[1:-1]
    top = rank[:, :, None, :] < counts[:, None]  # (B, M, steps - 1, n)
    ends = torch.ones(batch, 2, n, dtype=torch.bool, device=maps.device)
    ends[:, 1] = False
    return torch.cat([ends, (~top).flatten(1, 2), top.flatten(1, 2)], dim=1)


def _target_probabilities(
    model: nn.Module,
    images: Tensor,
    baseline: Tensor,
    masks: MaskMaker,
    queries: int,
    target: Tensor,
    batch_size: int,
    autocast_dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor]:
    """Softmax probability of ``target`` and top-1 correctness (argmax == ``target``, 0 or 1) for every perturbed
    image: ``queries`` per sample, the pixels ``masks`` keeps from the image and the others from ``baseline``;
    each ``(B, queries)`` float32."""
    batch = images.shape[0]
    sample = torch.arange(batch, device=images.device).repeat_interleave(queries)
    probs = torch.empty(batch * queries, device=images.device)
    correct = torch.empty(batch * queries, device=images.device)
    autocast = (
        torch.autocast(images.device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    for start in range(0, batch * queries, batch_size):
        rows = sample[start : start + batch_size]
        pixels = masks(start, start + len(rows))
        with autocast:
            logits = model(torch.where(pixels, images[rows], baseline[rows]))
        if start == 0:
            _check_target(target, logits)
        probs[start : start + batch_size] = logits.float().softmax(-1).gather(1, target[rows, None]).squeeze(1)
        correct[start : start + batch_size] = (logits.argmax(dim=-1) == target[rows]).float()
    return probs.view(batch, queries), correct.view(batch, queries)


def _check_target(target: Tensor, logits: Tensor) -> None:
    if logits.dim() != 2:
        raise TargetError(f"model output of shape {tuple(logits.shape)} is not (B, K) logits")
    bad = (target < 0) | (target >= logits.shape[1])
    if bad.any():
        raise TargetError(f"target classes {target[bad].tolist()} outside [0, {logits.shape[1]})")


# -- per batch ----------------------------------------------------------------------------------------------------
def evaluate_batch(
    model: nn.Module,
    images: Tensor,
    daam: Tensor,
    target: Tensor | None,
    box_mask: Tensor | None = None,
    config: EvaluationConfig | None = None,
    *,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    explainer_maps: Mapping[str, Tensor] | None = None,
    masks: Tensor | None = None,
    labels: Tensor | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> dict[str, dict[str, Tensor]]:
    """Every configured metric of a batch's final DAAM map, the reference maps and other explainers' maps.

    Args:
        model: The explained classifier, in eval mode (a model inside an open :class:`~pipeline.engine.DAAM`
            works: its hooks capture nothing outside a DAAM call).
        images: ``(B, 3, H, W)`` normalised images.
        daam: ``(B, L, h, w)`` accumulated maps; the final map ``daam[:, -1]`` is evaluated.
        target: ``(B,)`` explained classes; required for faithfulness and patch-level perturbation.
        box_mask: ``(B, h, w)`` from :func:`pipeline.stats.boxes_to_grid_mask`, or None (box metrics are NaN).
        config: What to compute; default ``EvaluationConfig()``.
        generator: Draws the random reference maps, on the images' device. Default: a new generator seeded with
            ``config.seed``, so every call draws the same maps; pass one generator per unit of work for
            independent maps per batch.
        autocast_dtype: Passed to :func:`deletion_insertion` and :func:`perturbation`.
        explainer_maps: Final maps ``(B, h, w)`` of comparison explainers by name, evaluated like DAAM's.
        masks: ``(B, H, W)`` object masks for segmentation (see :func:`pipeline.stats.segmentation_scores`), or
            None (segmentation metrics are NaN).
        labels: ``(B,)`` the shards' labels, -1 where a sample has none: the target of ``protocol: chefer``
            perturbation (NaN for samples without a label).
        mean, std: The images' normalisation (the ``black`` baseline, which ``protocol: chefer`` uses).

    Returns:
        ``{method: {metric: (B,) float32}}`` on the images' device: methods ``daam``, then the configured
        references (``random``, ``centre``), then the explainers; metrics :attr:`EvaluationConfig.columns`.

    Raises:
        TargetError: faithfulness or perturbation is configured but ``target`` is None (self-supervised mode).
    """
    config = config or EvaluationConfig()
    if daam.dim() != 4 or daam.shape[0] != images.shape[0]:
        raise InputError(f"daam must be (B, L, h, w) for {images.shape[0]} images, got {tuple(daam.shape)}")
    batch, _, h, w = daam.shape
    maps = {"daam": daam[:, -1].float()}
    if "random" in config.references:
        generator = generator or torch.Generator(device=images.device).manual_seed(config.seed)
        maps["random"] = random_map((batch, h, w), generator)
    if "centre" in config.references:
        maps["centre"] = centre_prior(h, w, device=images.device).expand(batch, h, w)
    maps |= {name: values.float() for name, values in (explainer_maps or {}).items()}
    stacked = torch.stack(list(maps.values()), dim=1)  # (B, M, h, w)

    values: dict[str, Tensor] = {}  # metric -> (B, M)
    if "localisation" in config.metrics:
        values |= localisation(stacked, box_mask)
    if config.segmentation:
        values |= {f"mask_{name}": value for name, value in segmentation_scores(stacked, masks).items()}
    if (config.faithfulness or config.perturbation) and target is None:
        raise TargetError(
            "faithfulness and perturbation need the explained classes; disable them in self-supervised mode"
        )
    if config.faithfulness:
        curves = deletion_insertion(
            model,
            images,
            stacked,
            target,
            steps=config.steps,
            baseline=config.baseline,
            batch_size=config.batch_size,
            autocast_dtype=autocast_dtype,
            mean=mean,
            std=std,
        )
        values |= {"deletion_auc": curves["deletion"], "insertion_auc": curves["insertion"]}
    if config.perturbation:
        values |= _perturbation_aucs(model, images, stacked, target, config, autocast_dtype, labels, mean, std)
    assert tuple(values) == config.columns
    return {method: {metric: value[:, i] for metric, value in values.items()} for i, method in enumerate(maps)}


def _perturbation_aucs(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    target: Tensor,
    config: EvaluationConfig,
    autocast_dtype: torch.dtype | None,
    labels: Tensor | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> dict[str, Tensor]:
    """The perturbation columns of ``maps`` ``(B, M, h, w)`` by the job's protocol: patch-level against the
    explained class with the job's baseline, or Chefer et al.'s, black pixels against the label (samples without a
    label: NaN)."""
    names = ("positive", "negative", "positive_top1", "negative_top1")
    options = dict(batch_size=config.batch_size, autocast_dtype=autocast_dtype, mean=mean, std=std)
    if config.protocol == "patch":
        curves = perturbation(model, images, maps, target, baseline=config.baseline, **options)
        return {f"{name}_auc": curves[name] for name in names}
    aucs = {f"{name}_auc": torch.full(maps.shape[:2], math.nan, device=maps.device) for name in names}
    labelled = labels >= 0 if labels is not None else torch.zeros(len(maps), dtype=torch.bool, device=maps.device)
    if labelled.any():
        rows = labelled.nonzero().squeeze(1)
        curves = perturbation(
            model, images[rows], maps[rows], labels[rows], baseline="black", protocol="chefer", **options
        )
        for name in names:
            aucs[f"{name}_auc"][rows] = curves[name]
    return aucs
