"""Which samples to look at: the convergence block and the render queries.

The convergence block of a sample is the first block ``l`` from which its accumulated map stays close to the final
one: ``daam_cos_final >= threshold`` (default 0.95) at ``l`` and at every later block. It is missing (NA) when the
final map is all zero (the cosine is NaN there). Render queries and the report use this one definition.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pandas as pd

from pipeline.errors import SampleNotFoundError
from pipeline.store.results import Results
from pipeline.summaries import first_stable_block

__all__ = ["CONVERGENCE_THRESHOLD", "QUERIES", "convergence_blocks", "select_samples"]

logger = logging.getLogger(__name__)

CONVERGENCE_THRESHOLD = 0.95
QUERIES = ("most-converged", "least-converged", "wrong", "random")
_SAMPLE = ["unit", "key"]


def convergence_blocks(blocks: pd.DataFrame, threshold: float = CONVERGENCE_THRESHOLD) -> pd.DataFrame:
    """The convergence block of every sample of a blocks table.

    Args:
        blocks: The blocks table (``open_results(OUT).blocks``); needs ``unit``, ``key``, ``block``,
            ``daam_cos_final``.
        threshold: Cosine to the final map that counts as converged.

    Returns:
        One row per sample, indexed by ``(unit, key)``: ``convergence_block`` (nullable Int16, NA when undefined)
        and ``mean_cos_final``, the mean of ``daam_cos_final`` over the blocks (NaN skipped).
    """
    table = pd.DataFrame(
        {
            "convergence_block": first_stable_block(blocks, "daam_cos_final", threshold),
            "mean_cos_final": blocks.groupby(_SAMPLE)["daam_cos_final"].mean(),
        }
    )
    return table.rename_axis(_SAMPLE)


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
        query: One of :data:`QUERIES` when ``keys`` is None: ``most-converged`` (earliest convergence block, then
            highest mean cosine to the final map), ``least-converged`` (latest, then lowest), ``wrong``
            (predicted != label, most confident first) or ``random`` (seeded).
        count: Most samples a query returns.
        seed: Seed of ``random``.

    Returns:
        The selected rows of the samples table, in order, with ``convergence_block`` and ``mean_cos_final``.

    Raises:
        SampleNotFoundError: a key that names no ok sample, an unknown query, or neither keys nor a query.
    """
    samples = results.samples
    ok = samples[samples["status"] == "ok"].join(convergence_blocks(results.blocks), on=_SAMPLE)
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
    if query not in QUERIES:
        raise SampleNotFoundError(f"query must be one of {list(QUERIES)} (or give keys), got {query!r}")
    if query == "random":
        return ok.sample(n=min(count, len(ok)), random_state=seed)
    if query == "wrong":
        wrong = ok[ok["label"].notna() & (ok["predicted"] != ok["label"])]
        if ok["label"].isna().all():
            logger.warning("query 'wrong': the samples of %s have no labels", results.output.url)
        return wrong.sort_values(["score", *_SAMPLE], ascending=[False, True, True]).head(count)
    early = query == "most-converged"
    defined = ok[ok["convergence_block"].notna()]
    return defined.sort_values(
        ["convergence_block", "mean_cos_final", *_SAMPLE], ascending=[early, not early, True, True]
    ).head(count)
