"""The HTML comparison report of several outputs: one self-contained file in the style of the dataset report
(:mod:`pipeline.viz.report`: inline SVG charts drawn by :mod:`pipeline.viz.charts`, base64 PNG images, no scripts,
no network).

It draws the tables of a :class:`pipeline.compare.Comparison` as they are. Sections: the outputs (and what was
resampled); the per-block curves of every statistic, one line per model over relative depth ``(block + 1) / L``
with each model's block numbers on an axis above the chart; when each model's decision settles; the agreement of the
final maps on the shared samples, its distribution and the samples where the models disagree most, each model's
accumulated and block maps side by side (:mod:`pipeline.viz.render`); per class; the evaluation metrics side by
side.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from html import escape
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.compare import UNSHARED_NOTE, Comparison
from pipeline.errors import PipelineError
from pipeline.store.schemas import BLOCKS
from pipeline.summaries import RANKING_IOU
from pipeline.viz.charts import Bars, Line, bar_chart, line_chart
from pipeline.viz.render import iter_flows
from pipeline.viz.report import _STYLE, _class_name, _metric_descriptions, _png, _table
from pipeline.viz.source import ClassNames, read_job, resolve_class_names

__all__ = ["compare_report"]

logger = logging.getLogger(__name__)

_DEPTH_TICKS = (0.0, 0.25, 0.5, 0.75, 1.0)
_CURVE_GROUPS = (("Accumulated maps D_l", "daam_"), ("Block maps M_l", "map_"), ("Coefficients c_l", "coef_"))
_IOU_BINS = np.linspace(0.0, 1.0, 11)
_RANK_BINS = np.linspace(-1.0, 1.0, 11)
_STYLE_MORE = """
.pair { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
.pair figure { margin: 0; } ul.note { font-size: 13px; color: #555; }
"""


def compare_report(
    comparison: Comparison,
    dest: str | Path = "compare.html",
    *,
    disagreements: int = 3,
    size: int = 80,
    progress: bool = True,
    class_names: ClassNames = None,
) -> Path:
    """Write the HTML comparison report.

    Args:
        comparison: :func:`pipeline.compare.compare` of the outputs.
        dest: The HTML file.
        disagreements: Samples drawn per pair of outputs, those whose final maps agree least (lowest top-20% IoU,
            then lowest rank correlation); 0 draws none (the pictures read the original images from the shards).
        progress: Show a progress bar while the pictures render.
        size: Longest side of a picture's panel, in pixels.
        class_names: Class names (see :func:`~pipeline.viz.source.resolve_class_names`); default from the first
            output's job that has them.

    Returns:
        The path of the written file.
    """
    jobs = [read_job(r) for r in comparison.results]
    names = next((found for job in jobs if (found := resolve_class_names(job, class_names))), {})
    sections = [
        _outputs(comparison, jobs),
        _curves(comparison),
        _settle(comparison),
        _agreement(comparison, disagreements, size, names, progress),
        _classes(comparison, names),
        _metrics(comparison),
    ]
    title = f"DAAM comparison: {', '.join(comparison.names)}"
    html = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{_STYLE}{_STYLE_MORE}</style></head><body><h1>{escape(title)}</h1>{''.join(sections)}</body></html>\n"
    )
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(html, encoding="utf-8")
    return dest


def _note(text: str) -> str:
    return f'<p class="note">{text}</p>'


def _depth_lines(
    comparison: Comparison, table: pd.DataFrame, y: str, band: tuple[str, str] | None = None
) -> tuple[list[Line], list[int]]:
    """One line per model of a table indexed by ``(model, block)`` with a ``depth`` column, and its block axes."""
    lines, axes = [], []
    for name, blocks in comparison.models["blocks"].items():
        if name not in table.index.get_level_values("model"):
            continue
        rows = table.loc[name]
        low, high = (rows[band[0]], rows[band[1]]) if band else (None, None)
        lines.append(Line(f"{name} (L={blocks})", rows[y], low, high, x=rows["depth"]))
        axes.append(int(blocks))
    return lines, axes


def _depth_chart(comparison: Comparison, table: pd.DataFrame, y: str, title: str, ylabel: str, **kw) -> str:
    lines, axes = _depth_lines(comparison, table, y, kw.pop("band", None))
    return line_chart(
        _DEPTH_TICKS, lines, title=title, xlabel="relative depth (block + 1) / L", ylabel=ylabel, block_axes=axes, **kw
    )


def _outputs(comparison: Comparison, jobs: list[dict | None]) -> str:
    models = comparison.models.copy()
    preprocess = [job["data"]["preprocess"] if job else "unknown" for job in jobs]
    models.insert(models.columns.get_loc("grid") + 1, "preprocessing", preprocess)
    notes = list(comparison.notes)
    if len(set(preprocess)) > 1:
        notes.append(
            "the outputs preprocess differently: their maps cover different windows of the images ('crop' is the "
            "centre crop, 'resize' the whole image); agreement compares them patch by patch all the same"
        )
    if not comparison.resampled:
        notes.append(f"every output has the {comparison.models['grid'].iloc[0]} patch grid: no map is resampled")
    listed = "".join(f"<li>{escape(note)}</li>" for note in notes)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f'<h2>Outputs</h2>{_table(models)}<ul class="note">{listed}</ul>{_note(f"report written {stamp}")}'


def _curves(comparison: Comparison) -> str:
    curves = comparison.curves
    parts = [
        "<h2>Per-block statistics on relative depth</h2>",
        _note(
            "x: the relative depth (block + 1) / L of each model's blocks, so the last block of every model is at "
            "1.0; the coloured axes above each chart number each model's blocks (0-based, as in the blocks table). "
            "Lines: the mean over samples; bands: the inter-quartile range (25% to 75%)."
        ),
    ]
    if curves.empty:
        return "".join([*parts, "<p>No ok samples.</p>"])
    present = list(dict.fromkeys(curves.index.get_level_values("statistic")))
    for heading, prefix in _CURVE_GROUPS:
        stats = [s for s in present if s.startswith(prefix)]
        if not stats:
            continue
        charts = [
            _depth_chart(
                comparison, curves.xs(s, level="statistic"), "mean", s, s.removeprefix(prefix), band=("q25", "q75")
            )
            for s in stats
        ]
        described = "".join(
            f"<dt>{s}</dt><dd>{escape(BLOCKS.field(s).metadata[b'description'].decode())}</dd>" for s in stats
        )
        parts += [
            f"<h3>{heading}</h3>",
            f'<div class="charts">{"".join(charts)}</div>',
            f'<dl class="stats">{described}</dl>',
        ]
    return "".join(parts)


def _settle(comparison: Comparison) -> str:
    parts = [
        "<h2>When the decision settles</h2>",
        _note(
            "The settle block of a sample is the first block from which the top-20% patches of the method's map "
            f"stay within IoU {RANKING_IOU} of those of its final map at every later block (the definition of "
            "<code>summary</code> and the dataset report); depth: that block + 1 over the model's number of blocks. "
            "Per model and method: the median and mean settle block, the mean depth and the samples where it is "
            "defined."
        ),
    ]
    if comparison.settle.empty:
        return "".join([*parts, "<p>No ok samples.</p>"])
    parts.append(_table(comparison.settle.reset_index().set_index("model")))
    if len(comparison.settle_curve):
        chart = _depth_chart(
            comparison, comparison.settle_curve, "settled", "share of samples settled (DAAM)", "share", width=480
        )
        parts += [f'<div class="charts">{chart}</div>']
    return "".join(parts)


def _histogram(agreement: pd.DataFrame, column: str, bins: np.ndarray, title: str) -> str:
    categories = [f"{low:.1f}" for low in bins[:-1]]
    groups = []
    for (a, b), rows in agreement.groupby(level=["model", "other"], sort=False):
        counts, _ = np.histogram(rows[column].dropna(), bins=bins)
        groups.append(Bars(f"{a} vs {b} (n={len(rows)})", counts.tolist()))
    return bar_chart(categories, groups, title=title, xlabel=f"{column} (bin from)", ylabel="samples", width=420)


def _agreement(comparison: Comparison, count: int, size: int, names: dict[int, str], progress: bool) -> str:
    parts = ["<h2>Agreement of the final maps</h2>"]
    agreement = comparison.agreement
    unshared = [_note(escape(UNSHARED_NOTE.format(*pair))) for pair in comparison.unshared]
    if agreement.empty:
        return "".join([*parts, *unshared])
    parts += [
        _note(
            "On the samples two outputs share (ok in both, matched by key): the IoU of the top-20% patches of their "
            "final maps D_{L-1} and the rank (Spearman) correlation of all their patches, on the common "
            f"{comparison.grid[0]}x{comparison.grid[1]} grid"
            + (" (finer maps area-averaged onto it)." if comparison.resampled else ".")
        ),
        *unshared,
        _table(comparison.agreement_summary.reset_index().set_index("model")),
        '<div class="charts">',
        _histogram(agreement, "top20_iou", _IOU_BINS, "top-20% IoU of the final maps"),
        _histogram(agreement, "rank_correlation", _RANK_BINS, "rank correlation of the final maps"),
        "</div>",
    ]
    if count > 0:
        parts.append(_disagreements(comparison, count, size, names, progress))
    return "".join(parts)


def _disagreements(comparison: Comparison, count: int, size: int, names: dict[int, str], progress: bool) -> str:
    """Per pair, the ``count`` samples whose final maps agree least, each model's maps side by side."""
    agreement = comparison.agreement.reset_index()
    agreement["pair"] = agreement.groupby(["model", "other"], sort=False).ngroup()  # pairs in the order given
    chosen = (
        agreement.sort_values(["pair", "top20_iou", "rank_correlation", "key"], na_position="first")
        .groupby("pair", sort=False)
        .head(count)
    )
    wanted = {name: set() for name in comparison.names}
    for row in chosen.itertuples():
        wanted[row.model].add(row.key)
        wanted[row.other].add(row.key)
    parts = [
        "<h3>Where the models disagree most</h3>",
        _note(
            f"Per pair of outputs, the {count} shared samples with the lowest top-20% IoU of the final maps (then the "
            "lowest rank correlation). Each model's picture: the image, its accumulated maps D_l per block, and below "
            "them its block maps M_l (scaled by their largest value over the blocks)."
        ),
    ]
    try:
        pictures = _pictures(comparison, wanted, size, names, progress)
    except PipelineError as e:
        logger.warning("compare report pictures: %s", e)
        return "".join([*parts, f"<p>The pictures could not be drawn: {escape(str(e))}</p>"])
    settled = comparison.settle_samples
    for row in chosen.itertuples():
        figures = []
        for name in (row.model, row.other):
            unit = row.unit if name == row.model else row.other_unit
            block = settled.loc[(name, unit, row.key), "block"]
            settles = "undefined" if pd.isna(block) else f"block {int(block)}"
            figures.append(
                f"<figure><figcaption>{escape(name)} (L={comparison.models.loc[name, 'blocks']}): settles at "
                f'{settles}</figcaption><img class="flow" alt="{escape(name)} {escape(row.key)}" '
                f'src="data:image/png;base64,{pictures[name][row.key]}"></figure>'
            )
        parts.append(
            f"<h4>{escape(row.key)}: {escape(row.model)} vs {escape(row.other)}, top-20% IoU {row.top20_iou:.3f}, "
            f'rank correlation {row.rank_correlation:.3f}</h4><div class="pair">{"".join(figures)}</div>'
        )
    return "".join(parts)


def _pictures(
    comparison: Comparison, wanted: dict[str, set[str]], size: int, names: dict[int, str], progress: bool
) -> dict[str, dict[str, str]]:
    """Base64 PNG grids (D_l and M_l) of the wanted keys of each model, one pass over each output's shards."""
    pictures: dict[str, dict[str, str]] = {}
    total = sum(len(keys) for keys in wanted.values())
    with tqdm(total=total, desc="compare pictures", unit="image", disable=not progress) as bar:
        for name, results in zip(comparison.names, comparison.results, strict=True):
            samples = results.samples
            rows = samples[(samples["status"] == "ok") & samples["key"].isin(wanted[name])]
            rows = rows.drop_duplicates("key", keep=False)  # matched keys are unique in their output
            pictures[name] = {}
            for flow in iter_flows(results, rows, size=size, class_names=names):
                pictures[name][flow.row["key"]] = _png(flow.grid(block_maps=True))
                bar.update()
    return pictures


def _classes(comparison: Comparison, names: dict[int, str]) -> str:
    parts = ["<h2>Per class</h2>"]
    classes = comparison.classes
    if classes.empty:
        return "".join([*parts, "<p>No output has labels.</p>"])
    parts.append(
        _note(
            "DAAM's settle block per class (by label): the mean depth at which its samples settle in each model. "
            "First, the earliest and latest classes of each model; then the classes whose mean settle depth differs "
            "most between the models."
        )
    )
    rows = []
    for name in comparison.names:
        if name not in classes.index.get_level_values("model"):
            continue
        own = classes.loc[name]

        def listed(part: pd.DataFrame) -> str:
            return ", ".join(f"{_class_name(int(c), names)} ({d:.2f})" for c, d in part["mean_depth"].items())

        rows.append({"model": name, "earliest (mean depth)": listed(own.head(3)), "latest": listed(own.tail(3)[::-1])})
    parts.append(_table(pd.DataFrame(rows).set_index("model")))
    differences = comparison.class_differences
    if len(comparison.names) > 1 and len(differences):
        top = differences.head(12)
        shown = top.rename(index=lambda c: _class_name(int(c), names)).rename_axis(index="class", columns=None)
        models = [c for c in top.columns if c != "difference"]
        chart = bar_chart(
            list(shown.index),
            [Bars(m, top[m].fillna(0.0).tolist()) for m in models],
            title="mean settle depth per class",
            xlabel="class",
            ylabel="mean depth",
            width=max(420, 60 * len(top)),
        )
        parts += [
            "<h3>Classes whose settle depth differs most</h3>",
            f'<div class="charts">{chart}</div>',
            _table(shown),
        ]
    return "".join(parts)


def _metrics(comparison: Comparison) -> str:
    parts = ["<h2>Evaluation metrics</h2>"]
    metrics = comparison.metrics
    if metrics.empty:
        return "".join([*parts, "<p>No output has an evaluation table (a job's <code>evaluate:</code> section).</p>"])
    without = [n for n in comparison.names if n not in metrics.index.get_level_values("model")]
    methods = list(dict.fromkeys(metrics.index.get_level_values("method")))
    side = metrics.reorder_levels(["method", "model"]).reindex(
        pd.MultiIndex.from_product([methods, comparison.names], names=["method", "model"])
    )
    side = side.dropna(how="all").reset_index().set_index("method")
    parts += [
        _note(
            "Per method, the mean over samples of every metric of each output's evaluation table, the models on "
            "adjacent rows (a dash where an output did not compute a metric), and the number of samples."
            + (f" Without an evaluation table: {escape(', '.join(without))}." if without else "")
        ),
        _metric_descriptions(metrics.columns.drop("samples")),
        _table(side),
    ]
    return "".join(parts)
