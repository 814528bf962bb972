"""What a stage is to the worker: a computation per batch, and a unit's state and sink."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from pipeline.data.decode import DecodedBatch, DecodedSample

if TYPE_CHECKING:
    from pipeline.store.lease import Fence

__all__ = ["Stage", "UnitSink", "UnitState", "compute_dtype"]


class UnitSink(Protocol):
    """Where one unit's results go; created when the unit starts (afresh), finished by :meth:`commit`."""

    ok: int
    failed: int

    def write(self, batch: DecodedBatch, result: Any | None) -> None:
        """Write a batch: its failed samples, and its host result (the stage's typed result after
        :func:`~pipeline.engine.transfer.move_tree`; None when the batch holds failed samples only)."""

    def commit(self, summary: dict[str, Any], *, incomplete: str | None = None) -> dict[str, Any]:
        """Make the unit durable and write its marker; returns the marker."""


@dataclass(frozen=True)
class UnitState:
    """A unit started afresh: where its results go, and what its computation keeps across its batches.

    Attributes:
        sink: The unit's writer.
        generator: The unit's own random stream on the device (reproducible per unit, whichever worker runs it);
            None where the stage draws no random numbers.
    """

    sink: UnitSink
    generator: torch.Generator | None = None


class Stage(Protocol):
    """A computation the worker runs over every unit of a job."""

    name: str

    def open_unit(self, unit: str, url: str, *, fresh: bool = False, fence: Fence | None = None) -> UnitState:
        """Start a unit afresh; ``fresh``: nothing of it exists in the output yet, so nothing is removed; its writes
        are fenced by the driver's lease (None: unfenced)."""

    def reject(self, sample: DecodedSample) -> str | None:
        """Why a decoded sample cannot be computed by this stage (its error message), or None."""

    def compute(self, images: torch.Tensor, samples: Sequence[DecodedSample], generator: torch.Generator | None) -> Any:
        """A batch's typed result on the device; ``images`` are the normalised model input, ``generator`` the unit's
        random stream."""

    def close(self) -> None:
        """Release what the stage holds on the model (hooks)."""


_COMPUTE_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compute_dtype(name: str) -> torch.dtype | None:
    """The autocast dtype of a job's ``dtype`` (None: float32, no autocast)."""
    return _COMPUTE_DTYPES[name]
