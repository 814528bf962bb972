"""The Ray driver: one actor per GPU (CPU actors where there is none), units handed out dynamically, retries.

Each unit of work is one input shard. The driver keeps ``workers.units_in_flight`` units on every actor (two on a
GPU, one on the CPU): they take turns on its device, so one unit's commit and the next one's reading and decoding
overlap the computation. When an actor dies its units go back to the queue and a new actor takes its place; a unit
that keeps failing (its actor dies or it raises) after ``workers.max_retries`` extra attempts is recorded under
``OUT/_failed/`` and the rest of the job completes. Units already committed are skipped (resume), unless the job
is run with ``overwrite``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm import tqdm

from pipeline.config import JobConfig
from pipeline.errors import PipelineError
from pipeline.store.commit import as_output, clear, done_units, sweep_temporaries
from pipeline.worker import UnitWorker, unit_name, units_in_flight

__all__ = ["ActorPlan", "JobSummary", "plan_actors", "run_job"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActorPlan:
    """How many actors run, and what each one asks Ray for."""

    count: int
    num_gpus: int
    num_cpus: float
    reason: str


@dataclass
class JobSummary:
    """What a job did.

    ``exit_code``: 0 when every sample was explained; 1 when a unit failed or its shard was truncated; 3 when all
    units completed but some samples failed (corrupt images, ...; their rows say why). 2 is the CLI's user error.
    """

    job: str
    output: str
    units: int
    skipped: int = 0
    done: int = 0
    failed_units: dict[str, str] = field(default_factory=dict)
    incomplete_units: dict[str, str] = field(default_factory=dict)
    samples_ok: int = 0
    samples_failed: int = 0
    seconds: float = 0.0
    actors: int = 0
    actor_restarts: int = 0
    bank_samples: int = 0
    knn_accuracy: float | None = None

    @property
    def exit_code(self) -> int:
        if self.failed_units or self.incomplete_units:
            return 1
        return 3 if self.samples_failed else 0

    @property
    def throughput(self) -> float:
        return self.samples_ok / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "exit_code": self.exit_code, "throughput": self.throughput}

    def render(self) -> str:
        lines = [
            f"job {self.job}: {self.done} units explained, {self.skipped} already done, "
            f"{len(self.failed_units)} failed of {self.units}",
            f"samples: {self.samples_ok} ok, {self.samples_failed} failed; {self.seconds:.1f} s, "
            f"{self.throughput:.1f} samples/s on {self.actors} actor(s), {self.actor_restarts} restart(s)",
            f"outputs: {self.output}",
        ]
        if self.bank_samples:
            lines.append(f"memory bank: {self.bank_samples} samples")
        if self.knn_accuracy is not None:
            lines.append(f"k-NN accuracy of the explained samples: {self.knn_accuracy:.4f}")
        lines += [f"FAILED unit {unit}: {error}" for unit, error in self.failed_units.items()]
        lines += [f"INCOMPLETE unit {unit}: {error}" for unit, error in self.incomplete_units.items()]
        if self.samples_failed:
            lines.append(f"{self.samples_failed} samples failed: see the `error` column of the samples table")
        return "\n".join(lines)


def plan_actors(job: JobConfig, cluster_gpus: float, units: int) -> ActorPlan:
    """One actor per GPU; CPU actors when the job or the cluster has none (never wait for a missing GPU)."""
    workers = job.workers
    cpu = ActorPlan(min(workers.cpu_actors, max(units, 1)), 0, workers.cpus_per_actor, "")
    wanted = int(cluster_gpus) if workers.num_gpus == "auto" else workers.num_gpus
    if job.device == "cpu" or wanted == 0:
        reason = "job runs on the CPU" if job.device == "cpu" or workers.num_gpus == 0 else "no GPU in the cluster"
        return ActorPlan(cpu.count, 0, cpu.num_cpus, reason)
    if cluster_gpus < 1:
        _log.warning(
            "job asks for %s GPU actor(s) but the cluster has no GPU: running %d CPU actor(s)", wanted, cpu.count
        )
        return ActorPlan(cpu.count, 0, cpu.num_cpus, f"asked for {wanted} GPU(s), cluster has none: CPU fallback")
    count = min(wanted, int(cluster_gpus), max(units, 1))
    if count < wanted:
        _log.warning("job asks for %d GPU actor(s); the cluster has %d GPU(s)", wanted, int(cluster_gpus))
    return ActorPlan(count, 1, workers.cpus_per_actor, f"one actor per GPU ({int(cluster_gpus)} in the cluster)")


def _pending_units(job: JobConfig) -> tuple[list[str], list[str]]:
    urls = job.shard_urls()
    names = [unit_name(u) for u in urls]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise PipelineError(f"data.shards: several shards share the unit name {sorted(duplicates)[0]!r}")
    done = set(done_units(job.output.path))
    return [u for u in urls if unit_name(u) not in done], [u for u in urls if unit_name(u) in done]


def describe_plan(
    job: JobConfig, plan: ActorPlan, todo: list[str], done: list[str], bank_todo: list[str], bank_done: list[str]
) -> str:
    """The resolved plan that ``run --dry-run`` prints."""
    kind = f"{plan.count} GPU actor(s)" if plan.num_gpus else f"{plan.count} CPU actor(s) x {plan.num_cpus} CPU"
    lines = [
        f"job {job.name}: {job.mode}, model {job.model.name}"
        + (f" from {job.model.checkpoint}" if job.model.checkpoint else ""),
        *(
            [
                f"bank stage: {len(bank_todo) + len(bank_done)} reference shards, {len(bank_todo)} to encode -> "
                f"{job.bank_path()} (k={job.bank.k}, T={job.bank.temperature})"
            ]
            if job.mode == "self-supervised"
            else []
        ),
        f"units: {len(todo) + len(done)} shards, {len(done)} already done, {len(todo)} to explain",
        *[f"  {u}" for u in todo[:5]],
        *(["  ..."] if len(todo) > 5 else []),
        f"actors: {kind} ({plan.reason}); batch {job.batch_size}, dtype {job.dtype}",
        f"outputs: {job.output.path} (maps.zarr: {', '.join(job.output.arrays)} as {job.output.dtype}; "
        "samples/, blocks/ Parquet)",
    ]
    return "\n".join(lines)


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

    A self-supervised job first runs the bank stage over ``bank.shards`` (resumable the same way) and assembles
    the memory bank, then the explain stage.

    Args:
        job: The validated job.
        address: Ray cluster to join (``auto`` or ``ray://host:port``); default: the running one, or a new local one.
        overwrite: Remove earlier outputs first; default is to resume, skipping committed units.
        use_ray: False runs every unit in this process (same outputs, no cluster).
        dry_run: Print the plan and return without computing.
        fault: ``UNIT:BATCHES`` test hook: the worker running UNIT's first attempt dies after BATCHES batches.
        progress: Show a progress bar.
    """
    as_output(job.output.path)  # fail early on a bad output location
    if overwrite and not dry_run:
        clear(job.output.path)
        clear_bank(job)
    todo, done = _pending_units(job)
    bank_todo, bank_done = _pending_bank_units(job)
    summary = JobSummary(job=job.name, output=job.output.path, units=len(todo) + len(done), skipped=len(done))
    if use_ray:
        _ensure_ray(address, job)
        import ray

        plan = plan_actors(job, ray.cluster_resources().get("GPU", 0), max(len(todo), len(bank_todo)))
    else:
        plan = ActorPlan(1, 0, 0, "single process")
    if dry_run:
        print(describe_plan(job, plan, todo, done, bank_todo, bank_done))
        return summary
    _write_job(job)
    sweep_temporaries(job.output.path)  # of writes interrupted in an earlier run; no worker is writing yet
    if job.mode == "self-supervised":
        from pipeline.bank_stage import bank_output

        sweep_temporaries(bank_output(job))
    start = time.perf_counter()
    summary.actors = plan.count
    if job.mode == "self-supervised" and job.bank.shards is not None:
        _run_bank_stage(job, plan, bank_todo, bank_done, use_ray, fault, progress, summary)
    bar = tqdm(total=len(todo), unit="unit", disable=not progress, dynamic_ncols=True, desc=f"{job.name} explain")
    for unit, marker, error in _run_stage("explain", job, plan, todo, use_ray, fault, summary):
        if error is not None:
            summary.failed_units[unit] = error
            _record_failure(job, unit, error)
        else:
            summary.done += 1
            summary.samples_ok += marker["ok"]
            summary.samples_failed += marker["failed"]
            if "shard_error" in marker.get("summary", marker):
                summary.incomplete_units[unit] = marker.get("summary", marker)["shard_error"]
        bar.update(1)
        elapsed = time.perf_counter() - start
        bar.set_postfix(samples_s=f"{summary.samples_ok / elapsed:.1f}", failed_units=len(summary.failed_units))
    bar.close()
    summary.seconds = time.perf_counter() - start
    if job.mode == "self-supervised" and summary.done + summary.skipped:
        summary.knn_accuracy = _knn_accuracy(job)
    return summary


