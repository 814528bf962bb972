"""One worker: a device, a model, and the loop that runs a stage over one unit of work at a time.

Per unit: stream the shard -> decode (ahead, in a prefetch thread) -> ``stage.compute`` on the device -> one
packed copy of the typed result to the host -> ``sink.write`` (in a writer thread) -> ``sink.commit``. A Ray actor
wraps one worker; the single-process path of the runner uses one directly. Units run in threads (:func:`unit_slots`
of them): ``workers.units_in_flight`` read and compute, taking turns on the device (on a GPU the next unit's
reading and decoding overlap the computation), and up to ``workers.commits_in_flight`` more commit meanwhile,
each holding its results until its data is written: a worker waits on storage only when that many are committing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.config import JobConfig
from pipeline.data.decode import DecodedBatch, DecodedSample, Preprocess, batches, decode_stream
from pipeline.data.identity import MemberDigest, shard_stamp
from pipeline.data.prefetch import Prefetcher
from pipeline.data.stream import iter_shard
from pipeline.engine.transfer import move_tree
from pipeline.errors import DeviceError, ShardError, UnitFailedError, one_line
from pipeline.models import create_job_model, model_data_config
from pipeline.stages import BankStage, ExplainStage, Stage, UnitState
from pipeline.store.lease import Fence
from pipeline.store.output import job_output
from pipeline.store.units import unit_name

__all__ = ["UnitWorker", "commits_in_flight", "resolve_device", "unit_slots", "units_in_flight"]

_log = logging.getLogger(__name__)


def units_in_flight(job: JobConfig, device: torch.device | str) -> int:
    """Units a worker holds at once (``workers.units_in_flight``). ``auto``: on a GPU two, one on the device while
    the other commits or prefetches; on the CPU one, since there the computation uses the cores that the
    overlapped work would need."""
    return _on_device(job.workers.units_in_flight, device, gpu=2, cpu=1)


def commits_in_flight(job: JobConfig) -> int:
    """Units a worker commits at once while computing the next (``workers.commits_in_flight``). ``auto``: two on an
    object store, where a commit waits on round trips more than it computes; one on a file system."""
    value = job.workers.commits_in_flight
    if value != "auto":
        return int(value)
    return 1 if job_output(job).is_local else 2


def unit_slots(job: JobConfig, device: torch.device | str) -> int:
    """Units a worker runs at once, in as many threads: those reading and computing, and those committing."""
    return units_in_flight(job, device) + commits_in_flight(job)


def _on_device(value: int | str, device: torch.device | str, *, gpu: int, cpu: int) -> int:
    """A job's ``auto``-or-number setting: the number, or its ``auto`` value on this device."""
    if value != "auto":
        return int(value)
    return gpu if torch.device(device).type == "cuda" else cpu


def resolve_device(device: str | torch.device) -> torch.device:
    """The device a worker runs on: ``auto`` is a GPU where this process sees one, else the CPU.

    Raises:
        DeviceError: an explicit ``cuda`` where this process sees no GPU, or a GPU it cannot use (named with the
            node and the reason, in one line).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type != "cuda":
        return device
    node = socket.gethostname()
    if not torch.cuda.is_available():
        raise DeviceError(f"node {node}: the job asks for device 'cuda', and this process sees no usable GPU")
    try:
        torch.zeros(1, device=device).sum().item()
    except (RuntimeError, AssertionError) as e:
        raise DeviceError(f"node {node}: GPU {device} cannot be used: {one_line(e)}") from None
    return device


@dataclass
class _Fault:
    """Test hook: kill this process (as a crash would) after ``batches`` batches of ``unit``'s first attempt."""

    unit: str
    batches: int

    @classmethod
    def parse(cls, spec: str | None) -> _Fault | None:
        if not spec:
            return None
        unit, _, count = spec.rpartition(":")
        return cls(unit, int(count))


