"""How many workers a job runs, on which devices, and the plan ``run --dry-run`` prints."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pipeline.config import JobConfig

__all__ = ["ActorPlan", "describe_plan", "plan_actors"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActorPlan:
    """How many actors run, and what each one asks Ray for."""

    count: int
    num_gpus: int
    num_cpus: float
    reason: str


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
        f"outputs: {job.output.path} (maps.zarr: {', '.join(job.store_options.arrays)} as {job.output.dtype}; "
        "samples/, blocks/ Parquet)",
    ]
    return "\n".join(lines)
