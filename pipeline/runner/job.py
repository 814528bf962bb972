"""Running a job: checks, the lease, resume, the bank stage, the explain stage, compaction, the summary."""

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
import time
from collections.abc import Iterator
from typing import IO, Any

from tqdm import tqdm

from pipeline.config import JobConfig
from pipeline.errors import (
    ClusterError,
    InputChangedError,
    JobTerminated,
    LeaseLostError,
    PipelineError,
    StoreError,
    one_line,
)
from pipeline.runner.fingerprint import changed_inputs, check_resume, checkpoint_digest, fingerprint
from pipeline.runner.plan import ActorPlan, describe_plan, plan_actors
from pipeline.runner.preflight import CheckedJob, check_shards, check_worker_inputs, preflight
from pipeline.runner.stops import Stops
from pipeline.runner.summary import JobSummary
from pipeline.store.lease import Fence, Lease
from pipeline.store.output import JOB_FILE, Output, job_output
from pipeline.store.units import (
    BANK_PARTS,
    EXPLAIN_PARTS,
    UnitParts,
    clear,
    committed_units,
    done_units,
    present_units,
    record_failure,
    sweep_temporaries,
    unit_name,
)

# torch, Ray, pyarrow and pandas (pools, the bank, compaction, the summaries) are imported where they are used,
# after the driver holds the lease: a refused run ends in about a second.

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
    break_lease: bool = False,
    redo_changed: bool = False,
    stops: Stops | None = None,
) -> JobSummary:
    """Run a job to completion and return what happened.

    In this order: the shards are checked (a missing one is refused before anything is written), the output's
    lease is taken (before torch and Ray are imported and the model is built), then
    :func:`~pipeline.runner.preflight.check_worker_inputs` checks the model and its checkpoint, labels and bank.
    A self-supervised job with ``bank.shards`` first runs the bank stage (resumable the same way) and assembles the
    memory bank, then the explain stage, on the same workers. Signals stop the run in every phase (``stops``).

    Args:
        job: The validated job.
        address: Ray cluster to join (``auto`` or ``ray://host:port``); default: the running one, or a new local one.
        overwrite: Remove earlier outputs first; default is to resume, skipping complete units.
        use_ray: False runs every unit in this process (same outputs, no cluster).
        dry_run: Print the plan and return without computing.
        fault: ``UNIT:BATCHES`` test hook: the worker running UNIT's first attempt dies after BATCHES batches.
        progress: Show a progress bar.
        break_lease: Take the output's lease from a holder on another node known to be dead.
        redo_changed: Redo the done units whose shard is not the one they were computed from (same name, other
            samples); without it they are refused.
        stops: The run's signal handlers, installed already (the command line's); default: installed here.

    Raises:
        PipelineError: a problem found before any unit ran (the CLI's exit code 2), among them
            OutputInUseError (another driver holds the output's lease), OutputMismatchError (the output was
            written by a job that stores something else), InputChangedError (done units of other shards of the
            same names) and ClusterError (the cluster cannot be joined).
        LeaseLostError: another driver took the lease meanwhile (this driver was paused past it): nothing more was
            written (the CLI's exit code 1).
        KeyboardInterrupt, JobTerminated: SIGINT or SIGTERM; actors and the lease are released, in-flight units
            are redone by the next run.
    """
    with contextlib.ExitStack() as stack:
        if stops is None:
            stops = stack.enter_context(Stops())
        if dry_run:
            return _dry_run(job, address, overwrite, use_ray)
        checked = check_shards(job)
        output = job_output(job)
        lease = stack.enter_context(Lease(output, job.workers.lease_ttl_s, break_lease=break_lease))
        stops.lease, lease.on_lost = lease, stops.stop
        check_worker_inputs(job, checked)
        return _run_leased(
            job, checked, output, lease, stops, address, overwrite, use_ray, fault, progress, redo_changed
        )


def _run_leased(
    job: JobConfig,
    checked: CheckedJob,
    output: Output,
    lease: Lease,
    stops: Stops,
    address: str | None,
    overwrite: bool,
    use_ray: bool,
    fault: str | None,
    progress: bool,
    redo_changed: bool,
) -> JobSummary:
    """Everything after the checks, under the driver's lease."""
    from pipeline.store.bank import bank_location, bank_output
    from pipeline.store.compact import TABLES_DIR

    if not use_ray:
        from pipeline.worker import resolve_device

        resolve_device(job.device)  # this process is the worker: an unusable device is a user error now
    banks = bank_output(job)
    content = fingerprint(job, checkpoint_digest(job.model.checkpoint))
    if overwrite:
        clear(output, [EXPLAIN_PARTS])
        output.remove(output.path(TABLES_DIR))
        clear(banks, [BANK_PARTS])
        if job.mode == "self-supervised" and job.bank.shards is not None:
            bank = bank_location(job)
            bank.remove(bank.root)
    elif committed_units(output) or committed_units(banks):
        check_resume(output, content, checkpoint=job.model.checkpoint)
    todo, done = _pending(output, checked.urls, redo_changed)
    bank_todo, _ = _pending(banks, checked.bank_urls, redo_changed)
    _write_job(output, job, content)
    stops.check()
    return _run(
        job,
        todo,
        done,
        bank_todo,
        len(checked.urls),
        output,
        banks,
        lease.fence(),
        stops,
        address,
        use_ray,
        fault,
        progress,
    )


