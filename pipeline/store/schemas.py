"""The output contracts, defined once: the Arrow schemas of the Parquet tables and the layout of ``maps.zarr``.

Each field carries its description (and, for ``samples.status``, its ``enum`` as a JSON list) as field metadata;
each schema carries ``{name, version}`` as schema metadata, which every Parquet file the pipeline writes embeds.
:func:`export_schemas` writes the human-readable JSON in ``schemas/`` from these definitions (``daam-pipeline
schemas DEST [--check]``); nothing reads that JSON at run time. pyarrow checks neither nullability nor enums:
:func:`pipeline.store.tables.validate_table` does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.errors import SchemaError, StoreError
from pipeline.names import MAP_ARRAYS

__all__ = [
    "BLOCKS",
    "EVALUATION",
    "EXPLAINER_BLOCKS",
    "SAMPLES",
    "SANITY",
    "SCHEMAS_DIR",
    "TABLE_DESCRIPTIONS",
    "TABLE_SCHEMAS",
    "VERSION",
    "ZARR_LAYOUT",
    "ZARR_LAYOUT_VERSION",
    "export_schemas",
    "render_schemas",
    "stale_schemas",
]

VERSION = 1
"""Version of the Parquet tables' schemas (their schema metadata ``version``). Change it when a column changes
meaning or type."""

ZARR_LAYOUT_VERSION = 3
"""Version of the Zarr layout of ``OUT/maps.zarr`` (its root attribute ``schema_version``). 1: float16 arrays with
``<name>_exponent`` scalings, chunked and grown per batch; 2: float32 arrays (exact or rounded to 11 significant
bits), each written once as a single shard; 3: the same arrays, the unit group's ``zarr.json`` holding their
consolidated metadata and each shard's index (one request to open a unit, one per array to read a sample). Change
it when an array or a group changes meaning, type or layout."""

SCHEMAS_DIR = Path(__file__).resolve().parents[1] / "schemas"
"""The exported JSON shipped with the package: ``pipeline/schemas``, a link to the repository's ``schemas/``."""

_TYPE_ALIASES = {pa.string(): "string", pa.int16(): "int16", pa.int32(): "int32", pa.float32(): "float32"}
"""The column types in use and their names in the exported JSON (pyarrow's ``type_for_alias`` reads them)."""


def _field(
    name: str, type_: pa.DataType, description: str, *, nullable: bool = False, enum: Sequence[str] | None = None
) -> pa.Field:
    metadata = {"description": description}
    if enum is not None:
        metadata["enum"] = json.dumps(list(enum))
    return pa.field(name, type_, nullable, metadata)


def _schema(name: str, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata={"name": name, "version": str(VERSION)})


def _mask_fields(prefix: str, subject: str) -> list[pa.Field]:
    """The segmentation columns of ``subject`` (:func:`pipeline.stats.segmentation_scores`): ``<prefix>mask_*``."""
    return [
        _field(
            f"{prefix}mask_pixel_accuracy",
            pa.float32(),
            f"Share of the input's pixels where {subject}, upsampled bilinearly to the input and min-max "
            "normalised, is above its mean exactly where the sample's object mask is 1 (Chefer et al.'s "
            "ImageNet-Segmentation evaluation). NaN without a mask or for an all-zero map.",
        ),
        _field(
            f"{prefix}mask_miou",
            pa.float32(),
            f"Mean of the object's and the background's IoU between {subject} thresholded at its mean (as in "
            "mask_pixel_accuracy) and the object mask, on this image. NaN without a mask or for an all-zero map.",
        ),
        _field(
            f"{prefix}mask_ap",
            pa.float32(),
            f"Average precision of the normalised pixels of {subject} against the object mask, the background "
            "scored by 1 - value (Chefer et al.'s get_ap_scores). NaN without a mask or for an all-zero map.",
        ),
    ]