class UnitWorker:
    """Runs the stages of one job on one device; holds the model, the preprocessing, the device lock and the
    prefetching.

    Args:
        job: The validated job.
        device: Where to run; default from the job (``auto``: a GPU when this process sees one).
        fault: ``UNIT:BATCHES`` test hook that kills the process mid-unit on its first attempt.
        fence: The driver's lease: every unit checks it before it removes or commits anything (None: unfenced).

    Raises:
        DeviceError: the device cannot be used.
        CheckpointError: the model cannot be built or its checkpoint does not fit.
    """

    def __init__(
        self,
        job: JobConfig,
        device: str | torch.device | None = None,
        *,
        fault: str | None = None,
        fence: Fence | None = None,
    ) -> None:
        self.job = job
        self.fence = fence
        self.device = resolve_device(job.device if device is None else device)
        torch.manual_seed(job.seed)
        self.model = create_job_model(job.model).to(self.device)
        self.preprocess = Preprocess.from_data_config(model_data_config(self.model), job.data.preprocess)
        self.stages: dict[str, Stage] = {"explain": ExplainStage(job, self.model, self.device, self.preprocess.size)}
        if job.mode == "self-supervised":
            self.stages["bank"] = BankStage(job, self.model, self.device, self.model.num_features)
        self._fault = _Fault.parse(fault)
        self._writer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unit-writer")
        self._device_lock = threading.Lock()  # one unit computes at a time; commits and prefetching overlap it
        self._computing = threading.Semaphore(units_in_flight(job, self.device))  # units reading and computing
        commits = commits_in_flight(job)
        self._committing = threading.Semaphore(commits) if commits else None  # units committing beside them
        self._prefetch_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._progress: dict[str, float] = {}  # unit holding the device -> monotonic time of its last progress
        self._abandoned: set[str] = set()  # units given up on while their thread was blocked: never committed

    def run(self, stage: str, url: str, *, attempt: int = 0, fresh: bool = False) -> dict[str, Any]:
        """Run ``stage`` (``explain`` or ``bank``) over every sample of the shard at ``url`` and commit the unit.

        Reading and decoding start once one of ``workers.units_in_flight`` places is free; the computation waits
        until the device is free; the commit (durable data, then the marker) runs after the device is released,
        in one of ``workers.commits_in_flight`` places, and frees the unit's place for the next unit. Safe to call
        from :func:`unit_slots` threads at once.

        Args:
            stage: The stage's name.
            url: The unit's shard.
            attempt: How many attempts of this unit failed before.
            fresh: Nothing of the unit exists in the output yet (the driver's listing found nothing of it): the
                unit removes nothing (:class:`~pipeline.store.units.UnitTransaction`).

        Returns:
            The commit marker: counts of samples, ok and failed, timings (``seconds``: holding the device;
            ``wait_seconds``: waiting for it), the shard's identity (``input``, :mod:`pipeline.data.identity`), the
            driver's lease generation. A unit whose shard ended early (missing, unreadable, truncated) is committed
            as incomplete, with the samples read before (``complete: false``, ``incomplete``: why).

        Raises:
            UnitFailedError: more samples failed than the job's error policy allows, or the unit was abandoned
                (:meth:`abandon`) while its thread was blocked.
            LeaseLostError: the driver's lease was taken by another driver: nothing more is written.
        """
        runner = self.stages[stage]
        unit = unit_name(url)
        self._computing.acquire()
        try:
            arrived = time.perf_counter()
            stamp, members = shard_stamp(url), MemberDigest()
            with self.prefetch_batches(url, runner, members=members) as ready:
                state = runner.open_unit(unit, url, fresh=fresh, fence=self.fence)
                with self._device_lock:
                    self._check_abandoned(unit)
                    start = time.perf_counter()
                    self._progress[unit] = time.monotonic()
                    try:
                        compute_s, shard_error = self._compute_unit(runner, state, unit, ready, attempt)
                    finally:
                        self._progress.pop(unit, None)
                    seconds = time.perf_counter() - start
            sink = state.sink
            total = sink.failed + sink.ok
            if total and sink.failed / total > self.job.errors.max_failed_fraction:
                raise UnitFailedError(
                    f"unit {unit}: {sink.failed} of {total} samples failed, more than errors.max_failed_fraction="
                    f"{self.job.errors.max_failed_fraction}"
                )
            summary = dict(
                url=url,
                attempt=attempt,
                seconds=seconds,
                wait_seconds=start - arrived,
                compute_seconds=compute_s,
                device=str(self.device),
            )
            if stamp is not None and shard_error is None:
                summary["input"] = {**stamp, "members": members.hexdigest()}
            self._check_abandoned(unit)
            if self._committing is None:  # commits_in_flight 0: the next unit starts after this commit
                return sink.commit(summary, incomplete=shard_error)
            self._committing.acquire()  # waits only while every commit place is taken: the bound on memory held
        finally:
            self._computing.release()  # the next unit may start reading and computing
        try:
            return sink.commit(summary, incomplete=shard_error)
        finally:
            self._committing.release()

    def process_unit(self, url: str, *, attempt: int = 0) -> dict[str, Any]:
        """Explain one unit: :meth:`run` of the explain stage."""
        return self.run("explain", url, attempt=attempt)

    def _compute_unit(
        self, stage: Stage, state: UnitState, unit: str, ready: Iterator[DecodedBatch], attempt: int
    ) -> tuple[float, str | None]:
        """The unit's batches through the stage, their host results handed to the writer thread; holds the device.

        Returns:
            Seconds of computation, and why the shard ended early (None when it was read to its end).
        """
        shard_error = None
        pending: Future | None = None
        compute_s = 0.0
        try:
            for index, batch in enumerate(ready):
                result = None
                if batch.samples:
                    tick = time.perf_counter()
                    result = move_tree(stage.compute(self.model_input(batch.pixels), batch.samples, state.generator))
                    compute_s += time.perf_counter() - tick
                self._progress[unit] = time.monotonic()
                self._check_abandoned(unit)
                if pending is not None:
                    pending.result()  # at most one batch waits to be written
                pending = self._writer_thread.submit(state.sink.write, batch, result)
                if self._fault and attempt == 0 and unit == self._fault.unit and index + 1 >= self._fault.batches:
                    pending.result()
                    _log.error("fault injection: killing worker %d in unit %s", os.getpid(), unit)
                    os._exit(137)
        except ShardError as e:
            shard_error = str(e)
            _log.warning("%s", e)
        if pending is not None:
            pending.result()
        return compute_s, shard_error

    def stalled_units(self, timeout_s: float) -> list[str]:
        """Units holding the device that have neither read nor computed a batch for ``timeout_s`` seconds (a hung
        shard read, a hung device); units waiting for the device are not stalled."""
        return [unit for unit, idle in self.idle_seconds().items() if idle > timeout_s]

    def idle_seconds(self) -> dict[str, float]:
        """Seconds since each unit holding the device last read or computed a batch."""
        now = time.monotonic()
        return {unit: now - last for unit, last in list(self._progress.items())}

    def abandon(self, units: set[str]) -> None:
        """Give up on units whose threads are blocked (a read that never returns, which no thread can interrupt):
        if one of them ever wakes up, it stops before writing anything more."""
        self._abandoned |= units

    def _check_abandoned(self, unit: str) -> None:
        if unit in self._abandoned:
            raise UnitFailedError(f"unit {unit} was abandoned (no progress for workers.unit_timeout_s)")

    def prefetch_batches(
        self, url: str, stage: Stage | None = None, *, members: MemberDigest | None = None
    ) -> Prefetcher[DecodedBatch]:
        """The unit's batches of good samples, read, decoded and collated, each with the samples that failed
        before it (decoding, or rejected by ``stage``, default the explain stage).

        ``data.prefetch_batches`` batches ahead in a background thread started now (``auto``: two on a GPU; none
        on the CPU, where decoding and the model share the cores). On a GPU, host pixels are pinned for the copy
        and device pixels (the torchvision decoder) are made on a stream of their own. ``members`` is fed the
        shard's member list (its identity). Hand each batch's pixels to
        :meth:`model_input`. A :class:`ShardError` (a missing or truncated shard) comes after the batches of the
        samples read before it. Close the prefetcher (``with``) when leaving early.
        """
        stream = self._prefetch_stream
        stage = stage or self.stages["explain"]

        def produce() -> Iterator[DecodedBatch]:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                for batch in batches(_screen(self._decode(url, members), stage), self.job.batch_size):
                    if stream is not None and batch.pixels is not None:
                        if batch.pixels.device.type == "cpu":
                            batch.pixels = batch.pixels.pin_memory()
                        else:
                            stream.synchronize()  # decoded and collated before the model's stream reads it
                    yield batch

        depth = _on_device(self.job.data.prefetch_batches, self.device, gpu=2, cpu=0)
        return Prefetcher(produce(), depth, name=f"prefetch-{unit_name(url)}")

    def model_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """A prefetched batch's pixels as the model's normalised input on the device."""
        if pixels.device.type == "cuda":  # made on the prefetch stream: keep its memory until this stream is done
            pixels.record_stream(torch.cuda.current_stream(pixels.device))
        return self.preprocess.normalize(pixels.to(self.device, non_blocking=True))

    def _decode(self, url: str, members: MemberDigest | None = None) -> Iterator[DecodedSample]:
        """The unit's samples through the job's decoder: PIL in threads (host pixels), or torchvision in batches
        on the device (device pixels)."""
        data = self.job.data
        samples = iter_shard(url, members=members)
        if data.decoder == "torchvision":
            from pipeline.data.gpu_decode import BatchDecoder, decode_batched

            decoder = BatchDecoder(
                self.preprocess, self.device, max_pixels=data.max_pixels, fallback_threads=data.decode_threads
            )
            return decode_batched(samples, decoder, chunk=self.job.batch_size)
        return decode_stream(
            samples,
            self.preprocess,
            threads=data.decode_threads,
            prefetch=max(self.job.batch_size, 4 * data.decode_threads),
            max_pixels=data.max_pixels,
        )

    def close(self) -> None:
        self._writer_thread.shutdown(wait=True)
        for stage in self.stages.values():
            stage.close()

    def __enter__(self) -> UnitWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _screen(decoded: Iterator[DecodedSample], stage: Stage) -> Iterator[DecodedSample]:
    """Decoded samples, with those the stage rejects turned into failed samples naming why."""
    for sample in decoded:
        if sample.error is None and (reason := stage.reject(sample)) is not None:
            sample.error, sample.pixels = reason, None
        yield sample