def _dry_run(job: JobConfig, address: str | None, overwrite: bool, use_ray: bool) -> JobSummary:
    """Print the plan: units to run and done, actors; nothing is written."""
    from pipeline.store.bank import bank_output

    checked = preflight(job, model=False)
    output, banks = job_output(job), bank_output(job)
    if not overwrite and committed_units(output):
        check_resume(output, fingerprint(job, checkpoint_digest(job.model.checkpoint)), checkpoint=job.model.checkpoint)
    todo, done = _split_done(output, checked.urls)
    bank_todo, bank_done = _split_done(banks, checked.bank_urls)
    plan = _plan(job, address, max(len(todo), len(bank_todo))) if use_ray else _IN_PROCESS
    print(describe_plan(job, plan, todo, done, bank_todo, bank_done))
    return JobSummary(job=job.name, output=job.output.path, units=len(checked.urls), skipped=len(done))


_IN_PROCESS = ActorPlan(1, 0, 0, "single process")


def _run(
    job: JobConfig,
    todo: list[str],
    done: list[str],
    bank_todo: list[str],
    units: int,
    output: Output,
    banks: Output,
    fence: Fence,
    stops: Stops,
    address: str | None,
    use_ray: bool,
    fault: str | None,
    progress: bool,
) -> JobSummary:
    """The bank and explain stages over the units not yet done, then compaction."""
    from pipeline.runner.pools import LocalPool, RayPool
    from pipeline.store.bank import bank_is_built

    summary = JobSummary(job=job.name, output=job.output.path, units=units, skipped=len(done))
    sweep_temporaries(output, EXPLAIN_PARTS)  # of writes interrupted in an earlier run; no worker is writing yet
    sweep_temporaries(banks, BANK_PARTS)
    start = time.perf_counter()
    build_bank = job.mode == "self-supervised" and job.bank.shards is not None and (bank_todo or not bank_is_built(job))
    if todo or build_bank:
        fresh = _fresh(output, EXPLAIN_PARTS, todo)
        bank_fresh = _fresh(banks, BANK_PARTS, bank_todo) if build_bank else set()
        plan = _plan(job, address, max(len(todo), len(bank_todo)), stops) if use_ray else _IN_PROCESS
        pool = (
            RayPool(job, plan, fault, fence=fence, stops=stops)
            if use_ray
            else LocalPool(job, fault, fence=fence, stops=stops)
        )
        summary.actors = plan.count
        with pool:
            try:
                if not build_bank or _run_bank_stage(job, pool, bank_todo, bank_fresh, progress, summary, fence):
                    _run_explain_stage(job, pool, todo, fresh, progress, summary, output, fence, start)
            except LeaseLostError:
                raise
            except PipelineError as e:  # after units ran: not a user error (exit 1, with the summary)
                if not (summary.done or summary.failed_units or summary.bank_samples):
                    raise
                summary.stopped = one_line(e)
            summary.actor_restarts = pool.restarts
    if job.output.compact and summary.stopped is None:
        _compact(output, fence)
    return _finish(job, summary, start)


def _run_explain_stage(
    job: JobConfig,
    pool: Any,
    todo: list[str],
    fresh: set[str],
    progress: bool,
    summary: JobSummary,
    output: Output,
    fence: Fence,
    start: float,
) -> None:
    bar = tqdm(total=len(todo), unit="unit", disable=not progress, dynamic_ncols=True, desc=f"{job.name} explain")
    for outcome in pool.run("explain", todo, fresh):
        if outcome.error is not None:
            summary.failed_units[outcome.unit] = outcome.error
            _record_failure(output, outcome.unit, outcome.error, fence)
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


def _record_failure(output: Output, unit: str, error: str, fence: Fence) -> None:
    """The failure record; one that cannot be written (a full disk) only warns: the summary names the unit."""
    try:
        record_failure(output, unit, error, fence=fence)
    except StoreError as e:
        _log.warning("the failure record of unit %s was not written: %s", unit, e)


