"""The workers a job runs on: one in this process (:class:`LocalPool`) or Ray actors (:class:`RayPool`).

Both run a stage over a list of shard URLs and yield one :class:`UnitOutcome` per unit as units finish, and keep
their books the same way (:class:`~pipeline.runner.schedule.UnitSchedule`): :func:`~pipeline.worker.unit_slots`
units on every worker (``workers.units_in_flight`` take turns on its device, the next one's reading and decoding
overlapping the computation, and ``workers.commits_in_flight`` more commit meanwhile); the units the resume found
nothing of start fresh on their first attempt; a unit that raises, whose worker dies, or that makes no progress
for ``workers.unit_timeout_s``
is retried after a backoff that doubles each time (``workers.retry_backoff_s``), and given up after
``workers.max_retries`` extra attempts. The Ray pool replaces an actor that died or stalled. The local pool runs
each unit in a daemon thread: a stalled unit's thread, blocked in a read that no thread can interrupt, is abandoned
(never waited for, never committing, no obstacle to the process's exit) and the pool goes on with a new worker. An
error raised in an actor reaches the terminal as one line; its full traceback goes to ``OUT/_logs/``. Both pools
stop at their next turn (within a second) when the run's :class:`~pipeline.runner.stops.Stops` asks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Any

from pipeline.config import JobConfig
from pipeline.errors import LeaseLostError, PipelineError, StoreError, one_line
from pipeline.runner.plan import ActorPlan
from pipeline.runner.schedule import StallWatch, UnitOutcome, UnitSchedule
from pipeline.runner.stops import Stops
from pipeline.store.lease import Fence
from pipeline.store.output import JOB_FILE, job_output
from pipeline.store.units import unit_name
from pipeline.worker import UnitWorker, unit_slots

__all__ = ["LocalPool", "RayPool", "UnitOutcome"]

_log = logging.getLogger(__name__)


def _in_daemon_thread(name: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
    """``function`` run in a new daemon thread: a thread blocked for ever does not keep the process alive."""
    future: Future = Future()

    def target() -> None:
        future.set_running_or_notify_cancel()
        try:
            future.set_result(function(*args, **kwargs))
        except BaseException as e:  # handed to the pool, which decides
            future.set_exception(e)

    threading.Thread(target=target, name=name, daemon=True).start()
    return future


class LocalPool:
    """Every unit in this process, on one worker (the model loaded once, on first use), :func:`~pipeline.worker.
    unit_slots` units at a time as a Ray actor holds them, each in a daemon thread; a unit that raises is
    retried, then fails alone, and the job goes on.

    Args:
        job: The validated job.
        fault: ``UNIT:BATCHES`` test hook.
        worker: The worker to use (default: built on first use).
        fence: The driver's lease, checked by every commit.
        stops: The run's stops, checked every turn.
    """

    actors = 1

    def __init__(
        self,
        job: JobConfig,
        fault: str | None = None,
        *,
        worker: UnitWorker | None = None,
        fence: Fence | None = None,
        stops: Stops | None = None,
    ) -> None:
        self.job = job
        self.fault = fault
        self.fence = fence
        self.restarts = 0
        self._stops = stops
        self._worker = worker  # built on first use unless given

    def run(self, stage: str, urls: list[str], fresh: Collection[str] = ()) -> Iterator[UnitOutcome]:
        """Run ``stage`` over the units of ``urls``; the units named in ``fresh`` have nothing in the output yet."""
        if not urls:
            return
        if self._worker is None:
            self._worker = self._new_worker()
        workers = self.job.workers
        schedule = UnitSchedule(
            urls,
            [self._worker],
            unit_slots(self.job, self._worker.device),
            max_retries=workers.max_retries,
            backoff_s=workers.retry_backoff_s,
            fresh=fresh,
        )
        watch = StallWatch(workers.unit_timeout_s)
        try:
            while schedule.active:
                while (slot := schedule.next()) is not None:
                    worker, unit = slot
                    name = f"unit-{unit_name(unit.url)}"
                    attempt = dict(attempt=unit.attempt, fresh=unit.fresh)
                    schedule.started(_in_daemon_thread(name, worker.run, stage, unit.url, **attempt), *slot)
                done = _wait_futures(schedule)
                if self._stops is not None:
                    self._stops.check()
                for future in done:
                    yield from self._settle(schedule, future)
                if schedule.running and watch.due():
                    yield from self._cancel_stalled(schedule, watch)
        finally:
            for worker, names in schedule.holding().items():  # left early: nothing of this run commits later
                worker.abandon(names)

    def _settle(self, schedule: UnitSchedule, future: Future) -> Iterator[UnitOutcome]:
        _, unit = schedule.finished(future)
        try:
            marker = future.result()
        except LeaseLostError:
            raise
        except PipelineError as e:
            error = str(e)
        except Exception as e:  # a full disk, a bug: the unit fails as on a Ray actor, the job goes on
            _log.debug("unit %s failed", unit_name(unit.url), exc_info=True)
            error = one_line(e, with_type=True)
        else:
            yield UnitOutcome(unit.url, marker)
            return
        _log.warning("unit %s attempt %d failed: %s", unit_name(unit.url), unit.attempt, error)
        if (outcome := schedule.retry(unit, error)) is not None:
            yield outcome

    def _cancel_stalled(self, schedule: UnitSchedule, watch: StallWatch) -> Iterator[UnitOutcome]:
        """Give up on units without progress for ``unit_timeout_s``: their threads are abandoned with the worker
        they block (its device lock), and the others go on on a new worker."""
        worker = self._worker
        stalled = watch.stalled(worker.idle_seconds()) if worker is not None else set()
        if not stalled:
            return
        self.restarts += 1
        schedule.retire(worker)
        held = schedule.take_units(worker)
        worker.abandon({unit_name(unit.url) for unit in held})
        self._worker = None
        for unit in held:
            if unit_name(unit.url) not in stalled:
                schedule.requeue(unit)  # waiting for the device the stalled unit holds: no fault of its own
                continue
            error = f"no progress for {watch.timeout_s:g} s (workers.unit_timeout_s): abandoned"
            _log.warning("unit %s attempt %d: %s (its thread stays blocked)", unit_name(unit.url), unit.attempt, error)
            if (outcome := schedule.retry(unit, error)) is not None:
                yield outcome
        if schedule.waiting:
            self._worker = self._new_worker()
            schedule.add_worker(self._worker)

    def _new_worker(self) -> UnitWorker:
        return UnitWorker(self.job, fault=self.fault, fence=self.fence)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()

    def __enter__(self) -> LocalPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _wait_futures(schedule: UnitSchedule) -> set[Future]:
    """The running units' futures that are done, after waiting at most a second (or the first backoff)."""
    if not schedule.running:
        time.sleep(min(1.0, schedule.seconds_to_next()))
        return set()
    done, _ = wait(schedule.running, timeout=1.0, return_when=FIRST_COMPLETED)
    return done


