"""The driver's progress bar of a stage: samples as they are computed, with rate and ETA, and units as they commit.

The bar counts the samples of committed units (their markers' counts) plus those the units in flight have computed
so far (the pools ask the workers about every second, Ray actors too), so it moves inside a unit. Its total is the
shards' sample count from their ``index.json`` (what ``daam-pipeline shard`` writes) where every shard is listed;
otherwise it is estimated from the units committed so far, and there is no ETA before the first one. It shows only
on a terminal: ``--quiet``, a pipe or a log file get no bar.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Mapping
from typing import IO, Any

from tqdm import tqdm

__all__ = ["StageProgress"]

_FIXED_SIZE = (100, 24)  # columns, rows


class StageProgress:
    """The bar of one stage (``explain`` or ``bank``) over its units.

    Args:
        desc: The bar's label (``demo explain``).
        units: Units the stage runs.
        samples: Samples those units hold, when known (:func:`pipeline.data.shards.indexed_samples`).
        enabled: False: no bar at all (``--quiet``).
        file: Where the bar is drawn (default stderr); drawn only when it is a terminal.
    """

    def __init__(self, desc: str, units: int, samples: int | None, *, enabled: bool, file: IO[str] | None = None):
        file = file if file is not None else sys.stderr
        shown = enabled and _is_terminal(file)
        self._units = units
        self._known_total = samples
        self._committed: dict[str, int] = {}  # unit -> its samples, ok and failed
        self._in_flight: dict[str, int] = {}
        self.failed_units = 0
        sized = shown and _width(file) > 0  # a terminal that reports no size (some ptys) gets a fixed width
        self._bar = tqdm(
            total=samples,
            desc=desc,
            unit="sample",
            disable=not shown,
            dynamic_ncols=sized,
            ncols=None if sized else _FIXED_SIZE[0],
            nrows=None if sized else _FIXED_SIZE[1],
            file=file,
            smoothing=0,  # the mean rate since the start: units arrive in batches, a short-term rate jumps
        )
        self._show()

    def in_flight(self, counts: Mapping[str, int]) -> None:
        """What the pool reports: the samples computed so far by each unit in flight (a unit that finished since,
        and is not reported, keeps its count until its outcome arrives; a retried unit's count starts over)."""
        self._in_flight |= {unit: n for unit, n in counts.items() if unit not in self._committed}
        self._show()

    def committed(self, unit: str, samples: int) -> None:
        """A unit committed with ``samples`` samples (ok and failed)."""
        self._committed[unit] = samples
        self._in_flight.pop(unit, None)
        self._show()

    def failed(self, unit: str) -> None:
        """A unit failed after its retries: it counts as finished, with no samples."""
        self.failed_units += 1
        self._committed[unit] = 0
        self._in_flight.pop(unit, None)
        self._show()

    @property
    def samples(self) -> int:
        """Samples computed so far: those of committed units and of the units in flight."""
        return sum(self._committed.values()) + sum(self._in_flight.values())

    def _show(self) -> None:
        bar, done = self._bar, self.samples
        if self._known_total is None and self._committed:  # an estimate from the units committed so far
            per_unit = sum(self._committed.values()) / max(len(self._committed) - self.failed_units, 1)
            bar.total = max(round(per_unit * (self._units - self.failed_units)), done)
        bar.update(done - bar.n)
        postfix = {"units": f"{len(self._committed)}/{self._units}"}
        if self.failed_units:
            postfix["failed_units"] = str(self.failed_units)
        bar.set_postfix(postfix, refresh=True)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> StageProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _width(file: IO[str]) -> int:
    try:
        return os.get_terminal_size(file.fileno()).columns
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return 0


def _is_terminal(file: IO[str]) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):
        return False
