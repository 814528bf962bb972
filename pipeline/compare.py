"""Outputs of several models side by side, with pandas: how each model's maps evolve over its blocks, when its
decision settles, and where the models agree on the samples they share.

``compare(open_results(a), open_results(b), ...)`` returns a :class:`Comparison`: pandas tables, each with a
``model`` level, that :mod:`pipeline.viz.compare_report` draws as they are.

- Blocks are placed on *relative depth* ``(block + 1) / L``, so that models of different depth ``L`` line up: the
  last block of every model is at 1.0. Tables keep the absolute ``block`` beside its ``depth``.
- The *settle block* of a sample is the project's one definition (:func:`pipeline.summaries.first_stable_block`
  over ``daam_iou_final`` at :data:`pipeline.summaries.RANKING_IOU`, as ``summary`` and the report use it): the
  first block from which the top-20% patches of D_l stay within IoU 0.9 of the final map's.
- *Agreement* of two models on a sample compares their final maps D_{L-1}: the IoU of their top-20% patches and the
  rank (Spearman) correlation of their patches (:func:`pipeline.stats.top_iou`, :func:`pipeline.sanity.spearman`).
  Samples are matched by key (ok samples whose key is unique in each output). When the patch grids differ, every
  final map is first area-averaged onto the common grid, the smallest height and width among the outputs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError, StoreError
from pipeline.sanity import spearman
from pipeline.stats import STATISTICS, top_iou
from pipeline.store.output import OutputLike
from pipeline.store.results import Results, open_results
from pipeline.summaries import RANKING_IOU, first_stable_block, label_accuracy, ranking_reached, summarise

__all__ = [
    "CURVE_STATISTICS",
    "UNSHARED_NOTE",
    "Comparison",
    "compare",
    "comparison_tables",
    "final_maps",
    "relative_depth",
]

_SAMPLE = ["unit", "key"]
_POSITIONS = ("peak_row", "peak_col", "centroid_row", "centroid_col")
CURVE_STATISTICS = tuple(s for s in STATISTICS if not s.endswith(_POSITIONS))
"""Statistics of the blocks table drawn per block (patch coordinates are left out: they do not compare across
grids)."""
_SPREADS = ("map_spread", "daam_spread")  # in patches: divided by sqrt(h w) when the grids differ
UNSHARED_NOTE = "{} and {} share no sample key: only their dataset-level tables are compared"


@dataclass(frozen=True)
class Comparison:
    """The tables of a comparison; every one has a ``model`` level (an index level, or the columns' name).

    Attributes:
        models: One row per model, in the order given: ``output``, ``job``, ``architecture`` (the timm model),
            ``blocks`` (L), ``grid`` (``"hxw"``), ``samples``, ``ok``, ``accuracy`` (top-1 or k-NN accuracy where
            labels exist).
        curves: Per ``(model, statistic, block)``: ``depth``, ``mean``, ``q25``, ``q75`` and ``samples`` (values
            that are not NaN) of each statistic of :data:`CURVE_STATISTICS` the output has values of.
        settle: Per ``(model, method)``: :func:`pipeline.summaries.ranking_reached` of each output (DAAM and every
            comparison explainer with per-block maps): ``median_block``, ``mean_block``, ``mean_depth``,
            ``samples``.
        settle_samples: Per ``(model, unit, key)``: DAAM's settle ``block`` (NA where undefined), its ``depth`` and
            the sample's ``label``.
        settle_curve: Per ``(model, block)``: ``depth`` and ``settled``, the share of the samples with a settle
            block that have settled by that block.
        agreement: Per ``(model, other, key)``, for every pair of outputs (in the order given) and every sample they
            share: ``unit`` and ``other_unit``, ``top20_iou`` and ``rank_correlation`` of the final maps.
        agreement_summary: Per ``(model, other)``: ``samples`` shared, mean and median of ``top20_iou`` and of
            ``rank_correlation``.
        classes: Per ``(model, label)``: ``samples``, ``median_block``, ``mean_block``, ``mean_depth`` of DAAM's
            settle block; earliest first within a model.
        class_differences: Per ``label``: the ``mean_depth`` of each model (columns named by model) and
            ``difference``, the largest minus the smallest; the most different first.
        metrics: Per ``(model, method)``: :func:`pipeline.summaries.summarise` of each output's evaluation table.
        grid: The common grid ``(h, w)`` of the agreement.
        notes: One line each: resampling, spreads scaled, outputs without shared keys or labels.
        results: The compared outputs, in order.
    """

    models: pd.DataFrame
    curves: pd.DataFrame
    settle: pd.DataFrame
    settle_samples: pd.DataFrame
    settle_curve: pd.DataFrame
    agreement: pd.DataFrame
    agreement_summary: pd.DataFrame
    classes: pd.DataFrame
    class_differences: pd.DataFrame
    metrics: pd.DataFrame
    grid: tuple[int, int]
    notes: tuple[str, ...]
    results: tuple[Results, ...] = field(repr=False)

    @property
    def names(self) -> list[str]:
        """The models' names, in order."""
        return list(self.models.index)

    @property
    def resampled(self) -> bool:
        """Whether the patch grids differ (the final maps were area-averaged onto :attr:`grid`)."""
        return self.models["grid"].nunique() > 1

    @property
    def unshared(self) -> list[tuple[str, str]]:
        """The pairs of outputs that share no sample key."""
        shared = set(self.agreement_summary.index)
        return [pair for pair in itertools.combinations(self.names, 2) if pair not in shared]


def relative_depth(block: pd.Series | np.ndarray | int, blocks: int) -> pd.Series | np.ndarray | float:
    """``(block + 1) / blocks``: where block ``block`` of a model with ``blocks`` blocks sits, in (0, 1]."""
    return (block + 1) / blocks


def compare(*outputs: Results | OutputLike, names: Sequence[str | None] | None = None) -> Comparison:
    """Compare the outputs of several models (two or more), typically over the same shards.

    Args:
        outputs: Opened outputs (``open_results(path)``) or their locations.
        names: One display name per output (None: its default); default the outputs' job names (the ``job``
            column of the samples tables) when they differ, else their folder names when those differ, else the job
            names numbered.

    Returns:
        The :class:`Comparison`.

    Raises:
        ConfigError: fewer than two outputs, or names that are not one unique name per output.
        EmptyOutputError: an output without a committed unit.
        StoreError: an output that stores neither ``daam`` nor ``block_maps`` while it shares samples with another.
    """
    if len(outputs) < 2:
        raise ConfigError(f"compare needs two outputs or more, got {len(outputs)}")
    results = tuple(o if isinstance(o, Results) else open_results(o) for o in outputs)
    for r in results:
        r.require_units()
    names = _names(results, names)
    shapes = {name: _shape(r) for name, r in zip(names, results, strict=True)}
    grids = {shape[1] for shape in shapes.values()}
    grid = (min(g[0] for g in grids), min(g[1] for g in grids))
    notes = []
    if len(grids) > 1:
        listed = ", ".join(f"{n} {_grid(g)}" for n, (_, g) in shapes.items())
        notes.append(f"patch grids differ ({listed}): final maps are area-averaged onto the common {_grid(grid)} grid")
        notes.append("spreads (map_spread, daam_spread) are in units of each model's grid side, sqrt(h w)")

    models, curves, settle, settle_samples, metrics = [], {}, {}, {}, {}
    for name, r in zip(names, results, strict=True):
        blocks, samples = r.blocks, r.samples
        depth, own_grid = shapes[name]
        if len(grids) > 1 and len(blocks):
            blocks = blocks.assign(**{s: blocks[s] / math.sqrt(own_grid[0] * own_grid[1]) for s in _SPREADS})
        models.append(_facts(name, r, samples, depth, own_grid))
        curves[name] = _curves(blocks, depth)
        settle[name] = ranking_reached(r.blocks, r.explainer_blocks)
        settle_samples[name] = _settle_samples(r.blocks, samples, depth)
        if len(r.evaluation):
            metrics[name] = summarise(r.evaluation)
    settled = _concat(settle_samples)
    classes = _classes(settled)
    if classes.empty:
        notes.append("no output has labels: no per-class tables")
    agreement = _agreement(dict(zip(names, results, strict=True)), grid, notes)
    return Comparison(
        models=pd.DataFrame(models).set_index("model_name").rename_axis("model"),
        curves=_concat(curves),
        settle=_concat(settle),
        settle_samples=settled,
        settle_curve=_settle_curve(settled, {n: s[0] for n, s in shapes.items()}),
        agreement=agreement,
        agreement_summary=_agreement_summary(agreement),
        classes=classes,
        class_differences=_class_differences(classes, names),
        metrics=_concat(metrics),
        grid=grid,
        notes=tuple(notes),
        results=results,
    )


def _names(results: Sequence[Results], names: Sequence[str | None] | None) -> list[str]:
    jobs = [", ".join(sorted(set(r.samples["job"].dropna()))) or r.output.url for r in results]
    folders = [r.output.root.rstrip("/").rsplit("/", 1)[-1] for r in results]
    if len(set(jobs)) == len(jobs):
        chosen = jobs
    elif len(set(folders)) == len(folders):
        chosen = folders
    else:
        chosen = [f"{job} #{i + 1}" for i, job in enumerate(jobs)]
    if names is not None:
        if len(names) != len(results):
            raise ConfigError(f"compare names: {len(names)} names for {len(results)} outputs")
        chosen = [default if name is None else str(name) for name, default in zip(names, chosen, strict=True)]
    if len(set(chosen)) != len(chosen):
        raise ConfigError(f"compare names must be one unique name per output, got {chosen}")
    return chosen


def _shape(results: Results) -> tuple[int, tuple[int, int]]:
    """``(L, (h, w))`` of an output's maps."""
    attrs = results.attrs
    if "n_blocks" in attrs and "grid" in attrs:
        return int(attrs["n_blocks"]), (int(attrs["grid"][0]), int(attrs["grid"][1]))
    raise StoreError(f"{results.output.url} has no map layout (maps.zarr attributes n_blocks, grid)")


def _grid(grid: tuple[int, int]) -> str:
    return f"{grid[0]}x{grid[1]}"


def _facts(name: str, results: Results, samples: pd.DataFrame, depth: int, grid: tuple[int, int]) -> dict:
    ok = samples["status"] == "ok"
    return {
        "model_name": name,
        "output": results.output.url,
        "job": ", ".join(sorted(set(samples["job"].dropna()))),
        "architecture": results.attrs.get("model", ", ".join(sorted(set(samples["model"].dropna())))),
        "blocks": depth,
        "grid": _grid(grid),
        "samples": len(samples),
        "ok": int(ok.sum()),
        "accuracy": label_accuracy(samples),
    }


def _concat(tables: dict[str, pd.DataFrame | pd.Series], names: Sequence[str] = ("model",)) -> pd.DataFrame:
    """Tables keyed by model name, stacked under a ``model`` index level (an empty frame when there are none)."""
    tables = {k: v for k, v in tables.items() if len(v)}
    if not tables:
        return pd.DataFrame()
    return pd.concat(tables, names=list(names))


def _curves(blocks: pd.DataFrame, depth: int) -> pd.DataFrame:
    stats = [s for s in CURVE_STATISTICS if s in blocks]
    if blocks.empty or not stats:
        return pd.DataFrame()
    grouped = blocks.astype({s: "float64" for s in stats}).groupby("block")[stats]
    parts = {
        "mean": grouped.mean(),
        "q25": grouped.quantile(0.25),
        "q75": grouped.quantile(0.75),
        "samples": grouped.count(),
    }
    table = pd.concat({k: v.rename_axis(columns="statistic").stack() for k, v in parts.items()}, axis=1)
    table = table.reorder_levels(["statistic", "block"])
    order = pd.MultiIndex.from_product([stats, sorted(blocks["block"].astype(int).unique())])
    table = table.reindex(order.set_names(["statistic", "block"]))  # the statistics in STATISTICS' order
    table.insert(0, "depth", relative_depth(table.index.get_level_values("block").to_numpy(), depth))
    table = table[table.groupby(level="statistic")["samples"].transform("sum") > 0]  # no values: box statistics
    return table.astype({"samples": int})


def _settle_samples(blocks: pd.DataFrame, samples: pd.DataFrame, depth: int) -> pd.DataFrame:
    if blocks.empty:
        return pd.DataFrame()
    block = first_stable_block(blocks, "daam_iou_final", RANKING_IOU).rename("block")
    labels = samples[samples["status"] == "ok"].set_index(_SAMPLE)["label"]
    table = block.to_frame().assign(depth=relative_depth(block.astype("Float64"), depth))
    return table.join(labels)


def _settle_curve(settled: pd.DataFrame, depths: dict[str, int]) -> pd.DataFrame:
    parts = {}
    for name, depth in depths.items():
        if settled.empty or name not in settled.index.get_level_values("model"):
            continue
        block = settled.loc[name, "block"].dropna().astype(int)
        counts = block.value_counts().reindex(range(depth), fill_value=0).sort_index()
        share = counts.cumsum() / max(len(block), 1)
        parts[name] = pd.DataFrame(
            {"depth": relative_depth(counts.index.to_numpy(), depth), "settled": share.to_numpy()},
            index=pd.Index(counts.index, name="block"),
        )
    return _concat(parts)


def _classes(settled: pd.DataFrame) -> pd.DataFrame:
    if settled.empty or settled["label"].isna().all():
        return pd.DataFrame()
    labelled = settled[settled["label"].notna()].astype({"label": int})
    grouped = labelled.groupby(["model", "label"], sort=False)
    table = pd.DataFrame(
        {
            "samples": grouped.size(),
            "median_block": grouped["block"].median(),
            "mean_block": grouped["block"].mean(),
            "mean_depth": grouped["depth"].mean(),
        }
    )
    position = {name: i for i, name in enumerate(dict.fromkeys(settled.index.get_level_values("model")))}
    rows = table.reset_index()
    rows = rows.assign(position=rows["model"].map(position)).sort_values(["position", "mean_depth", "label"])
    return rows.drop(columns="position").set_index(["model", "label"])


def _class_differences(classes: pd.DataFrame, names: Sequence[str]) -> pd.DataFrame:
    if classes.empty:
        return pd.DataFrame()
    depth = classes["mean_depth"].unstack("model").astype(float)
    depth = depth[[n for n in names if n in depth.columns]]
    depth["difference"] = depth.max(axis=1) - depth.min(axis=1)
    return depth.sort_values(["difference", "label"], ascending=[False, True]).rename_axis(columns="model")


def final_maps(results: Results, keys: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """The final accumulated maps D_{L-1} of the ok samples with these keys, read unit by unit (``iter_units``).

    D_{L-1} is the stored ``daam[L - 1]``, or the sum of the stored block maps where the output keeps no ``daam``.

    Returns:
        The keys found, in unit and row order, and their ``(n, h, w)`` float32 maps.

    Raises:
        StoreError: the output stores neither ``daam`` nor ``block_maps``.
    """
    wanted = pd.Index(list(keys))
    found, parts = [], []
    for unit, unit_keys, arrays in results.iter_units():
        take = np.flatnonzero(pd.Index(unit_keys).isin(wanted))
        if not len(take):
            continue
        if "daam" in arrays:
            parts.append(arrays["daam"][take, -1])
        elif "block_maps" in arrays:
            parts.append(arrays["block_maps"][take].sum(axis=1))
        else:
            raise StoreError(f"unit {unit} of {results.output.url} stores neither daam nor block_maps (output.arrays)")
        found += [unit_keys[i] for i in take]
    if not parts:
        return [], np.zeros((0, *_shape(results)[1]), np.float32)
    return found, np.concatenate(parts)


def _unique_keys(results: Results) -> pd.DataFrame:
    """The ok samples whose key no other ok sample of the output holds: ``unit`` indexed by ``key``."""
    ok = results.samples.loc[results.samples["status"] == "ok", ["key", "unit"]]
    return ok.drop_duplicates("key", keep=False).set_index("key")


def _agreement(results: dict[str, Results], grid: tuple[int, int], notes: list[str]) -> pd.DataFrame:
    """Every pair's agreement on the keys it shares; the maps of each output are read once."""
    keys = {name: _unique_keys(r) for name, r in results.items()}
    for name, r in results.items():
        ok = int((r.samples["status"] == "ok").sum())
        if len(keys[name]) < ok:
            notes.append(
                f"{name}: {ok - len(keys[name])} ok samples whose key is held by several units are not matched"
            )
    wanted = {
        name: keys[name].index.intersection(pd.Index(sorted(set().union(*(keys[o].index for o in keys if o != name)))))
        for name in keys
    }
    maps = {}
    for name, r in results.items():
        if len(wanted[name]):
            found, values = final_maps(r, list(wanted[name]))
            resampled = _resample(torch.from_numpy(values), grid)
            maps[name] = (pd.Index(found), resampled)
    pairs = {}
    for a, b in itertools.combinations(results, 2):
        shared = keys[a].index.intersection(keys[b].index).sort_values()
        if not len(shared):
            notes.append(UNSHARED_NOTE.format(a, b))
            continue
        left = maps[a][1][maps[a][0].get_indexer(shared)]
        right = maps[b][1][maps[b][0].get_indexer(shared)]
        pairs[(a, b)] = pd.DataFrame(
            {
                "unit": keys[a].loc[shared, "unit"].to_numpy(),
                "other_unit": keys[b].loc[shared, "unit"].to_numpy(),
                "top20_iou": top_iou(left, right).numpy().astype(float),
                "rank_correlation": spearman(left.flatten(1), right.flatten(1)).numpy().astype(float),
            },
            index=shared.rename("key"),
        )
    return _concat(pairs, names=("model", "other"))


def _resample(maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``(n, h, w)`` maps area-averaged onto ``grid`` (unchanged when they are on it)."""
    if tuple(maps.shape[-2:]) == tuple(grid) or not len(maps):
        return maps
    return F.interpolate(maps[:, None], size=grid, mode="area")[:, 0]


def _agreement_summary(agreement: pd.DataFrame) -> pd.DataFrame:
    if agreement.empty:
        return pd.DataFrame()
    grouped = agreement.groupby(level=["model", "other"], sort=False)
    return pd.DataFrame(
        {
            "samples": grouped.size(),
            "top20_iou_mean": grouped["top20_iou"].mean(),
            "top20_iou_median": grouped["top20_iou"].median(),
            "rank_correlation_mean": grouped["rank_correlation"].mean(),
            "rank_correlation_median": grouped["rank_correlation"].median(),
        }
    )


def comparison_tables(comparison: Comparison) -> str:
    """The headline tables of a comparison as text, as ``daam-pipeline compare`` prints them: the models, when
    each one's decision settles, the agreement of their final maps, the classes that settle most differently and
    the evaluation metrics side by side."""

    def text(frame: pd.DataFrame) -> str:
        return frame.to_string(float_format=lambda v: f"{v:.3f}")

    parts = ["models:", text(comparison.models.drop(columns="output"))]
    parts += [
        f"settle block (first block from which the top-20% patches of D_l stay within IoU {RANKING_IOU} of the final "
        "map's; depth = (block + 1) / L):",
        text(comparison.settle),
    ]
    if len(comparison.agreement_summary):
        parts += [f"agreement of the final maps on shared keys ({_grid(comparison.grid)} grid):"]
        parts.append(text(comparison.agreement_summary))
    if len(comparison.class_differences):
        parts += ["classes whose mean settle depth differs most:", text(comparison.class_differences.head(5))]
    if len(comparison.metrics):
        parts += ["evaluation metrics:", text(comparison.metrics)]
    parts += [f"note: {note}" for note in comparison.notes]
    return "\n".join(parts)