def _knn_accuracy(job: JobConfig) -> float | None:
    from pipeline.store.results import open_results

    samples = open_results(job.output.path).samples
    labelled = samples[(samples.status == "ok") & samples.label.notna() & samples.predicted.notna()]
    return float((labelled.predicted == labelled.label).mean()) if len(labelled) else None


def _run_bank_stage(job, plan, todo, done, use_ray, fault, progress, summary) -> None:
    from pipeline.bank_stage import assemble_bank, bank_is_built

    bar = tqdm(total=len(todo), unit="unit", disable=not progress, dynamic_ncols=True, desc=f"{job.name} bank")
    for unit, marker, error in _run_stage("bank", job, plan, todo, use_ray, fault, summary):
        if error is not None:
            summary.failed_units[f"bank:{unit}"] = error
        else:
            summary.bank_samples += marker["ok"]
        bar.update(1)
    bar.close()
    if summary.failed_units:
        raise PipelineError(f"the bank stage failed, so nothing is explained: {summary.failed_units}")
    if todo or not bank_is_built(job):
        summary.bank_samples = assemble_bank(job).size


def _pending_bank_units(job: JobConfig) -> tuple[list[str], list[str]]:
    if job.mode != "self-supervised" or job.bank.shards is None:
        return [], []
    from pipeline.bank_stage import bank_units_done
    from pipeline.config import expand_shards

    urls = expand_shards(job.bank.shards, "bank.shards")
    done = set(bank_units_done(job))
    return [u for u in urls if unit_name(u) not in done], [u for u in urls if unit_name(u) in done]


