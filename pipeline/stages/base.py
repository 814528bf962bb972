"""What a stage is to the worker: a computation per batch and a sink per unit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from pipeline.data.decode import DecodedSample
from pipeline.store.output import Output
from pipeline.store.units import UnitParts

__all__ = ["Stage", "UnitSink", "compute_dtype", "failed_rows"]


class UnitSink(Protocol):
    """Where one unit's results go; created when the unit starts (afresh), finished by :meth:`commit`."""

    ok: int
    failed: int

    def write(self, samples: Sequence[DecodedSample], result: Any) -> None:
        """Write a batch's host result (the stage's typed result after :func:`~pipeline.engine.transfer.
        move_tree`)."""

    def write_failed(self, samples: Sequence[DecodedSample]) -> None:
        """Record samples that failed before the computation (decoding, targets)."""

    def commit(self, summary: dict[str, Any], *, incomplete: str | None = None) -> dict[str, Any]:
        """Make the unit durable and write its marker; returns the marker."""


class Stage(Protocol):
    """A computation the worker runs over every unit of a job."""

    name: str
    parts: UnitParts

    def output(self) -> Output:
        """The stage's output root, where its units are committed."""

    def open_unit(self, unit: str, url: str) -> UnitSink:
        """Start a unit afresh and return its sink."""

    def reject(self, sample: DecodedSample) -> str | None:
        """Why a decoded sample cannot be computed by this stage (its error message), or None."""

    def compute(self, images: torch.Tensor, samples: Sequence[DecodedSample], sink: UnitSink) -> Any:
        """A batch's typed result on the device; ``images`` are the normalised model input."""

    def close(self) -> None:
        """Release what the stage holds on the model (hooks)."""


def failed_rows(samples: Sequence[DecodedSample]) -> list[dict[str, Any]]:
    """The samples-table rows of failed samples: key, error and what is known of them."""
    return [
        dict(
            key=s.key,
            error=s.error,
            label=s.label,
            width=s.size[0] if s.size else None,
            height=s.size[1] if s.size else None,
        )
        for s in samples
    ]


_COMPUTE_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compute_dtype(name: str) -> torch.dtype | None:
    """The autocast dtype of a job's ``dtype`` (None: float32, no autocast)."""
    return _COMPUTE_DTYPES[name]