TABLE_DESCRIPTIONS = {
    "samples": (
        "One row per input sample of a unit of work (one input shard), ok or failed. File: OUT/samples/<unit>.parquet."
    ),
    "blocks": (
        "One row per (ok sample, block): the statistics of pipeline/stats.py. File: OUT/blocks/<unit>.parquet. "
        "Undefined values are NaN (floats) or -1 (peaks), never null."
    ),
    "evaluation": (
        "One row per ok sample and evaluated method, written when the job's `evaluate:` section is set. Methods: "
        "'daam' (the final accumulated map D_{L-1}) and the reference maps 'random' (uniform random, seeded) and "
        "'centre' (a centre prior); comparison explainers add their own names. Metrics computed by "
        "pipeline/evaluate.py on the device; NaN where undefined (no boxes, no mask, all-zero map, metric not "
        "configured). The job's evaluate section (job.json) says which perturbation protocol filled the perturbation "
        "columns. File: OUT/evaluation/<unit>.parquet."
    ),
    "sanity": (
        "Cascading randomisation (Adebayo et al. 2018), written when the job's `evaluate.sanity` is 'cascading': one "
        "row per re-explained sample (the first ok samples of each unit, `evaluate.sanity_samples` in all), "
        "explainer, number of blocks randomised from the top down and block of the map: how similar the map of the "
        "randomised model stays to the trained model's. The explained class is the trained model's. File: "
        "OUT/sanity/<unit>.parquet."
    ),
    "explainer_blocks": (
        "One row per ok sample, comparison explainer with per-block maps, and block: the statistics of the blocks "
        "table (the same formulas, pipeline/stats.py) for the explainer's maps, its final map taking the place of "
        "D_{L-1}: the last block's map, or for attnlrp and cplrp (relevance read from the last block down) the input "
        "map. Written when the job's `explainers:` list names rollout, attention, gae, attnlrp or cplrp. File: "
        "OUT/explainer_blocks/<unit>.parquet."
    ),
}
"""Each table's description, the top-level ``description`` of its exported JSON (not in the Parquet metadata)."""


SAMPLES = _schema(
    "samples",
    [
        _field("key", pa.string(), "WebDataset __key__ of the sample; unique within its shard."),
        _field("shard", pa.string(), "URL of the input shard (WebDataset __url__)."),
        _field(
            "unit",
            pa.string(),
            "Unit of work: the shard file stem. Names the Zarr group maps.zarr/<unit> and the Parquet parts.",
        ),
        _field(
            "label",
            pa.int32(),
            "Ground-truth class stored in the shard; null when the shard has none.",
            nullable=True,
        ),
        _field(
            "predicted",
            pa.int32(),
            "Model top-1 class (supervised) or k-NN vote class (self-supervised); null when failed.",
            nullable=True,
        ),
        _field(
            "score",
            pa.float32(),
            "Softmax probability of `predicted` (supervised) or its k-NN vote share (self-supervised); null when "
            "failed.",
            nullable=True,
        ),
        _field(
            "target",
            pa.int32(),
            "Explained class (the logit whose gradient gives the coefficients); null in self-supervised mode and "
            "when failed.",
            nullable=True,
        ),
        _field(
            "status",
            pa.string(),
            "'ok': maps stored at `row`; 'failed': no maps, see `error`.",
            enum=("ok", "failed"),
        ),
        _field("error", pa.string(), "Why the sample failed ('DecodeError: ...'); null when ok.", nullable=True),
        _field(
            "row",
            pa.int32(),
            "Row of the sample in the arrays of maps.zarr/<unit>; null when failed.",
            nullable=True,
        ),
        _field(
            "width",
            pa.int32(),
            "Original image width in pixels; null when the image was not decoded.",
            nullable=True,
        ),
        _field(
            "height",
            pa.int32(),
            "Original image height in pixels; null when the image was not decoded.",
            nullable=True,
        ),
        _field(
            "n_boxes",
            pa.int32(),
            "Number of ground-truth boxes of the sample (0 when it has none); null when not decoded.",
            nullable=True,
        ),
        _field("model", pa.string(), "timm model name."),
        _field("job", pa.string(), "Name of the job that produced the row."),
    ],
)

