"""Running a job: checks, resume, the bank stage, the explain stage, the summary."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import IO, Any

from tqdm import tqdm

from pipeline.config import JobConfig
from pipeline.errors import ClusterError, JobTerminated, StoreError, one_line
from pipeline.runner.fingerprint import check_resume, checkpoint_digest, fingerprint
from pipeline.runner.plan import ActorPlan, describe_plan, plan_actors
from pipeline.runner.pools import LocalPool, RayPool
from pipeline.runner.preflight import preflight
from pipeline.runner.summary import JobSummary
from pipeline.store.bank import assemble_bank, bank_is_built, bank_location, bank_output
from pipeline.store.compact import TABLES_DIR, compact
from pipeline.store.lease import Lease
from pipeline.store.output import JOB_FILE, Output, job_output
from pipeline.store.units import (
    BANK_PARTS,
    EXPLAIN_PARTS,
    clear,
    committed_units,
    done_units,
    record_failure,
    sweep_temporaries,
    unit_name,
)
from pipeline.summaries import label_accuracy
from pipeline.worker import resolve_device

__all__ = ["run_job"]

_log = logging.getLogger(__name__)


def run_job(
    job: JobConfig,
    *,
    address: str | None = None,
    overwrite: bool = False,
    use_ray: bool = True,
    dry_run: bool = False,
    fault: str | None = None,
    progress: bool = True,
) -> JobSummary:
    """Run a job to completion and return what happened.

    Before any worker starts, :func:`~pipeline.runner.preflight.preflight` checks the shards, the model and its
    checkpoint, labels and bank. A self-supervised job with ``bank.shards`` first runs the bank stage (resumable
    the same way) and assembles the memory bank, then the explain stage, on the same workers.

    Args:
        job: The validated job.
        address: Ray cluster to join (``auto`` or ``ray://host:port``); default: the running one, or a new local one.
        overwrite: Remove earlier outputs first; default is to resume, skipping complete units.
        use_ray: False runs every unit in this process (same outputs, no cluster).
        dry_run: Print the plan and return without computing.
        fault: ``UNIT:BATCHES`` test hook: the worker running UNIT's first attempt dies after BATCHES batches.
        progress: Show a progress bar.

    Raises:
        PipelineError: a problem found before any unit ran (the CLI's exit code 2), among them
            OutputInUseError (another driver holds the output's lease), OutputMismatchError (the output was
            written by a job that stores something else) and ClusterError (the cluster cannot be joined).
        KeyboardInterrupt, JobTerminated: SIGINT or SIGTERM; actors and the lease are released, in-flight units
            are redone by the next run.
    """
    checked = preflight(job, model=not dry_run)
    if not use_ray and not dry_run:
        resolve_device(job.device)  # this process is the worker: an unusable device is a user error now
    output, banks = job_output(job), bank_output(job)
    content = fingerprint(job, checkpoint_digest(job.model.checkpoint))
    if dry_run:
        if not overwrite and committed_units(output):
            check_resume(output, content)
        todo, done = _pending(output, checked.urls)
        bank_todo, bank_done = _pending(banks, checked.bank_urls)
        plan = _plan(job, address, max(len(todo), len(bank_todo))) if use_ray else _IN_PROCESS
        print(describe_plan(job, plan, todo, done, bank_todo, bank_done))
        return JobSummary(job=job.name, output=job.output.path, units=len(checked.urls), skipped=len(done))
    with Lease(output, job.workers.lease_ttl_s):
        if overwrite:
            clear(output, [EXPLAIN_PARTS])
            output.remove(output.path(TABLES_DIR))
            clear(banks, [BANK_PARTS])
            if job.mode == "self-supervised" and job.bank.shards is not None:
                bank = bank_location(job)
                bank.remove(bank.root)
        elif committed_units(output) or committed_units(banks):
            check_resume(output, content)
        _write_job(output, job, content)
        return _run(job, checked, output, banks, address, use_ray, fault, progress)


_IN_PROCESS = ActorPlan(1, 0, 0, "single process")


def _run(
    job: JobConfig,
    checked: Any,
    output: Output,
    banks: Output,
    address: str | None,
    use_ray: bool,
    fault: str | None,
    progress: bool,
) -> JobSummary:
    """The bank and explain stages over the units not yet done, under the driver's lease."""
    todo, done = _pending(output, checked.urls)
    bank_todo, _ = _pending(banks, checked.bank_urls)
    summary = JobSummary(job=job.name, output=job.output.path, units=len(checked.urls), skipped=len(done))
    sweep_temporaries(output, EXPLAIN_PARTS)  # of writes interrupted in an earlier run; no worker is writing yet
    sweep_temporaries(banks, BANK_PARTS)
    start = time.perf_counter()
    build_bank = job.mode == "self-supervised" and job.bank.shards is not None and (bank_todo or not bank_is_built(job))
    if not todo and not build_bank:
        return _finish(job, summary, start)  # nothing to do: no cluster started
    plan = _plan(job, address, max(len(todo), len(bank_todo))) if use_ray else _IN_PROCESS
    pool = RayPool(job, plan, fault) if use_ray else LocalPool(job, fault)
    summary.actors = plan.count
    with stop_on_sigterm(pool), pool:
        if build_bank and not _run_bank_stage(job, pool, bank_todo, progress, summary):
            return _finish(job, summary, start)  # without a whole bank nothing can be explained
        bar = tqdm(total=len(todo), unit="unit", disable=not progress, dynamic_ncols=True, desc=f"{job.name} explain")
        for outcome in pool.run("explain", todo):
            if outcome.error is not None:
                summary.failed_units[outcome.unit] = outcome.error
                record_failure(output, outcome.unit, outcome.error)
            else:
                marker = outcome.marker
                summary.done += 1
                summary.samples_ok += marker["ok"]
                summary.samples_failed += marker["failed"]
                if not marker["complete"]:
                    summary.incomplete_units[outcome.unit] = marker["incomplete"]
            bar.update(1)
            elapsed = time.perf_counter() - start
            bar.set_postfix(samples_s=f"{summary.samples_ok / elapsed:.1f}", failed_units=len(summary.failed_units))
        bar.close()
        summary.actor_restarts = pool.restarts
    if summary.done and job.output.compact:
        _compact(output)
    return _finish(job, summary, start)


def _compact(output: Output) -> None:
    """Merge the tables; the output stays complete and readable if this fails, so a failure only warns."""
    try:
        done = compact(output)
        _log.info("compacted the tables of %d units into %d files", done.units, done.files)
    except StoreError as e:
        _log.warning(
            "the tables were not compacted (%s); the output is complete: run 'daam-pipeline compact %s'", e, output.url
        )


@contextlib.contextmanager
def stop_on_sigterm(pool: LocalPool | RayPool) -> Iterator[None]:
    """SIGTERM stops the job like SIGINT: :class:`~pipeline.errors.JobTerminated` is raised in the driver, so the
    pool and the lease are released on the way out. Installed after Ray's own handler. The Ray pool raises it at
    its next turn (an exception raised inside Ray's compiled wait would be mangled)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        if isinstance(pool, RayPool):
            pool.stop(f"signal {signum}")
        else:
            raise JobTerminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _finish(job: JobConfig, summary: JobSummary, start: float) -> JobSummary:
    summary.seconds = time.perf_counter() - start
    if job.mode == "self-supervised" and summary.done + summary.skipped:
        from pipeline.store.results import open_results

        summary.knn_accuracy = label_accuracy(open_results(job_output(job)).samples)
    return summary


def _pending(output: Output, urls: list[str]) -> tuple[list[str], list[str]]:
    """The units still to run and those already complete (incomplete units run again)."""
    done = set(done_units(output))
    return [u for u in urls if unit_name(u) not in done], [u for u in urls if unit_name(u) in done]


def _plan(job: JobConfig, address: str | None, units: int) -> ActorPlan:
    import ray

    _ensure_ray(address, job)
    return plan_actors(job, ray.cluster_resources().get("GPU", 0), units)


def _run_bank_stage(job: JobConfig, pool: Any, todo: list[str], progress: bool, summary: JobSummary) -> bool:
    """Encode the reference shards and assemble the bank; False when a unit failed (recorded in the summary)."""
    bar = tqdm(total=len(todo), unit="unit", disable=not progress, dynamic_ncols=True, desc=f"{job.name} bank")
    failed = {}
    for outcome in pool.run("bank", todo):
        if outcome.error is not None:
            failed[outcome.unit] = outcome.error
            record_failure(bank_output(job), outcome.unit, outcome.error)
        elif not outcome.marker["complete"]:
            failed[outcome.unit] = outcome.marker["incomplete"]
        else:
            summary.bank_samples += outcome.marker["ok"]
        bar.update(1)
    bar.close()
    if failed:
        summary.failed_units |= {f"bank:{unit}": error for unit, error in failed.items()}
        _log.error("the bank stage failed, so nothing is explained: %s", failed)
        return False
    summary.bank_samples = assemble_bank(job).size
    return True


def _write_job(output: Output, job: JobConfig, content: dict[str, Any]) -> None:
    """``OUT/job.json``: the job as validated, and the fingerprint of what it stores."""
    record = {**job.model_dump(mode="json"), "fingerprint": content}
    options = record["output"]["storage_options"]
    record["output"]["storage_options"] = {k: "***" if _SECRET.search(k) else v for k, v in options.items()}
    output.put_atomic(output.path(JOB_FILE), json.dumps(record, indent=2).encode())


_SECRET = re.compile(r"secret|key|token|password|credential", re.IGNORECASE)


def _ensure_ray(address: str | None, job: JobConfig) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), or start a local one.

    Raises:
        ClusterError: nothing answers at the address within ``workers.connect_timeout_s``, or Ray refuses the
            connection (an authentication token that does not match, another Ray version, ...).
    """
    import ray

    if ray.is_initialized():
        return
    if address is None and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
    # Quiet by default (Ray's start-up notices, actors' logs of events the summary reports); -v shows them.
    verbose = logging.getLogger().getEffectiveLevel() <= logging.INFO
    kwargs: dict[str, Any] = dict(
        include_dashboard=False,
        log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.ERROR,
    )
    if address is None:
        actors = job.workers.cpu_actors * job.workers.cpus_per_actor
        kwargs["num_cpus"] = max(os.cpu_count() or 1, int(actors + 0.999))
        try:
            ray.init(address="local", **kwargs)  # a new cluster, even beside one that `ray start` left running
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
            raise ClusterError(f"cannot start a local Ray cluster: {one_line(e)}") from None
        return
    _wait_reachable(address, job.workers.connect_timeout_s)
    # Ray's client logs each refused attempt to file descriptor 2 from C++: kept out of the terminal, read for the
    # reason of a failure, shown with -v.
    with tempfile.TemporaryFile() as log:
        try:
            with _fd2_to(log):
                ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
            log.seek(0)
            raise ClusterError(_join_failure(address, e, log.read().decode(errors="replace"))) from None
        if verbose:
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace"))


def _join_failure(address: str, error: Exception, ray_log: str) -> str:
    """One line saying why ``ray.init`` could not join ``address``, from its exception and its client's log."""
    if "InvalidAuthToken" in ray_log or "InvalidAuthToken" in str(error):
        return (
            f"cannot join the Ray cluster at {address}: it refused this driver's authentication token; set "
            "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token"
        )
    return f"cannot join the Ray cluster at {address}: {one_line(error)}"


@contextlib.contextmanager
def _fd2_to(sink: IO[bytes]) -> Iterator[None]:
    """Point this process's file descriptor 2 at ``sink`` meanwhile (what C++ code writes to stderr goes there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(sink.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _wait_reachable(address: str, timeout_s: float) -> None:
    """Wait until a TCP connection to ``host:port`` (or ``ray://host:port``) succeeds; ``auto`` is Ray's to find."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=min(5.0, timeout_s)):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ClusterError(
                    f"nothing answers at Ray address {address} within workers.connect_timeout_s={timeout_s:g} s "
                    f"({e.strerror or e}): is the head node up, and is the address its GCS port (default 6379)?"
                ) from None
            time.sleep(0.5)
