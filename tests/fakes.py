"""Stand-ins for the records a writer reads of decoded samples (:mod:`pipeline.data.decode`), without torch, so the
store tests and their child processes start fast."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Sample:
    """What a writer reads of a :class:`~pipeline.data.decode.DecodedSample`."""

    key: str
    label: int | None = None
    size: tuple[int, int | None] | None = (64, 48)
    boxes: list | None = None
    error: str | None = None


@dataclass
class Batch:
    """What a writer reads of a :class:`~pipeline.data.decode.DecodedBatch`: good samples and failed ones."""

    samples: list[Sample] = field(default_factory=list)
    failed: list[Sample] = field(default_factory=list)


def failed_samples(keys, error: str = "DecodeError: truncated", **known) -> list[Sample]:
    """Samples that failed before they had maps; ``known``: what is known of them (label, size)."""
    return [Sample(str(key), error=error, **{"size": None, **known}) for key in keys]


def keys_of(batch: dict) -> list[str]:
    """The keys of a store test's batch (``UnitWriter.write_explained`` arguments)."""
    return [s.key for s in batch["samples"]]