BLOCKS = _schema(
    "blocks",
    [
        _field("key", pa.string(), "Sample key, as in the samples table."),
        _field("unit", pa.string(), "Unit of work, as in the samples table."),
        _field("block", pa.int16(), "Block index l, 0-based (0 .. L-1)."),
        _field(
            "map_entropy",
            pa.float32(),
            "Shannon entropy of the block map M_l normalised to sum 1, divided by log(n), n = h*w patches: 0 when "
            "all mass is in one patch, 1 for a uniform map. NaN for an all-zero map.",
        ),
        _field(
            "map_top10_mass",
            pa.float32(),
            "Share of the block map M_l's mass in its ceil(0.1 n) largest patches. NaN for an all-zero map.",
        ),
        _field(
            "map_peak_row",
            pa.int16(),
            "Row of the block map M_l's largest patch (first in row-major order on ties); -1 for an all-zero map.",
        ),
        _field("map_peak_col", pa.int16(), "Column of the block map M_l's largest patch; -1 for an all-zero map."),
        _field(
            "map_centroid_row",
            pa.float32(),
            "Mass-weighted mean row of the block map M_l, in patch units (patch (i, j) at row i). NaN for an "
            "all-zero map.",
        ),
        _field(
            "map_centroid_col",
            pa.float32(),
            "Mass-weighted mean column of the block map M_l, in patch units. NaN for an all-zero map.",
        ),
        _field(
            "map_spread",
            pa.float32(),
            "Mass-weighted RMS distance of the block map M_l's patches from its centroid, in patch units; 0 when "
            "all mass is in one patch. NaN for an all-zero map.",
        ),
        _field(
            "map_box_energy",
            pa.float32(),
            "Share of the block map M_l's mass in patches whose centre lies in a ground-truth box. NaN without "
            "boxes or for an all-zero map.",
        ),
        _field(
            "map_point_hit",
            pa.float32(),
            "Pointing game for the block map M_l: 1.0 when its peak patch lies in a box, else 0.0. NaN without "
            "boxes or for an all-zero map.",
        ),
        *_mask_fields("map_", "the block map M_l"),
        _field(
            "daam_entropy",
            pa.float32(),
            "Shannon entropy of the accumulated map D_l normalised to sum 1, divided by log(n), n = h*w patches: 0"
            " when all mass is in one patch, 1 for a uniform map. NaN for an all-zero map.",
        ),
        _field(
            "daam_top10_mass",
            pa.float32(),
            "Share of the accumulated map D_l's mass in its ceil(0.1 n) largest patches. NaN for an all-zero map.",
        ),
        _field(
            "daam_peak_row",
            pa.int16(),
            "Row of the accumulated map D_l's largest patch (first in row-major order on ties); -1 for an all-zero"
            " map.",
        ),
        _field(
            "daam_peak_col",
            pa.int16(),
            "Column of the accumulated map D_l's largest patch; -1 for an all-zero map.",
        ),
        _field(
            "daam_centroid_row",
            pa.float32(),
            "Mass-weighted mean row of the accumulated map D_l, in patch units (patch (i, j) at row i). NaN for an"
            " all-zero map.",
        ),
        _field(
            "daam_centroid_col",
            pa.float32(),
            "Mass-weighted mean column of the accumulated map D_l, in patch units. NaN for an all-zero map.",
        ),
        _field(
            "daam_spread",
            pa.float32(),
            "Mass-weighted RMS distance of the accumulated map D_l's patches from its centroid, in patch units; 0 "
            "when all mass is in one patch. NaN for an all-zero map.",
        ),
        _field(
            "daam_box_energy",
            pa.float32(),
            "Share of the accumulated map D_l's mass in patches whose centre lies in a ground-truth box. NaN "
            "without boxes or for an all-zero map.",
        ),
        _field(
            "daam_point_hit",
            pa.float32(),
            "Pointing game for the accumulated map D_l: 1.0 when its peak patch lies in a box, else 0.0. NaN "
            "without boxes or for an all-zero map.",
        ),
        *_mask_fields("daam_", "the accumulated map D_l"),
        _field(
            "daam_cos_final",
            pa.float32(),
            "Cosine similarity of D_l and the final D_{L-1} (1 at the last block). NaN when either is all zero.",
        ),
        _field(
            "daam_iou_final",
            pa.float32(),
            "IoU of the top-20% patch sets (ceil(0.2 n) largest patches, ties broken arbitrarily) of D_l and D_{L-1}. "
            "NaN when either is all zero.",
        ),
        _field(
            "daam_change",
            pa.float32(),
            "L1 distance between D_l and D_(l-1), each normalised to sum 1: in [0, 2], 0 when the block changes "
            "the map's shape not at all. NaN at block 0 and when either map is all zero.",
        ),
        _field("coef_l1", pa.float32(), "L1 norm of the coefficients c_l (sum over the C channels of |c|)."),
        _field("coef_pos_frac", pa.float32(), "Share of the coefficients c_l that are > 0."),
    ],
)

