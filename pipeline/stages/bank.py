"""The bank stage of self-supervised jobs: encode reference shards into a k-NN memory bank.

Each reference shard is a unit, encoded by the same workers as the explain stage and committed the same way, under
``OUT/bank`` (:data:`~pipeline.store.units.BANK_PARTS`). Once every unit is committed, :func:`assemble_bank`
concatenates them in shard order into the bank the explain stage loads (``bank.path``, default ``OUT/bank.zarr``):
L2-normalised features, labels and sample keys.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr
from torch import Tensor, nn

from pipeline.config import JobConfig, expand_shards
from pipeline.data.decode import DecodedSample
from pipeline.engine.bank import MemoryBank
from pipeline.errors import BankError
from pipeline.models import pooled_features
from pipeline.stages.base import compute_dtype, failed_rows
from pipeline.store.features import FeatureWriter, read_unit_features
from pipeline.store.output import Output, job_output
from pipeline.store.units import BANK_PARTS, done_units, unit_name

__all__ = [
    "BankStage",
    "EncodedBatch",
    "assemble_bank",
    "bank_is_built",
    "bank_output",
    "bank_storage_options",
    "describe_bank",
    "load_bank",
]

_log = logging.getLogger(__name__)


def bank_output(job: JobConfig) -> Output:
    """Where the bank stage commits its units: ``OUT/bank``."""
    return job_output(job, "bank")


@dataclass(frozen=True)
class EncodedBatch:
    """The pooled [class] features of a batch, ``(B, D)`` float32 (not normalised)."""

    features: Tensor


class BankSink:
    """One bank unit: the store's feature writer."""

    def __init__(self, writer: FeatureWriter) -> None:
        self.writer = writer

    @property
    def ok(self) -> int:
        return self.writer.ok

    @property
    def failed(self) -> int:
        return self.writer.failed

    def write(self, samples: Sequence[DecodedSample], result: EncodedBatch) -> None:
        self.writer.write_batch([s.key for s in samples], result.features.numpy(), [s.label for s in samples])

    def write_failed(self, samples: Sequence[DecodedSample]) -> None:
        self.writer.write_failed(failed_rows(samples))

    def commit(self, summary: dict, *, incomplete: str | None = None) -> dict:
        return self.writer.commit(summary, incomplete=incomplete)


class BankStage:
    """Pooled [class] features of each reference batch, in the job's compute dtype, without gradients.

    Args:
        job: The validated self-supervised job.
        model: The job's model, on ``device``.
        device: Where the batches are computed.
        dim: Feature size D.
    """

    name = "bank"
    parts = BANK_PARTS

    def __init__(self, job: JobConfig, model: nn.Module, device: torch.device, dim: int) -> None:
        self.job = job
        self.model = model
        self.device = device
        self.dim = dim
        self.autocast = compute_dtype(job.dtype)

    def output(self) -> Output:
        return bank_output(self.job)

    def open_unit(self, unit: str, url: str) -> BankSink:
        return BankSink(FeatureWriter(self.output(), unit, self.dim))

    def reject(self, sample: DecodedSample) -> str | None:
        return None

    def compute(self, images: Tensor, samples: Sequence[DecodedSample], sink: BankSink) -> EncodedBatch:
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            return EncodedBatch(pooled_features(self.model, images).float())

    def close(self) -> None:
        pass


def bank_shard_urls(job: JobConfig) -> list[str]:
    """The reference shards of the bank stage, in order ([] when the job uses an existing bank)."""
    if job.mode != "self-supervised" or job.bank.shards is None:
        return []
    return expand_shards(job.bank.shards, "bank.shards")


def assemble_bank(job: JobConfig) -> MemoryBank:
    """Concatenate the committed bank units in shard order into ``job.bank_path()``.

    Raises:
        BankError: a reference unit is not committed, or some samples have labels and others not.
    """
    output = bank_output(job)
    units = [unit_name(u) for u in bank_shard_urls(job)]
    missing = sorted(set(units) - set(done_units(output)))
    if missing:
        raise BankError(f"bank units not encoded yet: {missing[:5]}")
    features, labels, keys = zip(*(read_unit_features(output, unit) for unit in units), strict=True)
    labels_all = np.concatenate(labels)
    if job.bank.label_free or (labels_all < 0).all():
        bank_labels = None
    elif (labels_all < 0).any():
        raise BankError(
            f"{int((labels_all < 0).sum())} of {len(labels_all)} bank samples have no label; label them, or set "
            "bank.label_free: true"
        )
    else:
        bank_labels = torch.from_numpy(labels_all)
    bank = MemoryBank(
        torch.from_numpy(np.concatenate(features)),
        bank_labels,
        k=job.bank.k,
        temperature=job.bank.temperature,
        chunk_size=job.bank.chunk_size,
        dtype=torch.float16 if job.bank.storage_dtype == "float16" else torch.float32,
    )
    path = job.bank_path()
    bank.to_zarr(path, overwrite=True, keys=np.concatenate(keys), storage_options=bank_storage_options(job))
    _open_bank(job, mode="r+").attrs["units"] = units  # last: marks the bank whole
    _log.info("memory bank of %d samples (D=%d) written to %s", bank.size, bank.dim, path)
    return bank


def bank_storage_options(job: JobConfig) -> dict[str, Any] | None:
    """The output's storage options, for a bank at a URL (a local path takes none)."""
    return dict(job.output.storage_options) if "://" in job.bank_path() else None


def _open_bank(job: JobConfig, mode: str = "r") -> zarr.Group:
    return zarr.open_group(job.bank_path(), mode=mode, storage_options=bank_storage_options(job))


def bank_is_built(job: JobConfig) -> bool:
    """Whether ``bank.path`` holds a whole bank (one the bank stage assembled has its ``units``, written last)."""
    try:
        attrs = _open_bank(job).attrs
    except (FileNotFoundError, ValueError, zarr.errors.GroupNotFoundError):
        return False
    return attrs.get("format") == "daam-pipeline/memory-bank" and (job.bank.shards is None or "units" in attrs)


def describe_bank(job: JobConfig) -> tuple[int, bool]:
    """The job's bank's feature size D, and whether it holds its samples' keys; without reading its features."""
    group = _open_bank(job)
    return int(group["features"].shape[1]), "keys" in group


def load_bank(job: JobConfig, device: torch.device) -> tuple[MemoryBank, dict[str, int]]:
    """The job's bank with k, T and chunking from the job, and each bank key's row (for ``exclude_self``).

    Raises:
        BankError: no bank at ``bank.path``, or a bank without sample keys for ``exclude_self``.
    """
    path = job.bank_path()
    if not bank_is_built(job):
        raise BankError(f"no memory bank at bank.path {path}: give bank.shards so the bank stage builds it")
    bank = MemoryBank.from_zarr(
        path,
        storage_options=bank_storage_options(job),
        k=job.bank.k,
        temperature=job.bank.temperature,
        chunk_size=job.bank.chunk_size,
        device=device,
    )
    group = _open_bank(job)
    keys = group["keys"][:] if "keys" in group else None
    if keys is None and job.bank.exclude_self:
        raise BankError(f"bank.exclude_self needs the bank's sample keys, and the bank at {path} has none")
    return bank, {str(k): i for i, k in enumerate(keys if keys is not None else [])}
