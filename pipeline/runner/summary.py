"""What a job did, and the exit code that says it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["JobSummary"]


@dataclass
class JobSummary:
    """What a job did.

    ``exit_code``: 0 when every sample was explained; 1 when a unit failed after its retries or is incomplete (its
    shard ended early: a rerun redoes it), or the job stopped on an error after units ran (``stopped``); 3 when all
    units completed but some samples failed (corrupt images, ...; their rows say why). The CLI adds 2 (a user error,
    found before any unit ran), 130 (interrupted) and 143 (terminated).
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
    stopped: str | None = None  # an error that ended the job after units ran (not a user's: exit code 1)

    @property
    def exit_code(self) -> int:
        if self.failed_units or self.incomplete_units or self.stopped:
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
            f"{len(self.failed_units)} failed, {len(self.incomplete_units)} incomplete, of {self.units}",
            f"samples: {self.samples_ok} ok, {self.samples_failed} failed; {self.seconds:.1f} s, "
            f"{self.throughput:.1f} samples/s on {self.actors} actor(s), {self.actor_restarts} restart(s)",
            f"outputs: {self.output}",
        ]
        if self.bank_samples:
            lines.append(f"memory bank: {self.bank_samples} samples")
        if self.knn_accuracy is not None:
            lines.append(f"k-NN accuracy of the explained samples: {self.knn_accuracy:.4f}")
        if self.stopped:
            lines.append(f"STOPPED after units ran: {self.stopped}")
        lines += [f"FAILED unit {unit}: {error}" for unit, error in self.failed_units.items()]
        lines += [f"INCOMPLETE unit {unit} (a rerun redoes it): {why}" for unit, why in self.incomplete_units.items()]
        if self.samples_failed:
            lines.append(f"{self.samples_failed} samples failed: see the `error` column of the samples table")
        return "\n".join(lines)