EVALUATION = _schema(
    "evaluation",
    [
        _field("key", pa.string(), "Sample key."),
        _field("unit", pa.string(), "Unit of work (input shard stem)."),
        _field("method", pa.string(), "Which map: 'daam', 'random', 'centre', or a comparison explainer's name."),
        _field(
            "pointing_hit",
            pa.float32(),
            "1 when the map's peak patch has its centre inside a box, else 0; NaN without boxes.",
        ),
        _field(
            "box_energy",
            pa.float32(),
            "Fraction of the map's mass on patches whose centre lies inside a box; NaN without boxes.",
        ),
        *_mask_fields("", "the explainer's map l"),
        _field(
            "deletion_auc",
            pa.float32(),
            "Area under the target's softmax probability as the map's top patches are replaced by the baseline in "
            "`steps` steps (trapezoid over [0, 1]); lower is more faithful.",
        ),
        _field(
            "insertion_auc",
            pa.float32(),
            "Area under the target's softmax probability as the map's top patches are revealed on the baseline; "
            "higher is more faithful.",
        ),
        _field(
            "positive_auc",
            pa.float32(),
            "Positive perturbation (Chefer et al. 2021): area under the target's softmax probability as the map's "
            "most relevant patches are replaced by the baseline first, at removed fractions 0, 0.1, ..., 0.9 "
            "(trapezoid over [0, 0.9]); lower is more faithful. With evaluate.protocol 'chefer' the map's most "
            "relevant pixels (the map upsampled bilinearly) turn black and the target is the shard's label (NaN "
            "without one), as Chefer et al.'s code does.",
        ),
        _field(
            "negative_auc",
            pa.float32(),
            "Negative perturbation: the same with the least relevant patches removed first; higher is more faithful.",
        ),
        _field(
            "positive_top1_auc",
            pa.float32(),
            "Positive perturbation of top-1 correctness (1 while the perturbed image's argmax is the target, else 0), "
            "the protocol's accuracy curve (against the label with protocol 'chefer': what Chefer et al. report); "
            "lower is more faithful.",
        ),
        _field(
            "negative_top1_auc",
            pa.float32(),
            "Negative perturbation of top-1 correctness; higher is more faithful.",
        ),
    ],
)

