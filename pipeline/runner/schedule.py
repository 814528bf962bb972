"""A pool's books: which unit runs where, when a failed unit runs again, and when a unit counts as stalled.

The pools (:mod:`pipeline.runner.pools`) talk to their workers, Ray actors or threads of this process; what they
decide is decided here, the same way for both, as Ray Data keeps its actor pool's bookkeeping apart from the
operator that runs it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, replace
from typing import Any

from pipeline.store.units import unit_name

__all__ = ["StallWatch", "UnitOutcome", "UnitSchedule"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnitOutcome:
    """How one unit ended: its commit marker, or the error it failed with after its retries."""

    url: str
    marker: dict[str, Any] | None = None
    error: str | None = None

    @property
    def unit(self) -> str:
        return unit_name(self.url)


@dataclass(frozen=True)
class _Pending:
    """A unit waiting for a worker: ``attempt`` counts its failures so far; ``alone`` asks for a worker running
    nothing else (after an actor died holding several units, each is retried alone to find the one that kills it);
    ``not_before`` is the monotonic time its retry's backoff ends; ``fresh``: nothing of it exists in the output (its
    first dispatch only: an attempt that ran may have left parts)."""

    url: str
    attempt: int = 0
    alone: bool = False
    not_before: float = 0.0
    fresh: bool = False


class UnitSchedule:
    """A pool's books for one run: the units waiting (in order, each with its attempt and backoff), the units
    running and on which worker, the workers' loads, and the retry policy. The pools' loops talk to workers; this
    decides what runs where, and when a failed unit runs again.

    Args:
        urls: The units to run, in order.
        workers: The workers (any hashable handles: Ray actors, :class:`UnitWorker`).
        per_worker: Units a worker holds at once.
        max_retries: Extra attempts of a unit that failed.
        backoff_s: The first retry's wait; each next one waits twice as long.
        fresh: The units the resume found nothing of: their first dispatch starts them fresh.
    """

    def __init__(
        self,
        urls: list[str],
        workers: list[Any],
        per_worker: int,
        *,
        max_retries: int,
        backoff_s: float,
        fresh: Collection[str] = (),
    ) -> None:
        self.per_worker = per_worker
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self._queue = deque(_Pending(url, fresh=unit_name(url) in fresh) for url in urls)
        self._running: dict[Any, tuple[Any, _Pending]] = {}  # a running unit's handle -> its worker, the unit
        self._load = dict.fromkeys(workers, 0)

    @property
    def active(self) -> bool:
        """Units wait or run."""
        return bool(self._queue or self._running)

    @property
    def waiting(self) -> bool:
        return bool(self._queue)

    @property
    def running(self) -> list[Any]:
        """The handles of the running units."""
        return list(self._running)

    def next(self) -> tuple[Any, _Pending] | None:
        """The next unit to start and the least loaded worker with room for it, or None. A unit in its backoff
        lets the ones behind it pass; a unit retried alone takes a worker running nothing else, and a worker
        running such a unit takes no other. Call :meth:`started` with its handle."""
        now = time.monotonic()
        isolating = {worker for worker, unit in self._running.values() if unit.alone}
        for unit in self._queue:
            if unit.not_before > now:
                continue
            room = 1 if unit.alone else self.per_worker
            free = [w for w, load in self._load.items() if load < room and w not in isolating]
            if not free:
                return None  # the first unit ready waits for a worker; none overtakes it
            self._queue.remove(unit)
            return min(free, key=self._load.__getitem__), unit
        return None

    def started(self, handle: Any, worker: Any, unit: _Pending) -> None:
        self._running[handle] = (worker, unit)
        self._load[worker] += 1

    def finished(self, handle: Any) -> tuple[Any, _Pending]:
        """The worker and unit of a handle that reported."""
        worker, unit = self._running.pop(handle)
        if worker in self._load:
            self._load[worker] -= 1
        return worker, unit

    def retry(self, unit: _Pending, error: str) -> UnitOutcome | None:
        """Queue a failed unit's next attempt after its backoff; after its last attempt, its outcome."""
        if unit.attempt < self.max_retries:
            wait_s = self.backoff_s * 2**unit.attempt
            self._queue.append(_Pending(unit.url, unit.attempt + 1, not_before=time.monotonic() + wait_s))
            return None
        attempts = unit.attempt + 1
        return UnitOutcome(unit.url, error=error if attempts == 1 else f"{error} (after {attempts} attempts)")

    def requeue(self, unit: _Pending, *, alone: bool = False) -> None:
        """Put a unit that failed through no fault of its own first in the queue, with no attempt charged."""
        self._queue.appendleft(replace(unit, alone=alone, not_before=0.0, fresh=False))

    def holding(self) -> dict[Any, set[str]]:
        """Each worker running units, and their names."""
        held: dict[Any, set[str]] = {}
        for worker, unit in self._running.values():
            held.setdefault(worker, set()).add(unit_name(unit.url))
        return held

    def units_on(self, worker: Any) -> list[_Pending]:
        return [unit for w, unit in self._running.values() if w is worker]

    def retire(self, worker: Any) -> None:
        """Take a worker out (it died): it gets no more units; those it ran still report (done, or dead)."""
        self._load.pop(worker, None)

    def take_units(self, worker: Any) -> list[_Pending]:
        """The units a worker was running, which no longer count as running (their handles are abandoned)."""
        held = [handle for handle, (w, _) in self._running.items() if w is worker]
        return [self._running.pop(handle)[1] for handle in held]

    def add_worker(self, worker: Any) -> None:
        self._load[worker] = 0

    def seconds_to_next(self) -> float:
        """Until the first waiting unit's backoff ends (0 when one is ready)."""
        now = time.monotonic()
        return max(0.0, min((unit.not_before - now for unit in self._queue), default=0.0))


class StallWatch:
    """When to look for stalled units (every ``min(timeout / 3, 10)`` s), which are stalled, and the warnings
    on the way: "no progress on unit X for N s" once a third, then two thirds of the timeout passed."""

    def __init__(self, timeout_s: float | None) -> None:
        self.timeout_s = timeout_s
        self._checked = time.monotonic()
        self._warned: dict[str, int] = {}

    def due(self) -> bool:
        if self.timeout_s is None or time.monotonic() - self._checked < min(self.timeout_s / 3, 10.0):
            return False
        self._checked = time.monotonic()
        return True

    def stalled(self, idle: dict[str, float]) -> set[str]:
        """The units idle for longer than the timeout; warns of those on their way there."""
        assert self.timeout_s is not None
        for unit, seconds in idle.items():
            level = int(3 * seconds / self.timeout_s)  # thirds of the timeout passed
            if 0 < level < 3 and level > self._warned.get(unit, 0):
                self._warned[unit] = level
                _log.warning(
                    "no progress on unit %s for %.0f s (given up after workers.unit_timeout_s=%g s)",
                    unit,
                    seconds,
                    self.timeout_s,
                )
        return {unit for unit, seconds in idle.items() if seconds > self.timeout_s}
