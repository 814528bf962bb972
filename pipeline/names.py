"""The names a job, the engine, the stores and the tables share, each list defined once.

Standard library only: the job model (:mod:`pipeline.config`), the stores and the engine all read these.
"""

from __future__ import annotations

__all__ = [
    "COMPARISON_EXPLAINERS",
    "COMPRESSORS",
    "COMPUTE_DTYPES",
    "ENGINE_ARRAYS",
    "EXPLAINERS",
    "EXPLAINER_ARRAYS",
    "MAP_ARRAYS",
    "METRIC_COLUMNS",
    "METRIC_GROUPS",
    "PERTURBATION_BASELINES",
    "PERTURBATION_PROTOCOLS",
    "PER_BLOCK_EXPLAINERS",
    "REFERENCE_MAPS",
    "SANITY_CHECKS",
    "SANITY_COLUMNS",
    "STORE_DTYPES",
    "TOP_DOWN_EXPLAINERS",
]

EXPLAINERS = ("daam", "rollout", "attention", "gradcam", "gae", "attnlrp", "cplrp")
"""What a job may compute: DAAM, and the comparison explainers (rollout, attention, Grad-CAM and GAE share DAAM's
forward and backward pass; AttnLRP and CP-LRP run one of their own)."""

COMPARISON_EXPLAINERS = EXPLAINERS[1:]

PER_BLOCK_EXPLAINERS = ("rollout", "attention", "gae", "attnlrp", "cplrp")
"""Comparison explainers with one map per block; Grad-CAM has one map."""

TOP_DOWN_EXPLAINERS = ("attnlrp", "cplrp")
"""Per-block explainers read from the last block down: block l's map is the relevance at block l's input, and the
method's map is the input map (the relevance at the patch embedding), not the last block's. The other per-block
explainers' last map is the method's."""

EXPLAINER_ARRAYS = {
    name: (name, f"{name}_input") if name in TOP_DOWN_EXPLAINERS else (name,) for name in COMPARISON_EXPLAINERS
}
"""The arrays each comparison explainer stores: its maps under its name, and the input map of the LRP explainers."""

ENGINE_ARRAYS = ("block_maps", "daam", "coefficients")
"""DAAM's stored arrays: M_l, D_l and c_l."""

MAP_ARRAYS = ENGINE_ARRAYS + tuple(array for arrays in EXPLAINER_ARRAYS.values() for array in arrays)
"""Every array a unit may store in ``maps.zarr``."""

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
"""Autocast dtypes of the model (the maps are float32 either way)."""

STORE_DTYPES = ("float16", "float32")
"""Storage dtypes of the maps."""

COMPRESSORS = ("zstd", "blosc", "none")

METRIC_GROUPS = {
    "localisation": ("pointing_hit", "box_energy"),
    "segmentation": ("mask_pixel_accuracy", "mask_miou", "mask_ap"),
    "faithfulness": ("deletion_auc", "insertion_auc"),
    "perturbation": ("positive_auc", "negative_auc", "positive_top1_auc", "negative_top1_auc"),
}
"""Evaluation metrics a job selects by group (``evaluate.metrics``), and the columns each group fills."""

METRIC_COLUMNS = tuple(column for columns in METRIC_GROUPS.values() for column in columns)

REFERENCE_MAPS = ("random", "centre")
"""Reference maps evaluated beside the explainers: a seeded uniform random map and a centre prior."""

PERTURBATION_BASELINES = ("blur", "zero", "mean", "black")
"""What deletion/insertion and patch-level perturbation put in place of removed patches."""

PERTURBATION_PROTOCOLS = ("patch", "chefer")
"""How positive/negative perturbation removes relevance: whole patches of the map's grid, or the pixels of the
bilinearly upsampled map as Chefer et al.'s published code does."""

SANITY_CHECKS = ("cascading",)
"""Model-randomisation sanity checks (Adebayo et al. 2018) a job may run: ``evaluate.sanity``."""

SANITY_COLUMNS = ("spearman", "ssim")
"""What the sanity table holds per map: the similarity of the randomised model's map to the trained model's."""