EXPLAINER_BLOCKS = _schema(
    "explainer_blocks",
    [
        _field("key", pa.string(), "Sample key."),
        _field("unit", pa.string(), "Unit of work (input shard stem)."),
        _field(
            "explainer",
            pa.string(),
            "Comparison explainer with per-block maps: 'rollout' (attention rollout up to block l), 'attention' "
            "(block l's [class] attention, mean over heads), 'gae' (gradient-weighted attention rollout up to block "
            "l, Chefer et al. 2021), 'attnlrp' or 'cplrp' (the positive part of the LRP relevance at block l's input, "
            "Achtibat et al. 2024).",
        ),
        _field("block", pa.int16(), "Block index l, 0-based."),
        _field(
            "entropy",
            pa.float32(),
            "Shannon entropy of the explainer's map l normalised to sum 1, divided by log(n), "
            "n = h*w patches: 0 when all mass is in one patch, 1 for a uniform map. NaN for an all-zero map.",
        ),
        _field(
            "top10_mass",
            pa.float32(),
            "Share of the explainer's map l's mass in its ceil(0.1 n) largest patches. NaN for an all-zero map.",
        ),
        _field(
            "peak_row",
            pa.int16(),
            "Row of the explainer's map l's largest patch (first in row-major order on ties); -1 for an all-zero map.",
        ),
        _field(
            "peak_col",
            pa.int16(),
            "Column of the explainer's map l's largest patch; -1 for an all-zero map.",
        ),
        _field(
            "centroid_row",
            pa.float32(),
            "Mass-weighted mean row of the explainer's map l, in patch units (patch (i, j) at "
            "row i). NaN for an all-zero map.",
        ),
        _field(
            "centroid_col",
            pa.float32(),
            "Mass-weighted mean column of the explainer's map l, in patch units. NaN for an all-zero map.",
        ),
        _field(
            "spread",
            pa.float32(),
            "Mass-weighted RMS distance of the explainer's map l's patches from its centroid, "
            "in patch units; 0 when all mass is in one patch. NaN for an all-zero map.",
        ),
        _field(
            "box_energy",
            pa.float32(),
            "Share of the explainer's map l's mass in patches whose centre lies in a "
            "ground-truth box. NaN without boxes or for an all-zero map.",
        ),
        _field(
            "point_hit",
            pa.float32(),
            "Pointing game for the explainer's map l: 1.0 when its peak patch lies in a box, "
            "else 0.0. NaN without boxes or for an all-zero map.",
        ),
        *_mask_fields("", "the map"),
        _field(
            "cos_final",
            pa.float32(),
            "Cosine similarity of the explainer's map l and its final map: its last map (1 at the last block), or for "
            "'attnlrp' and 'cplrp' the positive part of the input map. NaN when either is all zero.",
        ),
        _field(
            "iou_final",
            pa.float32(),
            "IoU of the top-20% patch sets (ceil(0.2 n) largest patches, ties broken arbitrarily) of the "
            "explainer's map l and its final map (as in cos_final). NaN when either is all zero.",
        ),
        _field(
            "change",
            pa.float32(),
            "L1 distance between the explainer's maps l and l-1, each normalised to sum 1: in [0, 2], 0 when "
            "the block changes the map's shape not at all. NaN at block 0 and when either map is all zero.",
        ),
    ],
)
SANITY = _schema(
    "sanity",
    [
        _field("key", pa.string(), "Sample key."),
        _field("unit", pa.string(), "Unit of work (input shard stem)."),
        _field(
            "explainer",
            pa.string(),
            "Whose maps: 'daam' (the accumulated maps D_l) or a comparison explainer's name (per-block maps; "
            "'gradcam' has its one map at the last block).",
        ),
        _field(
            "randomised",
            pa.int16(),
            "Blocks randomised, from the top: k randomises blocks L-k .. L-1 (timm's initialisation: Linear weights "
            "truncated normal with std 0.02, biases zero, norms and layer scales reset), the rest trained.",
        ),
        _field("block", pa.int16(), "Block l of the compared map, 0-based (the final map at L-1)."),
        _field(
            "spearman",
            pa.float32(),
            "Spearman rank correlation (average ranks for ties) of the randomised model's map l and the trained "
            "model's, both upsampled bilinearly to the input. NaN when either is constant.",
        ),
        _field(
            "ssim",
            pa.float32(),
            "Structural similarity of the two maps upsampled to the input and min-max normalised to [0, 1] "
            "(scikit-image's defaults: 7 x 7 uniform window, K1 0.01, K2 0.03, data range 1). NaN when either is "
            "constant.",
        ),
    ],
)
# SPLIT


TABLE_SCHEMAS = {
    "samples": SAMPLES,
    "blocks": BLOCKS,
    "evaluation": EVALUATION,
    "explainer_blocks": EXPLAINER_BLOCKS,
    "sanity": SANITY,
}
"""Each Parquet table under ``OUT/<name>/<unit>.parquet`` and its schema."""


def _map_array(dims: tuple[str, ...], description: str) -> dict[str, Any]:
    return {"dims": dims, "dtype": "float32", "optional": True, "description": description}


