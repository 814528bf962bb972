"""Running a job: checks, resume, the bank stage, the explain stage, the summary."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from tqdm import tqdm

from pipeline.config import JobConfig
from pipeline.runner.plan import ActorPlan, describe_plan, plan_actors
from pipeline.runner.pools import LocalPool, RayPool
from pipeline.runner.preflight import preflight
from pipeline.runner.summary import JobSummary
from pipeline.stages.bank import assemble_bank, bank_is_built, bank_output
from pipeline.store.output import Output, as_output
from pipeline.store.units import (
    BANK_PARTS,
    EXPLAIN_PARTS,
    clear,
    done_units,
    record_failure,
    sweep_temporaries,
    unit_name,
)
from pipeline.summaries import label_accuracy

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
        PipelineError: a problem found before any unit ran (the CLI's exit code 2).
    """
    checked = preflight(job, model=not dry_run)
    output, banks = as_output(job.output.path), bank_output(job)
    if overwrite and not dry_run:
        clear(output, [EXPLAIN_PARTS])
        clear(banks, [BANK_PARTS])
        if job.mode == "self-supervised" and job.bank.shards is not None:
            as_output(job.bank_path()).remove(as_output(job.bank_path()).root)
    todo, done = _pending(output, checked.urls)
    bank_todo, bank_done = _pending(banks, checked.bank_urls)
    summary = JobSummary(job=job.name, output=job.output.path, units=len(checked.urls), skipped=len(done))
    plan = _plan(job, address, max(len(todo), len(bank_todo))) if use_ray else ActorPlan(1, 0, 0, "single process")
    if dry_run:
        print(describe_plan(job, plan, todo, done, bank_todo, bank_done))
        return summary
    _write_job(output, job)
    sweep_temporaries(output, EXPLAIN_PARTS)  # of writes interrupted in an earlier run; no worker is writing yet
    sweep_temporaries(banks, BANK_PARTS)
    start = time.perf_counter()
    build_bank = job.mode == "self-supervised" and job.bank.shards is not None and (bank_todo or not bank_is_built(job))
    if not todo and not build_bank:
        return _finish(job, summary, start)
    pool = RayPool(job, plan, fault) if use_ray else LocalPool(job, fault)
    summary.actors = plan.count
    with pool:
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
    return _finish(job, summary, start)


def _finish(job: JobConfig, summary: JobSummary, start: float) -> JobSummary:
    summary.seconds = time.perf_counter() - start
    if job.mode == "self-supervised" and summary.done + summary.skipped:
        from pipeline.store.results import open_results

        summary.knn_accuracy = label_accuracy(open_results(job.output.path).samples)
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


def _write_job(output: Output, job: JobConfig) -> None:
    output.put_atomic(output.path("job.json"), json.dumps(job.model_dump(mode="json"), indent=2).encode())


def _ensure_ray(address: str | None, job: JobConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    if address is None and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING)
    if address is None:
        actors = job.workers.cpu_actors * job.workers.cpus_per_actor
        kwargs["num_cpus"] = max(os.cpu_count() or 1, int(actors + 0.999))
    ray.init(address=address, **kwargs)
