"""The bank stage of self-supervised jobs: encode reference shards into a k-NN memory bank.

Each reference shard is a unit, encoded by the same workers as the explain stage and committed the same way, under
``OUT/bank`` (:mod:`pipeline.store.features`). Once every unit is committed, the runner assembles them into the bank
the explain stage loads (:func:`pipeline.store.bank.assemble_bank`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pipeline.config import JobConfig
from pipeline.data.decode import DecodedSample
from pipeline.models import pooled_features
from pipeline.stages.base import UnitState, compute_dtype
from pipeline.store.bank import bank_output
from pipeline.store.features import EncodedBatch, FeatureWriter
from pipeline.store.lease import Fence

__all__ = ["BankStage"]


class BankStage:
    """Pooled [class] features of each reference batch, in the job's compute dtype, without gradients.

    Args:
        job: The validated self-supervised job.
        model: The job's model, on ``device``.
        device: Where the batches are computed.
        dim: Feature size D.
    """

    name = "bank"

    def __init__(self, job: JobConfig, model: nn.Module, device: torch.device, dim: int) -> None:
        self.job = job
        self.model = model
        self.device = device
        self.dim = dim
        self.autocast = compute_dtype(job.dtype)

    def open_unit(self, unit: str, url: str, *, fresh: bool = False, fence: Fence | None = None) -> UnitState:
        return UnitState(FeatureWriter(bank_output(self.job), unit, self.dim, fresh=fresh, fence=fence))

    def reject(self, sample: DecodedSample) -> str | None:
        return None

    def compute(
        self, images: Tensor, samples: Sequence[DecodedSample], generator: torch.Generator | None
    ) -> EncodedBatch:
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            return EncodedBatch(pooled_features(self.model, images).float())

    def close(self) -> None:
        pass