_MAP_ARRAYS = {
    "block_maps": _map_array(
        ("sample", "block", "row", "col"), "Block maps M_l (docs/method.md, per-block quantities)."
    ),
    "daam": _map_array(
        ("sample", "block", "row", "col"), "Accumulated maps D_l = sum of M_i for i <= l (docs/method.md)."
    ),
    "coefficients": _map_array(
        ("sample", "block", "channel"),
        "Channel importance coefficients c_l = dY / dT_l[0, :] (docs/method.md), before any ReLU.",
    ),
    "rollout": _map_array(
        ("sample", "block", "row", "col"),
        "Attention rollout up to block l, [class] row over the patches (explainers: rollout).",
    ),
    "attention": _map_array(
        ("sample", "block", "row", "col"),
        "Block l's [class] attention over the patches, mean over heads (explainers: attention).",
    ),
    "gae": _map_array(
        ("sample", "block", "row", "col"),
        "GAE (Chefer et al. 2021), gradient-weighted attention rollout up to block l, [class] row over the patches "
        "(explainers: gae).",
    ),
    "gradcam": _map_array(
        ("sample", "row", "col"), "Grad-CAM on the tokens the last block's attention reads (explainers: gradcam)."
    ),
    **{
        name: _map_array(
            ("sample", "block", "row", "col"),
            f"{title} relevance at block l's input over the patch tokens, summed over the channels: signed, float32 "
            f"(explainers: {name}).",
        )
        for name, title in (("attnlrp", "AttnLRP"), ("cplrp", "CP-LRP"))
    },
    **{
        f"{name}_input": _map_array(
            ("sample", "row", "col"),
            f"{title} relevance at the patch embedding's output (the input map, the method's map) over the patches, "
            f"summed over the channels: signed, float32 (explainers: {name}).",
        )
        for name, title in (("attnlrp", "AttnLRP"), ("cplrp", "CP-LRP"))
    },
}


ZARR_LAYOUT: dict[str, Any] = {
    "name": "maps",
    "version": ZARR_LAYOUT_VERSION,
    "description": "DAAM maps and coefficients as Zarr v3: one group per unit of work (one input shard), written "
    "only by that unit's worker. Every float array is float32 and holds the values themselves: a plain "
    "zarr.open_group(OUT/maps.zarr/<unit>)[name][:] (or xarray) reads them right.",
    "path": "maps.zarr",
    "root_attributes": {
        "schema_version": "This layout's `version` (3; outputs of layout 2, whose unit groups lack consolidated "
        "metadata and shard indexes, and of layout 1, float16 arrays with `<name>_exponent` scalings, are still "
        "read).",
        "model": "timm model name.",
        "n_blocks": "L, the number of transformer blocks.",
        "grid": "[h, w], the patch grid of the maps.",
        "channels": "C = heads * head width, the length of a coefficient vector.",
        "prefix_tokens": "Number of prefix tokens ([class], registers, distillation) dropped from the maps.",
        "dtype": "Precision of the float arrays (always float32): 'float16' (default; values rounded to 11 "
        "significant bits) or 'float32' (exact).",
        "compressor": "'blosc' (default; blosc-zstd with bit shuffle when dtype is float16, byte shuffle for "
        "float32), 'zstd' or 'none'; applied to each inner chunk.",
        "compression_level": "Compressor level.",
        "chunk_rows": "Samples per inner chunk of a unit's shard.",
        "arrays": "Names of the optional arrays stored in every unit group.",
    },
    "unit_group": {
        "path": "maps.zarr/{unit}",
        "description": "Arrays of the unit's ok samples; row i is the sample whose samples-table `row` is i. "
        "Written once, when the unit commits; removed and rewritten as a whole when the unit is redone. A unit "
        "with no ok samples has the same arrays with 0 rows. Its zarr.json holds the consolidated metadata of its "
        "arrays (zarr-python's `consolidated_metadata`; open with use_consolidated), so a reader opens the unit "
        "and every array with one read.",
        "attributes": {
            "shard_indexes": "Each array's shard key (e.g. `daam/c.0.0.0.0`) -> base64 of the shard's index, its "
            "last 16 * chunks + 4 bytes (offset and length of each inner chunk, then their crc32c): a reader of one "
            "sample fetches its inner chunk directly, with one ranged read per array.",
        },
    },
    "arrays": {
        "keys": {
            "dims": ("sample",),
            "dtype": "string",
            "optional": False,
            "description": "Sample keys, in row order.",
        },
        **{name: _MAP_ARRAYS[name] for name in MAP_ARRAYS},
    },
    "dims": {
        "sample": "Ok samples of the unit.",
        "block": "n_blocks",
        "row": "grid[0]",
        "col": "grid[1]",
        "channel": "channels",
    },
    "array_attributes": {
        "significant_bits": "Float arrays: the significant bits kept of each value, 11 when dtype is float16, null "
        "when it is float32 (exact).",
    },
    "dtype_policy": "Float arrays are float32 and hold the values themselves (no scaling, no companion array). "
    "dtype float32 stores exact values. dtype float16 (the default) rounds each value to float16's 11 significant "
    "bits (round to nearest, ties to even, on the float32 mantissa) and keeps float32's exponent: every value is "
    "within 2^-11 (4.9e-4) of itself, hence of its map's peak, whatever its scale (no overflow, no underflow), and "
    "the 13 low mantissa bits being zero, the arrays compress to about float16's size. Zeros, NaN, inf and "
    "float32 subnormals are stored as they are.",
    "chunking": "One Zarr v3 array per name with the unit's exact shape (n, ...), written once at commit, with the "
    "sharding codec: one shard covering all n rows (one file per array), made of inner chunks of (chunk_rows, "
    "full block, full grid / channel) compressed with `compressor`; reading one sample decompresses one inner "
    "chunk of each array. Chunk keys are '.'-separated (the shard is <name>/c.0.0.0.0): no nested folders.",
}
"""The layout of ``OUT/maps.zarr``: root attributes, the unit groups, each array's dimension names (its Zarr
``dimension_names``) and dtype (float32 maps, at the precision of the job's ``output.dtype``), the array
attributes, the dtype policy and the chunking.
Read-only: the stores read it, :func:`export_schemas` writes it as ``zarr_layout.json``."""


