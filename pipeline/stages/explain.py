"""The explain stage: DAAM (and the comparison explainers, statistics and evaluation) of every sample of a unit."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.config import JobConfig
from pipeline.data.decode import DecodedSample
from pipeline.engine.daam import DAAM, DAAMResult
from pipeline.engine.explainers import Explainers
from pipeline.evaluate import evaluate_batch
from pipeline.stages.bank import load_bank
from pipeline.stages.base import compute_dtype, failed_rows
from pipeline.stats import block_statistics, boxes_to_grid_mask, explainer_statistics
from pipeline.store.output import Output, job_output
from pipeline.store.unit_writer import UnitWriter
from pipeline.store.units import EXPLAIN_PARTS
from pipeline.store.zarr_store import MapLayout, round_significant, significant_bits

__all__ = ["ExplainStage", "ExplainedBatch"]


@dataclass(frozen=True)
class ExplainedBatch:
    """Everything a unit stores of one batch of B samples, on one device.

    Attributes:
        arrays: The stored arrays by name: ``block_maps`` and ``daam`` ``(B, L, h, w)``, ``coefficients``
            ``(B, L, C)``; the comparison explainers' arrays (:data:`pipeline.names.EXPLAINER_ARRAYS`); already
            rounded to the storage precision (``output.dtype``), on the device.
        predicted: ``(B,)`` predicted (or k-NN voted) class; -1 where there is none (a label-free bank).
        score: ``(B,)`` its softmax probability (or vote share); NaN where there is none.
        target: ``(B,)`` explained class, None in self-supervised mode.
        block_stats: ``{statistic: (B, L)}`` of DAAM (:func:`pipeline.stats.block_statistics`).
        explainer_block_stats: ``{explainer: {statistic: (B, L)}}`` of the per-block comparison explainers.
        evaluation: ``{method: {metric: (B,)}}`` when the job evaluates, else empty.
    """

    arrays: dict[str, Tensor]
    predicted: Tensor
    score: Tensor
    target: Tensor | None
    block_stats: dict[str, Tensor]
    explainer_block_stats: dict[str, dict[str, Tensor]]
    evaluation: dict[str, dict[str, Tensor]]


class ExplainSink:
    """One unit of the explain stage: the store's writer, and the unit's own random stream for reference maps."""

    def __init__(self, writer: UnitWriter, generator: torch.Generator | None) -> None:
        self.writer = writer
        self.generator = generator

    @property
    def ok(self) -> int:
        return self.writer.ok

    @property
    def failed(self) -> int:
        return self.writer.failed

    def write(self, samples: Sequence[DecodedSample], result: ExplainedBatch) -> None:
        predicted, score = result.predicted.numpy(), result.score.numpy()
        columns = {
            "label": [s.label for s in samples],
            "predicted": [int(p) if p >= 0 else None for p in predicted],
            "score": [None if np.isnan(v) else float(v) for v in score],
            "target": result.target.tolist() if result.target is not None else [None] * len(samples),
            "width": [s.size[0] if s.size else None for s in samples],
            "height": [s.size[1] if s.size else None for s in samples],
            "n_boxes": [len(s.boxes) if s.boxes is not None else 0 for s in samples],
        }
        self.writer.write_batch(
            [s.key for s in samples],
            _numpy(result.arrays),
            columns,
            _numpy(result.block_stats),
            {name: _numpy(stats) for name, stats in result.explainer_block_stats.items()},
            {method: _numpy(metrics) for method, metrics in result.evaluation.items()},
            rounded=True,  # on the device, by ExplainStage.compute
        )

    def write_failed(self, samples: Sequence[DecodedSample]) -> None:
        self.writer.write_failed(failed_rows(samples))

    def commit(self, summary: dict, *, incomplete: str | None = None) -> dict:
        return self.writer.commit(summary, incomplete=incomplete)


def _numpy(tensors: dict[str, Tensor]) -> dict[str, np.ndarray]:
    return {name: tensor.numpy() for name, tensor in tensors.items()}


class ExplainStage:
    """DAAM of each batch in one forward and one backward pass, with the job's comparison explainers, per-block
    statistics and evaluation, all on the model's device.

    Args:
        job: The validated job.
        model: The job's model, on ``device``.
        device: Where the batches are computed.
        input_size: ``(H, W)`` of the model input.
    """

    name = "explain"
    parts = EXPLAIN_PARTS

    def __init__(self, job: JobConfig, model: nn.Module, device: torch.device, input_size: tuple[int, int]) -> None:
        self.job = job
        self.model = model
        self.device = device
        self.input_size = input_size
        self.daam = DAAM(model, autocast_dtype=compute_dtype(job.dtype)).open()
        self.explainers = Explainers(self.daam, job.comparison_explainers) if job.comparison_explainers else None
        self.layout = MapLayout(
            model=job.model.name,
            n_blocks=self.daam.num_blocks,
            grid=self.daam.grid_size(input_size),
            channels=self.daam.num_heads * self.daam.head_dim,
            prefix_tokens=self.daam.num_prefix_tokens,
        )
        self.num_classes = getattr(model, "num_classes", 0)
        self._bank = None  # self-supervised jobs: loaded on first use, once the bank stage has built it

    def output(self) -> Output:
        return job_output(self.job)

    def open_unit(self, unit: str, url: str) -> ExplainSink:
        writer = UnitWriter(
            self.output(), unit, self.layout, shard=url, job=self.job.name, store_options=self.job.store_options
        )
        generator = None
        if self.job.evaluate is not None:  # independent random reference maps per unit, reproducible per unit
            seed = self.job.evaluate.seed + zlib.crc32(unit.encode())
            generator = torch.Generator(self.device).manual_seed(seed)
        return ExplainSink(writer, generator)

    def reject(self, sample: DecodedSample) -> str | None:
        """With target policy 'label', a sample without a usable label cannot be explained."""
        if self.job.target != "label" or (sample.label is not None and 0 <= sample.label < self.num_classes):
            return None
        reason = "has no label" if sample.label is None else f"label {sample.label} outside [0, {self.num_classes})"
        return f"shard {sample.url} key {sample.key}: target policy 'label' but the sample {reason}"

    def compute(self, images: Tensor, samples: Sequence[DecodedSample], sink: ExplainSink) -> ExplainedBatch:
        if self.job.mode == "self-supervised":
            result, predicted, score = self._explain_features(images, samples)
        else:
            target = None
            if self.job.target == "label":
                target = torch.tensor([s.label for s in samples], device=self.device)
            result = self.daam(images, target=target)
            score, predicted = result.output.softmax(dim=-1).max(dim=-1)
        box_mask = None
        if any(s.boxes is not None and len(s.boxes) for s in samples):
            boxes = [s.boxes if s.boxes is not None else torch.zeros(0, 4) for s in samples]
            box_mask = boxes_to_grid_mask(boxes, self.input_size, self.layout.grid, self.device)
        explained = self.explainers.explain(images, result) if self.explainers else {}
        final_maps = {name: maps.final for name, maps in explained.items()}  # each explainer's map, (B, h, w)
        explainer_stats = {
            name: explainer_statistics(maps.blocks, box_mask, final=maps.final if maps.top_down else None)
            for name, maps in explained.items()
            if maps.blocks is not None
        }
        evaluation = {}
        if self.job.evaluate is not None:
            evaluation = evaluate_batch(
                self.model,
                images,
                result.daam,
                result.target,
                box_mask,
                self.job.evaluate,
                generator=sink.generator,
                autocast_dtype=self.daam.autocast_dtype,
                explainer_maps=final_maps,
            )
        computed = {
            "block_maps": result.block_maps,
            "daam": result.daam,
            "coefficients": result.coefficients,
            **{array: values for maps in explained.values() for array, values in maps.arrays.items()},
        }
        bits = significant_bits(self.job.output.dtype)
        stored = {name: computed[name] for name in self.job.store_options.arrays}
        return ExplainedBatch(
            arrays={name: round_significant(maps, bits) for name, maps in stored.items()} if bits else stored,
            predicted=predicted,
            score=score,
            target=result.target,
            block_stats=block_statistics(result.block_maps, result.daam, result.coefficients, box_mask),
            explainer_block_stats=explainer_stats,
            evaluation=evaluation,
        )

    def _explain_features(self, images: Tensor, samples: Sequence[DecodedSample]) -> tuple[DAAMResult, Tensor, Tensor]:
        """Self-supervised DAAM: Y = <f, w> with the memory bank's weights, queried inside the same pass."""
        if self._bank is None:
            self._bank = load_bank(self.job, self.device)
        bank, rows = self._bank
        exclude = None
        if self.job.bank.exclude_self:
            exclude = torch.tensor([rows.get(s.key, -1) for s in samples], device=self.device)
        queries = []

        def weigh(features: Tensor) -> Tensor:
            queries.append(bank.query(features, exclude=exclude))
            return queries[-1].weights

        result = self.daam(images, weights=weigh)
        knn = queries[-1]
        if knn.predicted is not None:
            return result, knn.predicted, knn.vote_share
        none = torch.full((len(samples),), -1, device=self.device)  # label-free bank: no vote, no predicted class
        return result, none, torch.full((len(samples),), float("nan"), device=self.device)

    def close(self) -> None:
        if self.explainers is not None:
            self.explainers.remove()
        self.daam.close()