def _compact(output: Output, fence: Fence) -> None:
    """Merge what is committed and not compacted yet (this run's units, or an earlier run's: one with
    ``output.compact: false``, a failed compaction, a driver killed after its last commit). The output stays
    complete and readable if this fails, so a failure only warns."""
    from pipeline.store.compact import compact, compaction_pending

    try:
        if not compaction_pending(output):
            return
        done = compact(output, fence=fence)
        _log.info("compacted the tables of %d units into %d files", done.units, done.files)
    except StoreError as e:
        _log.warning(
            "the tables were not compacted (%s); the output is complete: run 'daam-pipeline compact %s'", e, output.url
        )


def _finish(job: JobConfig, summary: JobSummary, start: float) -> JobSummary:
    summary.seconds = time.perf_counter() - start
    if job.mode == "self-supervised" and summary.done + summary.skipped:
        from pipeline.store.results import open_results
        from pipeline.summaries import label_accuracy

        summary.knn_accuracy = label_accuracy(open_results(job_output(job)).samples)
    return summary


def _split_done(output: Output, urls: list[str]) -> tuple[list[str], list[str]]:
    """The units still to run and those already complete (incomplete units run again)."""
    done = set(done_units(output))
    return [u for u in urls if unit_name(u) not in done], [u for u in urls if unit_name(u) in done]


def _pending(output: Output, urls: list[str], redo_changed: bool) -> tuple[list[str], list[str]]:
    """:func:`_split_done`, with done units whose shard changed since (same name, other samples) refused, or
    redone with ``redo_changed``.

    Raises:
        InputChangedError: naming the changed units.
    """
    todo, done = _split_done(output, urls)
    changed = changed_inputs(output, done)
    if changed and not redo_changed:
        names = [unit_name(url) for url in changed]
        more = f" (and {len(names) - 3} more)" if len(names) > 3 else ""
        raise InputChangedError(
            f"output {output.url}: done units {', '.join(names[:3])}{more} were computed from other shards than "
            "data.shards names now (same names, other samples): run again with --redo-changed to redo them, or "
            "--overwrite, or use another output.path"
        )
    if changed:
        _log.warning("redoing %d units whose shards changed: %s", len(changed), [unit_name(u) for u in changed])
    return todo + changed, [url for url in done if url not in changed]


def _fresh(output: Output, parts: UnitParts, urls: list[str]) -> set[str]:
    """The units of ``urls`` the output holds nothing of (no part, marker or failure record): they start without
    removing anything, which on an object store saves a dozen requests per unit."""
    if not urls:
        return set()
    return {unit_name(u) for u in urls} - present_units(output, parts)


def _plan(job: JobConfig, address: str | None, units: int, stops: Stops | None = None) -> ActorPlan:
    import ray

    _ensure_ray(address, job, stops)
    return plan_actors(job, ray.cluster_resources().get("GPU", 0), units)


def _run_bank_stage(
    job: JobConfig, pool: Any, todo: list[str], fresh: set[str], progress: bool, summary: JobSummary, fence: Fence
) -> bool:
    """Encode the reference shards and assemble the bank; False when a unit failed (recorded in the summary)."""
    from pipeline.store.bank import assemble_bank, bank_output

    bar = tqdm(total=len(todo), unit="unit", disable=not progress, dynamic_ncols=True, desc=f"{job.name} bank")
    failed = {}
    for outcome in pool.run("bank", todo, fresh):
        if outcome.error is not None:
            failed[outcome.unit] = outcome.error
            _record_failure(bank_output(job), outcome.unit, outcome.error, fence)
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


def _ensure_ray(address: str | None, job: JobConfig, stops: Stops | None = None) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), or start a local one.

    ``ray.init`` installs a SIGTERM handler of its own (``sys.exit(15)``): a SIGTERM while Ray starts becomes
    :class:`~pipeline.errors.JobTerminated` like any other, and the run's handler is installed again after it.

    Raises:
        ClusterError: nothing answers at the address within ``workers.connect_timeout_s``, or Ray refuses the
            connection (an authentication token that does not match, another Ray version, ...).
        JobTerminated: SIGTERM while Ray starts.
    """
    import ray

    if ray.is_initialized():
        return
    if address is None:
        _log.info("starting Ray")
    else:
        _log.info("joining the Ray cluster at %s", address)
    try:
        _init_ray(address, job)
    except SystemExit as e:
        if e.code != signal.SIGTERM:
            raise
        raise JobTerminated(f"signal {signal.SIGTERM}") from None
    finally:
        if stops is not None:
            stops.reinstall()
            stops.check()  # a signal Ray's start swallowed


def _init_ray(address: str | None, job: JobConfig) -> None:
    import ray

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
