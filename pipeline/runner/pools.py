"""The workers a job runs on: one in this process (:class:`LocalPool`) or Ray actors (:class:`RayPool`).

Both run a stage over a list of shard URLs and yield one :class:`UnitOutcome` per unit as units finish. The Ray
pool keeps ``workers.units_in_flight`` units on every actor (two on a GPU, one on the CPU): they take turns on its
device, so one unit's commit and the next one's reading and decoding overlap the computation. When an actor dies
its units go back to the queue and a new actor takes its place; a unit that keeps failing (its actor dies or it
raises) is given up after ``workers.max_retries`` extra attempts. An error raised in an actor reaches the
terminal as one line; its full traceback goes to ``OUT/_logs/``.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pipeline.config import JobConfig
from pipeline.errors import JobTerminated, PipelineError, StoreError, one_line
from pipeline.runner.plan import ActorPlan
from pipeline.store.output import JOB_FILE, job_output
from pipeline.store.units import unit_name
from pipeline.worker import UnitWorker, units_in_flight

__all__ = ["LocalPool", "RayPool", "UnitOutcome"]

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


class LocalPool:
    """Every unit in this process, on one worker (the model loaded once, on first use), :func:`~pipeline.worker.
    units_in_flight` units at a time as a Ray actor holds them; a unit that raises fails alone, the job goes on."""

    actors = 1
    restarts = 0

    def __init__(self, job: JobConfig, fault: str | None = None, *, worker: UnitWorker | None = None) -> None:
        self.job = job
        self.fault = fault
        self._worker = worker  # built on first use unless given

    def run(self, stage: str, urls: list[str]) -> Iterator[UnitOutcome]:
        if not urls:
            return
        if self._worker is None:
            self._worker = UnitWorker(self.job, fault=self.fault)
        worker = self._worker
        pool = ThreadPoolExecutor(units_in_flight(self.job, worker.device), thread_name_prefix="unit")
        futures = deque((url, pool.submit(worker.run, stage, url)) for url in urls)
        finished = False
        try:
            while futures:
                url, future = futures.popleft()
                try:
                    yield UnitOutcome(url, future.result())
                except PipelineError as e:
                    yield UnitOutcome(url, error=str(e))
                except Exception as e:  # a full disk, a bug: the unit fails as on a Ray actor, the job goes on
                    _log.debug("unit %s failed", unit_name(url), exc_info=True)
                    yield UnitOutcome(url, error=one_line(e, with_type=True))
            finished = True
        finally:
            # Left early (an interrupt): queued units are cancelled; a running one may be blocked in a read that
            # never returns, so it is not waited for.
            pool.shutdown(wait=finished, cancel_futures=True)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()

    def __enter__(self) -> LocalPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class _Pending:
    """A unit waiting for an actor: ``attempt`` counts its failures so far; ``alone`` asks for an actor running
    nothing else (after an actor died holding several units, each is retried alone to find the one that kills it)."""

    url: str
    attempt: int = 0
    alone: bool = False


def _unit_actor_class():
    import ray

    @ray.remote(max_restarts=0, max_task_retries=0, concurrency_groups={"monitor": 1})
    class UnitActor:
        """A Ray actor holding one :class:`UnitWorker` (the model loaded once); started with max_concurrency set to
        the units it holds at once, which share its device in turns (UnitWorker.run)."""

        def __init__(self, job: dict[str, Any], device: str, fault: str | None, threads: int) -> None:
            import torch

            if device == "cpu":
                torch.set_num_threads(threads)
            config = JobConfig.model_validate(job)
            _check_output_is_shared(config)
            self.worker = UnitWorker(config, device, fault=fault)

        def ready(self) -> int:
            return os.getpid()

        def process(self, stage: str, url: str, attempt: int) -> dict[str, Any]:
            return self.worker.run(stage, url, attempt=attempt)

        @ray.method(concurrency_group="monitor")  # answers while every unit thread is busy (or hung)
        def stalled_units(self, timeout_s: float) -> list[str]:
            return self.worker.stalled_units(timeout_s)

    return UnitActor


def _check_output_is_shared(job: JobConfig) -> None:
    """In an actor: the driver wrote ``job.json`` to the output before starting actors; not seeing it means the
    output is a folder local to the driver's node (or ``memory://``), where this worker's results would be lost."""
    import ray

    output = job_output(job)
    if not output.exists(output.path(JOB_FILE)):
        raise StoreError(
            f"output.path {job.output.path} is not shared with the worker on node {ray.util.get_node_ip_address()}: "
            f"the driver's {JOB_FILE} is not there; use a file system every node mounts, or an object store"
        )


def actor_error(error: BaseException) -> str:
    """The error raised in an actor, as one line: the original exception's type and first line (Ray wraps it, with
    the actor's traceback in its text)."""
    cause = getattr(error, "cause", None) or error
    while getattr(cause, "cause", None) is not None and cause.cause is not cause:
        cause = cause.cause
    text = str(cause).strip()
    if type(cause).__name__ in ("RayTaskError", "ActorDiedError", "RayActorError") or "Traceback" in text:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return next((line for line in reversed(lines) if ":" in line and not line.startswith("File ")), lines[-1])
    return one_line(cause, with_type=True)