def clear_bank(job: JobConfig) -> None:
    """Remove the bank stage's outputs (for --overwrite); a bank given by ``bank.path`` alone stays."""
    if job.mode != "self-supervised" or job.bank.shards is None:
        return
    output = as_output(job.output.path)
    output.remove(output.path("bank"))
    bank = as_output(job.bank_path())
    bank.remove(bank.root)


def _write_job(job: JobConfig) -> None:
    output = as_output(job.output.path)
    output.put_atomic(output.path("job.json"), json.dumps(job.model_dump(mode="json"), indent=2).encode())


def _record_failure(job: JobConfig, unit: str, error: str) -> None:
    output = as_output(job.output.path)
    output.put_atomic(output.path("_failed", f"{unit}.json"), json.dumps({"unit": unit, "error": error}).encode())


UnitResult = tuple[str, dict | None, str | None]  # unit, commit marker, error


def _run_stage(
    stage: str, job: JobConfig, plan: ActorPlan, todo: list[str], use_ray: bool, fault: str | None, summary: JobSummary
) -> Iterator[UnitResult]:
    if not todo:
        return
    if use_ray:
        yield from _run_ray(stage, job, plan, todo, fault, summary)
        return
    with UnitWorker(job, fault=fault) as worker:
        for url, marker, error in worker.run_units(stage, todo):
            yield unit_name(url), marker, error


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


def _unit_actor_class():
    import ray

    @ray.remote(max_restarts=0, max_task_retries=0)
    class UnitActor:
        """A Ray actor holding one :class:`UnitWorker` (the model loaded once); started with max_concurrency set to
        the units it holds at once, which share its device in turns (UnitWorker.run)."""

        def __init__(self, job: dict[str, Any], device: str, fault: str | None, threads: int) -> None:
            import torch

            if device == "cpu":
                torch.set_num_threads(threads)
            self.worker = UnitWorker(JobConfig.model_validate(job), device, fault=fault)

        def ready(self) -> int:
            return os.getpid()

        def process(self, stage: str, url: str, attempt: int) -> dict[str, Any]:
            return self.worker.run(stage, url, attempt=attempt)

    return UnitActor


