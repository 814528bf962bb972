"""The explain stage: DAAM (and the comparison explainers, statistics and evaluation) of every sample of a unit."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pipeline.config import EvaluationConfig, JobConfig
from pipeline.data.decode import DecodedSample
from pipeline.engine.daam import DAAM, DAAMResult
from pipeline.engine.explainers import ExplainerMaps, Explainers
from pipeline.evaluate import evaluate_batch
from pipeline.models import model_data_config
from pipeline.sanity import CascadingRandomisation, map_similarity
from pipeline.stages.base import UnitState, compute_dtype
from pipeline.stats import block_statistics, boxes_to_grid_mask, explainer_statistics
from pipeline.store.bank import load_bank
from pipeline.store.lease import Fence
from pipeline.store.output import job_output
from pipeline.store.unit_writer import ExplainedBatch, UnitWriter, encoding_slots
from pipeline.store.units import unit_name
from pipeline.store.zarr_store import MapLayout, MapStore, round_significant, significant_bits

__all__ = ["ExplainStage"]


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

    def __init__(self, job: JobConfig, model: nn.Module, device: torch.device, input_size: tuple[int, int]) -> None:
        self.job = job
        self.model = model
        self.device = device
        self.input_size = input_size
        self.daam = DAAM(model, autocast_dtype=compute_dtype(job.dtype)).open()
        self.explainers = Explainers(self.daam, job.comparison_explainers) if job.comparison_explainers else None
        self.layout = MapLayout(
            model=job.model.shown_name,
            n_blocks=self.daam.num_blocks,
            grid=self.daam.grid_size(input_size),
            channels=self.daam.num_heads * self.daam.head_dim,
            prefix_tokens=self.daam.num_prefix_tokens,
        )
        self.num_classes = getattr(model, "num_classes", 0)
        data_config = model_data_config(model)
        self.mean, self.std = tuple(data_config["mean"]), tuple(data_config["std"])  # the worker's normalisation
        self._bank = None  # self-supervised jobs: loaded on first use, once the bank stage has built it
        self._maps: MapStore | None = None  # the output's maps.zarr, opened by the first unit
        self._encoding = encoding_slots()  # the worker's commits take turns to encode (UnitWriter)
        evaluate = job.evaluate
        self.cascade = None
        if evaluate is not None and evaluate.sanity == "cascading":
            self.cascade = CascadingRandomisation(model.blocks, evaluate.seed)
            self._units = [unit_name(url) for url in job.shard_urls()]
            self._sanity_left: dict[str, int] = {}  # unit -> samples its sanity check still re-explains

    def open_unit(self, unit: str, url: str, *, fresh: bool = False, fence: Fence | None = None) -> UnitState:
        output = job_output(self.job)
        if self._maps is None:  # one per worker: the root attributes are checked once
            self._maps = MapStore(output.child("maps.zarr"))
        writer = UnitWriter(
            output,
            unit,
            self.layout,
            shard=url,
            job=self.job.name,
            store_options=self.job.store_options,
            maps=self._maps,
            fresh=fresh,
            fence=fence,
            encoding=self._encoding,
        )
        generator = None
        if self.job.evaluate is not None:  # independent random reference maps per unit, reproducible per unit
            seed = self.job.evaluate.seed + zlib.crc32(unit.encode())
            generator = torch.Generator(self.device).manual_seed(seed)
        if self.cascade is not None:
            self._sanity_left[unit] = self._sanity_quota(unit)
        return UnitState(writer, generator)

    def _sanity_quota(self, unit: str) -> int:
        """The unit's share of ``evaluate.sanity_samples``: spread evenly over the units in the job's order, the
        first units taking one more where it does not divide."""
        if unit not in self._units:
            return 0
        total, index = self.job.evaluate.sanity_samples, self._units.index(unit)
        return total // len(self._units) + (index < total % len(self._units))

    def _take_sanity(self, samples: Sequence[DecodedSample]) -> int:
        """How many of a batch's first samples the sanity check re-explains: what is left of their unit's quota
        (the unit of a batch is its samples' shard), counted as taken."""
        unit = unit_name(samples[0].url)
        taken = min(self._sanity_left.get(unit, 0), len(samples))
        self._sanity_left[unit] = self._sanity_left.get(unit, 0) - taken
        return taken

    def reject(self, sample: DecodedSample) -> str | None:
        """With target policy 'label', a sample without a usable label cannot be explained."""
        if self.job.target != "label" or (sample.label is not None and 0 <= sample.label < self.num_classes):
            return None
        reason = "has no label" if sample.label is None else f"label {sample.label} outside [0, {self.num_classes})"
        return f"shard {sample.url} key {sample.key}: target policy 'label' but the sample {reason}"

    def compute(
        self, images: Tensor, samples: Sequence[DecodedSample], generator: torch.Generator | None
    ) -> ExplainedBatch:
        if self.job.mode == "self-supervised":
            result, predicted, score = self._explain_features(images, samples)
            explained = self.explainers.explain(images, result) if self.explainers else {}
        else:
            target = None
            if self.job.target == "label":
                target = torch.tensor([s.label for s in samples], device=self.device)
            result, explained = self._explain(images, target)
            score, predicted = result.output.softmax(dim=-1).max(dim=-1)
        box_mask = self._box_mask(samples)
        masks = self._masks(samples)
        final_maps = {name: maps.final for name, maps in explained.items()}  # each explainer's map, (B, h, w)
        explainer_stats = {
            name: explainer_statistics(maps.blocks, box_mask, masks, final=maps.final if maps.top_down else None)
            for name, maps in explained.items()
            if maps.blocks is not None
        }
        evaluation = {}
        if self.job.evaluate is not None:
            options = dict(generator=generator, box_mask=box_mask, masks=masks)
            evaluation = self.evaluate(images, samples, result.daam, result.target, final_maps, **options)
        sanity = {}
        if self.cascade is not None and (count := self._take_sanity(samples)):
            trained = {"daam": result.daam, **{name: maps.through_final for name, maps in explained.items()}}
            sanity = self._sanity(images[:count], result.target[:count], {k: v[:count] for k, v in trained.items()})
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
            block_stats=block_statistics(result.block_maps, result.daam, result.coefficients, box_mask, masks),
            explainer_block_stats=explainer_stats,
            evaluation=evaluation,
            sanity=sanity,
            rounded=True,
        )

    def evaluate(
        self,
        images: Tensor,
        samples: Sequence[DecodedSample],
        daam: Tensor,
        target: Tensor | None,
        final_maps: dict[str, Tensor],
        *,
        config: EvaluationConfig | None = None,
        generator: torch.Generator | None = None,
        box_mask: Tensor | None = None,
        masks: Tensor | None = None,
    ) -> dict[str, dict[str, Tensor]]:
        """The job's evaluation of a batch's final maps (:func:`~pipeline.evaluate.evaluate_batch`): what
        :meth:`compute` stores, and what ``daam-pipeline evaluate`` computes again from stored maps.

        Args:
            images: The batch's model input.
            samples: Its samples (boxes, masks and labels come from them).
            daam: ``(B, L, h, w)``, of which ``daam[:, -1]`` is evaluated.
            target: The explained classes (None in self-supervised mode).
            final_maps: The comparison explainers' final maps ``(B, h, w)``.
            config: Default the job's ``evaluate:`` section.
            generator: The unit's random stream (the random reference maps).
            box_mask, masks: Already made from ``samples`` (made here when None).
        """
        labels = torch.tensor([-1 if s.label is None else s.label for s in samples], device=self.device)
        return evaluate_batch(
            self.model,
            images,
            daam,
            target,
            box_mask if box_mask is not None else self._box_mask(samples),
            config or self.job.evaluate,
            generator=generator,
            autocast_dtype=self.daam.autocast_dtype,
            explainer_maps=final_maps,
            masks=masks if masks is not None else self._masks(samples),
            labels=labels,
            mean=self.mean,
            std=self.std,
        )

    def _box_mask(self, samples: Sequence[DecodedSample]) -> Tensor | None:
        """``(B, h, w)`` patches inside each sample's boxes, None when no sample has a box."""
        if not any(s.boxes is not None and len(s.boxes) for s in samples):
            return None
        boxes = [s.boxes if s.boxes is not None else torch.zeros(0, 4) for s in samples]
        return boxes_to_grid_mask(boxes, self.input_size, self.layout.grid, self.device)

    def _explain(self, images: Tensor, target: Tensor | None) -> tuple[DAAMResult, dict[str, ExplainerMaps]]:
        """DAAM of the batch and the comparison explainers' maps of the same score."""
        result = self.daam(images, target=target)
        return result, self.explainers.explain(images, result) if self.explainers else {}

    def _masks(self, samples: Sequence[DecodedSample]) -> Tensor | None:
        """``(B, H, W)`` float object masks on the device (NaN for a sample without one), None when none has one."""
        if all(s.mask is None for s in samples):
            return None
        unknown = torch.full(self.input_size, float("nan"))
        return torch.stack([unknown if s.mask is None else s.mask.float() for s in samples]).to(self.device)

    def _sanity(self, images: Tensor, target: Tensor, trained: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
        """Cascading randomisation: ``{explainer: {"spearman"|"ssim": (S, L, L')}}``, similarities of the maps
        after each randomisation step (1 .. L blocks randomised from the top) to the trained model's maps."""
        steps = []
        for _ in self.cascade.steps():
            result, explained = self._explain(images, target)
            maps = {"daam": result.daam, **{name: maps.through_final for name, maps in explained.items()}}
            steps.append({name: map_similarity(maps[name], trained[name], self.input_size) for name in trained})
        return {
            name: {column: torch.stack([step[name][column] for step in steps], dim=1) for column in steps[0][name]}
            for name in trained
        }

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