class RayPool:
    """Ray actors on the cluster ``ray.init`` joined: started on entry, killed on exit.

    Args:
        job: The validated job.
        plan: How many actors, with which resources.
        fault: ``UNIT:BATCHES`` test hook passed to every worker.
    """

    def __init__(self, job: JobConfig, plan: ActorPlan, fault: str | None = None) -> None:
        import ray

        self.job = job
        self.plan = plan
        self.actors = plan.count
        self.restarts = 0
        self._ray = ray
        self._class = _unit_actor_class()
        self._device = "cuda" if plan.num_gpus else "cpu"
        self._job_dict = job.model_dump(mode="json", by_alias=True)
        self._fault = fault
        self._per_actor = units_in_flight(job, self._device)
        self._live: list[Any] = []
        self._logs = job_output(job)
        self._stop_reason: str | None = None

    def stop(self, reason: str) -> None:
        """Ask :meth:`run` to raise :class:`~pipeline.errors.JobTerminated` at its next turn (signal-safe)."""
        self._stop_reason = reason

    def __enter__(self) -> RayPool:
        self._live = [self._start() for _ in range(self.plan.count)]
        self._wait_ready(self._live)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for actor in self._live:
            self._ray.kill(actor, no_restart=True)
        self._live = []

    def _start(self) -> Any:
        options = dict(num_gpus=self.plan.num_gpus, num_cpus=self.plan.num_cpus, max_concurrency=self._per_actor)
        threads = max(1, int(self.plan.num_cpus))
        return self._class.options(**options).remote(self._job_dict, self._device, self._fault, threads)

    def _wait_ready(self, actors: list) -> None:
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        timeout = self.job.workers.actor_start_timeout_s
        try:
            self._ray.get([a.ready.remote() for a in actors], timeout=timeout)
        except GetTimeoutError:
            raise PipelineError(
                f"actors did not start within workers.actor_start_timeout_s={timeout} s (each asks for "
                f"{self.plan.num_gpus} GPU and {self.plan.num_cpus} CPU; cluster has "
                f"{self._ray.cluster_resources()})"
            ) from None
        except (RayActorError, RayTaskError) as e:
            raise PipelineError(f"a worker failed to start: {actor_error(e)}") from None

    def _record(self, unit: str, attempt: int, text: str) -> None:
        """The full text of an attempt's error (an actor's traceback), under ``OUT/_logs/``."""
        path = self._logs.path("_logs", f"{unit}.attempt{attempt}.txt")
        try:
            self._logs.put_atomic(path, text.encode())
        except PipelineError:
            _log.debug("could not write %s", path)

    def run(self, stage: str, urls: list[str]) -> Iterator[UnitOutcome]:
        from ray.exceptions import RayActorError, RayTaskError

        ray = self._ray
        load = dict.fromkeys(self._live, 0)  # units in flight per live actor
        died_with: dict[Any, int] = {}  # dead actor -> units it held when it died
        queue = deque(_Pending(url) for url in urls)
        running: dict[Any, tuple[Any, _Pending]] = {}

        def dispatch() -> None:
            while queue:
                unit = queue[0]
                isolating = {a for a, u in running.values() if u.alone}  # actors running a unit alone take no other
                room = 1 if unit.alone else self._per_actor
                open_actors = [a for a in self._live if load[a] + 1 <= room and a not in isolating]
                if not open_actors:
                    return
                actor = min(open_actors, key=load.__getitem__)
                queue.popleft()
                load[actor] += 1
                running[actor.process.remote(stage, unit.url, unit.attempt)] = (actor, unit)

        def settle(unit: _Pending, error: str) -> UnitOutcome | None:
            """Queue a failed unit's next attempt; after its last one, its outcome."""
            if unit.attempt < self.job.workers.max_retries:
                queue.append(_Pending(unit.url, unit.attempt + 1))
                return None
            return UnitOutcome(unit.url, error=f"{error} (after {unit.attempt + 1} attempts)")

        timeout = self.job.workers.unit_timeout_s
        checked = time.monotonic()
        while queue or running:
            dispatch()
            ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            if self._stop_reason is not None:
                raise JobTerminated(self._stop_reason)
            for ref in ready:
                actor, unit = running.pop(ref)
                try:
                    marker = ray.get(ref)
                except RayActorError as e:
                    if actor not in died_with:  # the first of its units to report: replace the actor once
                        _log.warning(
                            "a worker died while running %s (attempt %d): replacing it", unit.url, unit.attempt
                        )
                        died_with[actor] = self._replace(actor, load)
                    if died_with[actor] > 1:  # which of its units killed it is unknown: each retries alone, free
                        queue.appendleft(_Pending(unit.url, unit.attempt, alone=True))
                        continue
                    error = f"worker died: {actor_error(e)}"
                except RayTaskError as e:
                    error = actor_error(e)
                    self._record(unit_name(unit.url), unit.attempt, str(e))
                    _log.warning("unit %s attempt %d failed: %s", unit_name(unit.url), unit.attempt, error)
                else:
                    error = None
                if actor in load:
                    load[actor] -= 1
                if error is None:
                    yield UnitOutcome(unit.url, marker)
                elif (outcome := settle(unit, error)) is not None:
                    yield outcome
            if timeout is not None and running and time.monotonic() - checked >= min(timeout / 3, 10.0):
                checked = time.monotonic()
                for actor, stalled in self._stalled(running, timeout):
                    _log.warning("cancelling %s: no progress for %g s; replacing its worker", stalled, timeout)
                    for ref, (holder, unit) in list(running.items()):
                        if holder is not actor:
                            continue
                        del running[ref]
                        if unit_name(unit.url) not in stalled:
                            queue.appendleft(unit)  # cancelled with its actor through no fault of its own
                            continue
                        error = f"no progress for {timeout:g} s (workers.unit_timeout_s): cancelled"
                        self._record(unit_name(unit.url), unit.attempt, error)
                        if (outcome := settle(unit, error)) is not None:
                            yield outcome
                    self._replace(actor, load)

    def _replace(self, actor: Any, load: dict[Any, int]) -> int:
        """Kill ``actor`` and start another in its place; returns how many units it held."""
        self.restarts += 1
        held = load.pop(actor, 0)
        self._live.remove(actor)
        self._ray.kill(actor, no_restart=True)
        replacement = self._start()
        self._wait_ready([replacement])
        self._live.append(replacement)
        load[replacement] = 0
        return held

    def _stalled(self, running: dict[Any, tuple[Any, _Pending]], timeout: float) -> list[tuple[Any, set[str]]]:
        """Actors with units that made no progress for ``timeout`` s, and those units (all of an actor's units
        when it does not answer)."""
        from ray.exceptions import GetTimeoutError, RayActorError

        holding: dict[Any, set[str]] = {}
        for actor, unit in running.values():
            holding.setdefault(actor, set()).add(unit_name(unit.url))
        queries = {actor: actor.stalled_units.remote(timeout) for actor in holding}
        result = []
        for actor, ref in queries.items():
            try:
                stalled = set(self._ray.get(ref, timeout=max(timeout, 30.0)))
            except GetTimeoutError:
                stalled = holding[actor]
            except RayActorError:
                continue  # a dead actor: its units report the death
            if stalled & holding[actor]:
                result.append((actor, stalled & holding[actor]))
        return result