def _run_ray(
    stage: str, job: JobConfig, plan: ActorPlan, todo: list[str], fault: str | None, summary: JobSummary
) -> Iterator[UnitResult]:
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

    actor_class = _unit_actor_class()
    device = "cuda" if plan.num_gpus else "cpu"
    job_dict = job.model_dump(mode="json")
    threads = max(1, int(plan.num_cpus))

    per_actor = units_in_flight(job, device)

    def start_actor():
        return actor_class.options(num_gpus=plan.num_gpus, num_cpus=plan.num_cpus, max_concurrency=per_actor).remote(
            job_dict, device, fault, threads
        )

    def wait_ready(actors: list) -> None:
        try:
            ray.get([a.ready.remote() for a in actors], timeout=job.workers.actor_start_timeout_s)
        except GetTimeoutError:
            raise PipelineError(
                f"actors did not start within workers.actor_start_timeout_s={job.workers.actor_start_timeout_s} s "
                f"(each asks for {plan.num_gpus} GPU and {plan.num_cpus} CPU; cluster has {ray.cluster_resources()})"
            ) from None
        except RayActorError as e:
            raise PipelineError(f"an actor failed to start: {e}") from e

    actors = [start_actor() for _ in range(plan.count)]
    wait_ready(actors)
    load = dict.fromkeys(actors, 0)  # units in flight per live actor
    died_with: dict[Any, int] = {}  # dead actor -> units it held when it died
    queue = deque(_Pending(url) for url in todo)
    running: dict[Any, tuple[Any, _Pending]] = {}

    def dispatch() -> None:
        while queue:
            unit = queue[0]
            isolating = {a for a, u in running.values() if u.alone}  # actors running a unit alone take no other
            room = 1 if unit.alone else per_actor
            open_actors = [a for a in actors if load[a] + 1 <= room and a not in isolating]
            if not open_actors:
                return
            actor = min(open_actors, key=load.__getitem__)
            queue.popleft()
            load[actor] += 1
            running[actor.process.remote(stage, unit.url, unit.attempt)] = (actor, unit)

    try:
        while queue or running:
            dispatch()
            ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for ref in ready:
                actor, unit = running.pop(ref)
                try:
                    marker = ray.get(ref)
                except RayActorError as e:
                    if actor not in died_with:  # the first of its units to report: replace the actor once
                        _log.warning(
                            "actor died while explaining %s (attempt %d): replacing it", unit.url, unit.attempt
                        )
                        summary.actor_restarts += 1
                        died_with[actor] = load.pop(actor)
                        actors.remove(actor)
                        ray.kill(actor, no_restart=True)
                        replacement = start_actor()
                        wait_ready([replacement])
                        actors.append(replacement)
                        load[replacement] = 0
                    if died_with[actor] > 1:  # which of its units killed it is unknown: each retries alone, free
                        queue.appendleft(_Pending(unit.url, unit.attempt, alone=True))
                        continue
                    error = f"worker died: {type(e).__name__}: {str(e).splitlines()[0]}"
                except RayTaskError as e:
                    cause = e.cause if getattr(e, "cause", None) is not None else e
                    error = f"{type(cause).__name__}: {cause}"
                else:
                    error = None
                if actor in load:
                    load[actor] -= 1
                if error is None:
                    yield unit_name(unit.url), marker, None
                elif unit.attempt < job.workers.max_retries:
                    queue.append(_Pending(unit.url, unit.attempt + 1))
                else:
                    yield unit_name(unit.url), None, f"{error} (after {unit.attempt + 1} attempts)"
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)


@dataclass(frozen=True)
class _Pending:
    """A unit waiting for an actor: ``attempt`` counts its failures so far; ``alone`` asks for an actor running
    nothing else (after an actor died holding several units, each is retried alone to find the one that kills it)."""

    url: str
    attempt: int = 0
    alone: bool = False