def _table_document(name: str, schema: pa.Schema) -> dict[str, Any]:
    fields = []
    for field in schema:
        if field.type not in _TYPE_ALIASES:
            raise SchemaError(f"{name} column {field.name!r} has type {field.type}, which the JSON export lacks")
        spec: dict[str, Any] = {"name": field.name, "type": _TYPE_ALIASES[field.type], "nullable": field.nullable}
        if b"enum" in field.metadata:
            spec["enum"] = json.loads(field.metadata[b"enum"])
        spec["description"] = field.metadata[b"description"].decode()
        fields.append(spec)
    return {
        "name": schema.metadata[b"name"].decode(),
        "version": int(schema.metadata[b"version"]),
        "description": TABLE_DESCRIPTIONS[name],
        "fields": fields,
    }


def _dumps(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def render_schemas() -> dict[str, str]:
    """File name -> JSON text of every contract: ``<table>.schema.json`` for each table, ``zarr_layout.json``."""
    files = {f"{name}.schema.json": _dumps(_table_document(name, schema)) for name, schema in TABLE_SCHEMAS.items()}
    files["zarr_layout.json"] = _dumps(ZARR_LAYOUT)
    return files


def export_schemas(dest: Path) -> list[Path]:
    """Write the JSON of every contract (:func:`render_schemas`) into the folder ``dest``; return the paths written.

    Raises:
        StoreError: ``dest`` cannot be created or written.
    """
    dest = Path(dest)
    written = []
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for name, text in render_schemas().items():
            path = dest / name
            path.write_text(text)
            written.append(path)
    except OSError as e:
        raise StoreError(f"cannot write the schemas to {dest}: {e}") from e
    return written


def stale_schemas(dest: Path) -> list[str]:
    """The names of the files of :func:`render_schemas` that are missing from the folder ``dest`` or differ there."""
    stale = []
    for name, text in render_schemas().items():
        path = Path(dest) / name
        try:
            current = path.read_text()
        except (OSError, UnicodeDecodeError):
            current = None
        if current != text:
            stale.append(name)
    return stale
