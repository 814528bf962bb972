"""The HTML dataset report of an output: one self-contained file (inline SVG charts drawn with matplotlib by
:mod:`pipeline.viz.charts`, base64 PNG images, no scripts, no network).

Sections: the job and its counts; per-block curves of the accumulated-map statistics (mean and inter-quartile
band), all samples, correct vs wrong and the most frequent classes; the same statistics of every comparison
explainer with per-block maps (the explainer_blocks table: rollout, attention, GAE, AttnLRP, CP-LRP, any other) next
to DAAM's (median and inter-quartile band), when the job ran one; the distribution of the convergence block
(:mod:`pipeline.viz.select`); localisation per block (boxes, and masks where the samples have them) and the method
table (every metric of the evaluation table, mean per method, with the sample count) when the output has them; the
sanity check's curves (cascading randomisation: how similar each explainer's final map stays as blocks are
randomised from the top) when the job ran it; a gallery of the most and least typical samples, by the distance of
their convergence curve (``daam_cos_final`` over the blocks) to the mean curve.
"""

from __future__ import annotations

import base64
import io
import logging
import warnings
from collections.abc import Sequence
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from pipeline.errors import PipelineError
from pipeline.names import SANITY_COLUMNS
from pipeline.store.results import Results, open_results
from pipeline.store.schemas import BLOCKS, EVALUATION, SANITY
from pipeline.summaries import RANKING_IOU, ranking_reached, summarise, summarise_blocks, summarise_sanity
from pipeline.viz.charts import Bars, Line, bar_chart, line_chart
from pipeline.viz.render import iter_flows
from pipeline.viz.select import CONVERGENCE_THRESHOLD, convergence_blocks
from pipeline.viz.source import ClassNames, read_job, resolve_class_names

__all__ = ["CURVES", "report", "typical_samples"]

logger = logging.getLogger(__name__)

CURVES = ("daam_entropy", "daam_top10_mass", "daam_cos_final", "daam_iou_final", "daam_change", "daam_spread")
_SAMPLE = ["unit", "key"]
_ERROR_WHERE = r"^(\w+: )?shard \S+ key \S+: "  # the shard and key that errors start with
_STYLE = """
body { font-family: sans-serif; margin: 24px auto; max-width: 1180px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; } th { background: #f2f2f2; }
td.text, th.text { text-align: left; }
.charts { display: flex; flex-wrap: wrap; gap: 8px; }
.note { font-size: 13px; color: #555; max-width: 900px; }
figure { margin: 12px 0; } figcaption { font-size: 13px; color: #444; }
img.flow { max-width: 100%; border: 1px solid #ddd; }
dl.stats { font-size: 13px; } dl.stats dt { font-weight: bold; } dl.stats dd { margin: 0 0 6px 16px; }
"""


def typical_samples(blocks: pd.DataFrame) -> pd.Series:
    """Distance of each sample's convergence curve to the mean curve.

    The curve is ``daam_cos_final`` over the blocks; the distance is the root mean square difference to the
    mean curve over the blocks where both are defined.

    Returns:
        Float distances indexed by ``(unit, key)``, smallest (most typical) first; samples without a defined
        curve are left out.
    """
    curves = blocks.pivot_table(index=_SAMPLE, columns="block", values="daam_cos_final", dropna=False)
    values = curves.to_numpy(dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns or rows: "mean of empty slice"
        distance = np.sqrt(np.nanmean((values - np.nanmean(values, axis=0)) ** 2, axis=1))
    result = pd.Series(distance, index=curves.index, name="distance").dropna()
    return result.sort_values(kind="stable")


def report(
    out: str | Path,
    dest: str | Path | None = None,
    *,
    gallery: int = 6,
    progress: bool = True,
    top_classes: int = 4,
    size: int = 128,
    class_names: ClassNames = None,
) -> Path:
    """Write the HTML report of an output.

    Args:
        out: The output location (local path or fsspec URL).
        dest: The HTML file; default ``OUT/report.html`` (``./report.html`` for a remote output).
        gallery: Samples in the gallery, half the most typical and half the least typical (0: no gallery; the
            gallery reads the original images from the shards).
        progress: Show a progress bar while the gallery renders.
        top_classes: Classes with their own curves (the most frequent).
        size: Longest side of a gallery panel, in pixels.
        class_names: Class names (see :func:`~pipeline.viz.source.resolve_class_names`); default from the job.

    Returns:
        The path of the written file.

    Raises:
        EmptyOutputError: no committed unit in ``out`` yet (a partial output reports its committed units).
    """
    results = open_results(out)
    results.require_units()
    job = read_job(results)
    names = resolve_class_names(job, class_names)
    samples, blocks = results.samples, results.blocks
    ok = samples[samples["status"] == "ok"]
    convergence = convergence_blocks(blocks)
    table = blocks.merge(ok[[*_SAMPLE, "label", "predicted"]], on=_SAMPLE, how="left")
    sections = [
        _summary(results, job, samples),
        _curves(table, names, top_classes),
        _explainer_curves(blocks, results.explainer_blocks),
        _convergence(convergence, ok),
        _localisation(results, blocks),
        _sanity(results.sanity),
        _gallery(results, ok, blocks, convergence, gallery, size, names, progress),
    ]
    title = f"DAAM report: {job['name'] if job else results.output.url}"
    html = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body><h1>{escape(title)}</h1>{''.join(sections)}</body></html>\n"
    )
    if dest is None:
        dest = Path(results.output.root) / "report.html" if results.output.is_local else Path("report.html")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(html, encoding="utf-8")
    return dest