def _unit_actor_class():
    import ray

    @ray.remote(max_restarts=0, max_task_retries=0, concurrency_groups={"monitor": 1})
    class UnitActor:
        """A Ray actor holding one :class:`UnitWorker` (the model loaded once); started with max_concurrency set to
        the units it holds at once, which share its device in turns (UnitWorker.run)."""

        def __init__(
            self, job: dict[str, Any], device: str, fault: str | None, threads: int, fence: Fence | None
        ) -> None:
            import torch

            if device == "cpu":
                torch.set_num_threads(threads)
            config = JobConfig.model_validate(job)
            _check_output_is_shared(config)
            self.worker = UnitWorker(config, device, fault=fault, fence=fence)

        def ready(self) -> int:
            return os.getpid()

        def process(self, stage: str, url: str, attempt: int, fresh: bool = False) -> dict[str, Any]:
            return self.worker.run(stage, url, attempt=attempt, fresh=fresh)

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


def _root_cause(error: BaseException) -> BaseException:
    """The exception raised in an actor, out of Ray's wrappers."""
    cause = getattr(error, "cause", None) or error
    while getattr(cause, "cause", None) is not None and cause.cause is not cause:
        cause = cause.cause
    return cause


def actor_error(error: BaseException) -> str:
    """The error raised in an actor, as one line: the original exception's type and first line (Ray wraps it, with
    the actor's traceback in its text)."""
    cause = _root_cause(error)
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
        fence: The driver's lease, checked by every actor's commits (they run on while the driver is paused).
        stops: The run's stops: signals are deferred inside Ray's waits and raised at the pool's next turn.
    """

    def __init__(
        self,
        job: JobConfig,
        plan: ActorPlan,
        fault: str | None = None,
        *,
        fence: Fence | None = None,
        stops: Stops | None = None,
    ) -> None:
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
        self._fence = fence
        self._stops = stops
        self._per_actor = unit_slots(job, self._device)
        self._live: list[Any] = []
        self._logs = job_output(job)

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
        return self._class.options(**options).remote(self._job_dict, self._device, self._fault, threads, self._fence)

    def _deferred(self) -> contextlib.AbstractContextManager:
        """Signals wait for the next turn: an exception raised inside Ray's compiled wait would be mangled."""
        return self._stops.deferred() if self._stops is not None else contextlib.nullcontext()

    def _check_stops(self) -> None:
        if self._stops is not None:
            self._stops.check()

    def _wait_ready(self, actors: list) -> None:
        from ray.exceptions import RayActorError, RayTaskError

        timeout = self.job.workers.actor_start_timeout_s
        deadline = time.monotonic() + timeout
        refs = [a.ready.remote() for a in actors]
        with self._deferred():
            while True:
                ready, waiting = self._ray.wait(refs, num_returns=len(refs), timeout=1.0)
                self._check_stops()
                try:
                    self._ray.get(ready)
                except (RayActorError, RayTaskError) as e:
                    raise PipelineError(f"a worker failed to start: {actor_error(e)}") from None
                if not waiting:
                    return
                if time.monotonic() >= deadline:
                    raise PipelineError(
                        f"actors did not start within workers.actor_start_timeout_s={timeout:g} s (each asks for "
                        f"{self.plan.num_gpus} GPU and {self.plan.num_cpus} CPU; cluster has "
                        f"{self._ray.cluster_resources()})"
                    )

    def _record(self, unit: str, attempt: int, text: str) -> None:
        """The full text of an attempt's error (an actor's traceback), under ``OUT/_logs/``."""
        path = self._logs.path("_logs", f"{unit}.attempt{attempt}.txt")
        try:
            self._logs.put_atomic(path, text.encode())
        except PipelineError:
            _log.debug("could not write %s", path)

    def run(self, stage: str, urls: list[str], fresh: Collection[str] = ()) -> Iterator[UnitOutcome]:
        """Run ``stage`` over the units of ``urls``; the units named in ``fresh`` have nothing in the output yet
        (their first dispatch starts them fresh; a later one, after a death or a cancellation, clears first)."""
        workers = self.job.workers
        schedule = UnitSchedule(
            urls,
            self._live,
            self._per_actor,
            max_retries=workers.max_retries,
            backoff_s=workers.retry_backoff_s,
            fresh=fresh,
        )
        watch = StallWatch(workers.unit_timeout_s)
        died_with: dict[Any, int] = {}  # a dead actor -> the units it was running when it died
        with self._deferred():
            while schedule.active:
                while (slot := schedule.next()) is not None:
                    actor, unit = slot
                    schedule.started(actor.process.remote(stage, unit.url, unit.attempt, unit.fresh), actor, unit)
                if schedule.running:
                    ready, _ = self._ray.wait(schedule.running, num_returns=1, timeout=1.0)
                else:
                    ready = []
                    time.sleep(min(1.0, schedule.seconds_to_next()))
                self._check_stops()
                for ref in ready:
                    yield from self._settle(schedule, ref, died_with)
                if schedule.running and watch.due():
                    yield from self._cancel_stalled(schedule, watch.timeout_s)

    def _settle(self, schedule: UnitSchedule, ref: Any, died_with: dict[Any, int]) -> Iterator[UnitOutcome]:
        from ray.exceptions import RayActorError, RayTaskError

        actor, unit = schedule.finished(ref)
        try:
            marker = self._ray.get(ref)
        except RayActorError as e:
            if actor not in died_with:  # the first of its units to report: replace the actor once
                _log.warning("a worker died while running %s (attempt %d): replacing it", unit.url, unit.attempt)
                died_with[actor] = 1 + len(schedule.units_on(actor))
                self._replace(schedule, actor)
            if died_with[actor] > 1:  # which of its units killed it is unknown: each retries alone, uncharged
                schedule.requeue(unit, alone=True)
                return
            error = f"worker died: {actor_error(e)}"
        except RayTaskError as e:
            if isinstance(cause := _root_cause(e), LeaseLostError):
                raise LeaseLostError(str(cause)) from None
            error = actor_error(e)
            self._record(unit_name(unit.url), unit.attempt, str(e))
            _log.warning("unit %s attempt %d failed: %s", unit_name(unit.url), unit.attempt, error)
        else:
            yield UnitOutcome(unit.url, marker)
            return
        if (outcome := schedule.retry(unit, error)) is not None:
            yield outcome

    def _cancel_stalled(self, schedule: UnitSchedule, timeout: float) -> Iterator[UnitOutcome]:
        """Cancel the units without progress for ``timeout`` s with their actors; the actors' other units are
        queued again, uncharged."""
        for actor, stalled in self._stalled(schedule.holding(), timeout):
            _log.warning("cancelling %s: no progress for %g s; replacing its worker", stalled, timeout)
            held = schedule.take_units(actor)
            self._replace(schedule, actor)
            for unit in held:
                if unit_name(unit.url) not in stalled:
                    schedule.requeue(unit)  # cancelled with its actor through no fault of its own
                    continue
                error = f"no progress for {timeout:g} s (workers.unit_timeout_s): cancelled"
                self._record(unit_name(unit.url), unit.attempt, error)
                if (outcome := schedule.retry(unit, error)) is not None:
                    yield outcome

    def _replace(self, schedule: UnitSchedule, actor: Any) -> None:
        """Kill ``actor`` and start another in its place."""
        self.restarts += 1
        schedule.retire(actor)
        self._live.remove(actor)
        self._ray.kill(actor, no_restart=True)
        replacement = self._start()
        self._wait_ready([replacement])
        self._live.append(replacement)
        schedule.add_worker(replacement)

    def _stalled(self, holding: dict[Any, set[str]], timeout: float) -> list[tuple[Any, set[str]]]:
        """Actors with units that made no progress for ``timeout`` s, and those units (all of an actor's units
        when it does not answer)."""
        from ray.exceptions import GetTimeoutError, RayActorError

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
