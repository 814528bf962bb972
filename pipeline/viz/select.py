"""Which samples to look at: the render queries, by the settle block.

A sample's settle block is the project's one definition (:func:`pipeline.summaries.settle_blocks`, as ``summary``
and the report use it): the first block from which the top-20% patches of D_l stay within IoU 0.9 of the final
map's. It is missing (NA) when the final map is all zero.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pandas as pd

from pipeline.errors import SampleNotFoundError
from pipeline.names import RENDER_QUERIES, RENDER_QUERY_ALIASES
from pipeline.store.results import Results
from pipeline.summaries import settle_blocks

__all__ = ["QUERIES", "QUERY_ALIASES", "final_point_hits", "select_samples", "settle_table"]

logger = logging.getLogger(__name__)

QUERIES = RENDER_QUERIES
QUERY_ALIASES = RENDER_QUERY_ALIASES
_SAMPLE = ["unit", "key"]


def settle_table(blocks: pd.DataFrame) -> pd.DataFrame:
    """The settle block of every sample of a blocks table, and what orders samples with the same one.

    Args:
        blocks: The blocks table (``open_results(OUT).blocks``); needs ``unit``, ``key``, ``block``,
            ``daam_iou_final``.

    Returns:
        One row per sample, indexed by ``(unit, key)``: ``settle_block`` (nullable Int16, NA when undefined) and
        ``mean_iou_final``, the mean of ``daam_iou_final`` over the blocks (NaN skipped).
    """
    table = pd.DataFrame(
        {
            "settle_block": settle_blocks(blocks),
            "mean_iou_final": blocks.groupby(_SAMPLE)["daam_iou_final"].mean(),
        }
    )
    return table.rename_axis(_SAMPLE)


def final_point_hits(blocks: pd.DataFrame) -> pd.Series:
    """The pointing game of each sample's final map D_{L-1} (``daam_point_hit`` at the last block): 1.0 a hit,
    0.0 a miss, NaN without boxes; named ``point_hit``, indexed by ``(unit, key)``."""
    last = blocks[blocks["block"] == blocks["block"].max()]
    return last.set_index(_SAMPLE)["daam_point_hit"].rename("point_hit")


def select_samples(
    results: Results,
    keys: Sequence[str] | None = None,
    *,
    query: str | None = None,
    count: int = 8,
    seed: int = 0,
) -> pd.DataFrame:
    """Ok rows of the samples table picked by keys or by a query.

    Args:
        results: An opened output.
        keys: Sample keys; a key held by several units selects each of them.
        query: One of :data:`QUERIES` when ``keys`` is None: ``earliest-settled`` (earliest settle block, then
            highest mean IoU with the final map), ``latest-settled`` (latest, then lowest), ``wrong`` (predicted !=
            label, most confident first) or ``random`` (seeded); or one of :data:`QUERY_ALIASES`.
        count: Most samples a query returns.
        seed: Seed of ``random``.

    Returns:
        The selected rows of the samples table, in order, with ``settle_block``, ``mean_iou_final`` and
        ``point_hit`` (:func:`final_point_hits`).

    Raises:
        SampleNotFoundError: a key that names no ok sample, an unknown query, or neither keys nor a query.
    """
    samples = results.samples
    blocks = results.blocks
    ok = samples[samples["status"] == "ok"].join(settle_table(blocks), on=_SAMPLE)
    ok = ok.join(final_point_hits(blocks), on=_SAMPLE)
    if keys is not None:
        keys = list(keys)
        stored = set(ok["key"])
        missing = [k for k in keys if k not in stored]
        if missing:
            failed = samples[samples["key"].isin(missing)]
            why = "; ".join(f"{r.key} failed: {r.error}" for r in failed.itertuples()) or "no such keys"
            raise SampleNotFoundError(f"no ok sample with keys {missing} in {results.output.url} ({why})")
        order = {k: i for i, k in enumerate(keys)}
        return ok[ok["key"].isin(order)].sort_values("key", key=lambda s: s.map(order), kind="stable")
    query = QUERY_ALIASES.get(query, query)
    if query not in QUERIES:
        raise SampleNotFoundError(f"query must be one of {list(QUERIES)} (or give keys), got {query!r}")
    if query == "random":
        return ok.sample(n=min(count, len(ok)), random_state=seed)
    if query == "wrong":
        wrong = ok[ok["label"].notna() & (ok["predicted"] != ok["label"])]
        if ok["label"].isna().all():
            logger.warning("query 'wrong': the samples of %s have no labels", results.output.url)
        return wrong.sort_values(["score", *_SAMPLE], ascending=[False, True, True]).head(count)
    early = query == "earliest-settled"
    defined = ok[ok["settle_block"].notna()]
    return defined.sort_values(
        ["settle_block", "mean_iou_final", *_SAMPLE], ascending=[early, not early, True, True]
    ).head(count)