def _table(frame: pd.DataFrame, *, index: bool = True) -> str:
    if index:  # the index as an ordinary first column: one header row
        frame = frame.rename_axis(frame.index.name or "").reset_index()
    return frame.to_html(index=False, border=0, float_format=lambda v: f"{v:.4g}", na_rep="–")


def _facts(rows: Sequence[tuple[str, Any]]) -> str:
    cells = "".join(
        f'<tr><th class="text">{escape(k)}</th><td class="text">{escape(str(v))}</td></tr>' for k, v in rows
    )
    return f"<table>{cells}</table>"


def _summary(results: Results, job: dict[str, Any] | None, samples: pd.DataFrame) -> str:
    ok = samples[samples["status"] == "ok"]
    failed = samples[samples["status"] == "failed"]
    attrs = results.attrs
    labelled = ok[ok["label"].notna() & ok["predicted"].notna()]
    mode = job.get("mode", "supervised") if job else "unknown"
    rows: list[tuple[str, Any]] = [
        ("output", results.output.url),
        ("job", job["name"] if job else ", ".join(sorted(samples["job"].unique()))),
        ("model", attrs.get("model", ", ".join(sorted(samples["model"].unique())))),
        ("mode", mode),
        ("preprocessing", job["data"]["preprocess"] if job else "unknown (no job.json)"),
        ("blocks L, patch grid", f"{attrs.get('n_blocks', '?')}, {'x'.join(map(str, attrs.get('grid', ['?'])))}"),
        ("units committed", len(results.units)),
        ("samples", f"{len(samples)}: {len(ok)} ok, {len(failed)} failed"),
    ]
    if len(labelled):
        accuracy = float((labelled["predicted"] == labelled["label"]).mean())
        name = "k-NN accuracy" if mode == "self-supervised" else "top-1 accuracy"
        rows.append((name, f"{accuracy:.4f} over {len(labelled)} labelled samples"))
    rows.append(("report written", datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")))
    parts = ["<h2>Dataset</h2>", _facts(rows)]
    if len(failed):
        reasons = (
            failed["error"]
            .fillna("unknown")
            .str.replace(_ERROR_WHERE, "", regex=True)
            .str.split(r"[:(]", n=1, regex=True)
            .str[0]
            .str.strip()
            .value_counts()
        )
        parts.append("<p>Failed samples by reason:</p>")
        parts.append(_table(reasons.rename_axis("reason").rename("samples").to_frame()))
        parts.append(f"<p>First {min(10, len(failed))} failed samples:</p>")
        parts.append(_table(failed[["unit", "key", "error"]].head(10), index=False))
    return "".join(parts)


def _band(frame: pd.DataFrame, column: str, blocks: np.ndarray, name: str, centre: str = "mean") -> Line:
    """The ``centre`` (``mean`` or ``median``) of ``column`` per block, with its inter-quartile band."""
    grouped = frame.groupby("block")[column]
    stats = pd.DataFrame(
        {"centre": grouped.agg(centre), "low": grouped.quantile(0.25), "high": grouped.quantile(0.75)}
    ).reindex(blocks)
    return Line(f"{name} (n={frame[_SAMPLE].drop_duplicates().shape[0]})", stats["centre"], stats["low"], stats["high"])


def _chart_row(splits: list[tuple[str, pd.DataFrame]], blocks: np.ndarray) -> str:
    charts = []
    for column in CURVES:
        lines = [_band(part, column, blocks, name) for name, part in splits if len(part)]
        charts.append(line_chart(blocks, lines, title=column, xlabel="block", ylabel=column.removeprefix("daam_")))
    return f'<div class="charts">{"".join(charts)}</div>'


def _curves(table: pd.DataFrame, names: dict[int, str], top_classes: int) -> str:
    if table.empty:
        return "<h2>Per-block statistics</h2><p>No ok samples.</p>"
    blocks = np.sort(table["block"].unique())
    described = "".join(
        f"<dt>{c}</dt><dd>{escape(BLOCKS.field(c).metadata[b'description'].decode())}</dd>" for c in CURVES
    )
    parts = [
        "<h2>Per-block statistics of the accumulated maps D_l</h2>",
        '<p class="note">Lines: the mean over samples; bands: the inter-quartile range (25% to 75%). Blocks are '
        "0-based, as in the blocks table.</p>",
        f'<dl class="stats">{described}</dl>',
    ]
    labelled = table[table["label"].notna() & table["predicted"].notna()]
    if len(labelled):
        correct = labelled["predicted"] == labelled["label"]
        splits = [("all", table), ("correct", labelled[correct]), ("wrong", labelled[~correct])]
        parts += ["<h3>All samples, correct and wrong predictions</h3>", _chart_row(splits, blocks)]
    else:
        parts += ["<h3>All samples</h3>", _chart_row([("all", table)], blocks)]
    by = "label" if table["label"].notna().any() else "predicted"
    if table[by].notna().any():
        counts = table.drop_duplicates(_SAMPLE)[by].value_counts().head(top_classes)
        splits = [(_class_name(int(c), names), table[table[by] == c]) for c in counts.index]
        parts += [f"<h3>The {len(counts)} most frequent classes (by {by})</h3>", _chart_row(splits, blocks)]
    return "".join(parts)


def _explainer_curves(blocks: pd.DataFrame, explainer_blocks: pd.DataFrame) -> str:
    """One chart per statistic of :data:`CURVES` that the explainer_blocks table has: a line for DAAM's ``D_l``
    and one per comparison explainer with per-block maps (any name the table holds)."""
    stats = [c.removeprefix("daam_") for c in CURVES if c.removeprefix("daam_") in explainer_blocks]
    if blocks.empty or explainer_blocks.empty or not stats:
        return ""
    daam = blocks[[*_SAMPLE, "block", *(f"daam_{s}" for s in stats)]].rename(columns=lambda c: c.removeprefix("daam_"))
    table = pd.concat([daam.assign(explainer="DAAM"), explainer_blocks[[*_SAMPLE, "block", "explainer", *stats]]])
    table["block"] = table["block"].astype(int)
    methods = ["DAAM", *sorted(set(explainer_blocks["explainer"]))]
    x = np.sort(table["block"].unique())
    charts = [
        line_chart(
            x,
            [_band(table[table["explainer"] == m], stat, x, m, centre="median") for m in methods],
            title=stat,
            xlabel="block",
            ylabel=stat,
        )
        for stat in stats
    ]
    return "".join(
        [
            "<h2>Per-block statistics by explainer</h2>",
            '<p class="note">The statistics above for the maps of every explainer with one map per block, next to '
            f"DAAM's accumulated maps D_l: {escape(', '.join(methods[1:]))}. The same formulas, each explainer's "
            "final map taking the place of D_{L-1} (cos_final, iou_final): its last map, or for AttnLRP and CP-LRP "
            "(attnlrp, cplrp: the positive relevance at each block's input) the input map. Lines: the median over "
            "samples; bands: the inter-quartile range.</p>",
            f'<div class="charts">{"".join(charts)}</div>',
            "<h3>How early each method reaches its final ranking</h3>",
            f'<p class="note">Per sample, the first block from which the top-20% patches of the method\'s map '
            f"overlap those of its final map with IoU of at least {RANKING_IOU} at every later block; for AttnLRP "
            "and CP-LRP, read from the last block down, the last block up to which they do at every earlier block. "
            "Depth: that block + 1 over the number of blocks.</p>",
            _table(ranking_reached(blocks, explainer_blocks)),
        ]
    )


def _class_name(value: int, names: dict[int, str]) -> str:
    return f"{value} {names[value]}" if value in names else f"class {value}"


def _convergence(convergence: pd.DataFrame, ok: pd.DataFrame) -> str:
    parts = [
        "<h2>Convergence block</h2>",
        f'<p class="note">The convergence block of a sample is the first block from which the cosine similarity of '
        f"D_l to the final map D_{{L-1}} stays at or above {CONVERGENCE_THRESHOLD} through the last block; undefined "
        "for an all-zero final map.</p>",
    ]
    if convergence.empty:
        return "".join([*parts, "<p>No ok samples.</p>"])
    table = convergence.join(ok.set_index(_SAMPLE)[["label", "predicted"]])
    blocks = table["convergence_block"]
    n_blocks = int(blocks.max()) + 1 if blocks.notna().any() else 0
    categories = [str(b) for b in range(n_blocks)] + (["undefined"] if blocks.isna().any() else [])
    groups = [("all", table)]
    labelled = table[table["label"].notna() & table["predicted"].notna()]
    if len(labelled):
        correct = labelled["predicted"] == labelled["label"]
        groups += [("correct", labelled[correct]), ("wrong", labelled[~correct])]
    bars = []
    for name, part in groups:
        counts = part["convergence_block"].value_counts().reindex(range(n_blocks), fill_value=0).tolist()
        if "undefined" in categories:
            counts.append(int(part["convergence_block"].isna().sum()))
        bars.append(Bars(f"{name} (n={len(part)})", counts))
    chart = bar_chart(categories, bars, title="convergence block", xlabel="block", ylabel="samples", width=520)
    stats = blocks.astype("Float64").describe()[["count", "mean", "50%", "min", "max"]].rename({"50%": "median"})
    return "".join([*parts, f'<div class="charts">{chart}</div>', _table(stats.rename("convergence block").to_frame())])


def _localisation(results: Results, blocks: pd.DataFrame) -> str:
    parts = ["<h2>Localisation and faithfulness</h2>"]
    evaluation = results.evaluation
    if not evaluation.empty:
        methods = summarise(evaluation)
        parts += [
            '<p class="note">Per method (DAAM\'s final map, the reference maps and the comparison explainers the '
            "job ran): the mean over samples of every metric of the evaluation table (NaN skipped: a dash where "
            "the job did not compute a metric), and the number of samples.</p>",
            _metric_descriptions(methods.columns),
            _table(methods),
        ]
    has_boxes = not blocks.empty and blocks["daam_box_energy"].notna().any()
    has_masks = not blocks.empty and "daam_mask_miou" in blocks and blocks["daam_mask_miou"].notna().any()
    if has_boxes or has_masks:
        per_block = summarise_blocks(blocks)
        x = per_block.index.to_numpy()
        kinds = ["pointing_accuracy", "box_energy"] if has_boxes else []
        kinds += ["mask_miou", "mask_ap", "mask_pixel_accuracy"] if has_masks else []
        charts = [
            line_chart(
                x,
                [Line(c, per_block[c]) for c in per_block if c.endswith(kind) and per_block[c].notna().any()],
                title=kind.replace("_", " "),
                xlabel="block",
                ylabel=kind.replace("_", " "),
                width=420,
            )
            for kind in kinds
        ]
        parts += [
            "<h3>Per block (block maps M_l and accumulated maps D_l)</h3>",
            '<p class="note">Boxes: pointing game and box energy of M_l and D_l. Masks: pixel accuracy, mIoU and mAP '
            "of D_l thresholded at its mean against the object masks (the blocks table's daam_mask_* columns).</p>"
            if has_masks
            else "",
            f'<div class="charts">{"".join(charts)}</div>',
        ]
        parts.append(_table(per_block))
    if evaluation.empty and not has_boxes and not has_masks:
        parts.append("<p>This output has no evaluation table and no ground-truth boxes or masks.</p>")
    return "".join(parts)


def _sanity(sanity: pd.DataFrame) -> str:
    """The cascading randomisation curves: per explainer, the final map's similarity to the trained model's as
    more blocks are randomised (median over samples, inter-quartile band), and the mean table."""
    if sanity.empty:
        return ""
    final = sanity[sanity["block"] == sanity["block"].max()]
    steps = np.sort(final["randomised"].unique())
    methods = sorted(final["explainer"].unique(), key=lambda name: (name != "daam", name))
    charts = []
    for column in SANITY_COLUMNS:
        lines = []
        for method in methods:
            grouped = final[final["explainer"] == method].groupby("randomised")[column]
            stats = pd.DataFrame(
                {"centre": grouped.median(), "low": grouped.quantile(0.25), "high": grouped.quantile(0.75)}
            ).reindex(steps)
            name = "DAAM" if method == "daam" else method
            count = final.loc[final["explainer"] == method, ["unit", "key"]].drop_duplicates().shape[0]
            lines.append(Line(f"{name} (n={count})", stats["centre"], stats["low"], stats["high"]))
        charts.append(
            line_chart(steps, lines, title=f"{column} to the trained map", xlabel="blocks randomised", ylabel=column)
        )
    described = "".join(
        f"<dt>{c}</dt><dd>{escape(SANITY.field(c).metadata[b'description'].decode())}</dd>" for c in SANITY_COLUMNS
    )
    table = summarise_sanity(sanity).reset_index()
    table["explainer"] = table["explainer"].replace({"daam": "DAAM"})
    samples = final[["unit", "key"]].drop_duplicates().shape[0]
    return "".join(
        [
            "<h2>Sanity check: cascading randomisation</h2>",
            '<p class="note">Adebayo et al. (2018): the blocks of the model are randomised from the top down, one '
            f"more block at a time, and {samples} samples are explained again (the trained model's class). An "
            "explanation of the model must lose its similarity to the trained model's as its weights go. x: the "
            "number of blocks randomised (k: blocks L-k .. L-1); lines: the median of the final map's similarity "
            "over the samples; "
            "bands: the inter-quartile range.</p>",
            f'<dl class="stats">{described}</dl>',
            f'<div class="charts">{"".join(charts)}</div>',
            _table(table, index=False),
        ]
    )


def _metric_descriptions(columns: pd.Index) -> str:
    """The evaluation schema's description of each metric column of the method table."""
    schema = EVALUATION
    described = []
    for column in columns:
        field = "pointing_hit" if column == "pointing_accuracy" else column
        if field in schema.names:
            text = schema.field(field).metadata[b"description"].decode()
            text = f"mean of {field}: {text}" if field != column else text
            described.append(f"<dt>{escape(column)}</dt><dd>{escape(text)}</dd>")
    return f'<dl class="stats">{"".join(described)}</dl>'


def _png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _gallery(
    results: Results,
    ok: pd.DataFrame,
    blocks: pd.DataFrame,
    convergence: pd.DataFrame,
    count: int,
    size: int,
    names: dict[int, str],
    progress: bool,
) -> str:
    if count <= 0 or blocks.empty:
        return ""
    distance = typical_samples(blocks)
    typical = distance.head((count + 1) // 2)
    atypical = distance.drop(typical.index).tail(count // 2)[::-1]
    chosen = pd.concat([typical, atypical])
    rows = ok.set_index(_SAMPLE).loc[chosen.index].reset_index()
    rows = rows.join(convergence, on=_SAMPLE)
    parts = [
        "<h2>Gallery</h2>",
        '<p class="note">The most typical samples (convergence curve closest to the mean curve) first, then the '
        "least typical (farthest). Each grid shows the image and the display mapping of D_l per block.</p>",
    ]
    try:
        flows = iter_flows(results, rows, size=size, class_names=names)
        for flow in tqdm(flows, total=len(rows), desc="report gallery", unit="image", disable=not progress):
            sample = (flow.row["unit"], flow.row["key"])
            kind = "typical" if sample in typical.index else "atypical"
            parts.append(
                f'<figure><img class="flow" alt="{escape(str(sample[1]))}" '
                f'src="data:image/png;base64,{_png(flow.grid())}"><figcaption>{kind}: {escape(str(sample[1]))}, '
                f"distance {chosen[sample]:.4f}</figcaption></figure>"
            )
    except PipelineError as e:
        logger.warning("report gallery of %s: %s", results.output.url, e)
        parts.append(f"<p>The gallery could not be drawn: {escape(str(e))}</p>")
    return "".join(parts)
