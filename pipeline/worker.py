"""One unit of work: stream a shard -> decode -> explain -> statistics -> write -> commit.

A :class:`UnitWorker` loads the model once and then processes units one after another; a Ray actor wraps one, and
the single-process path of the runner uses one directly. Per batch the whole computation stays on the device and
one packed result moves to the host; decoding runs ahead in threads and writes run behind in a writer thread.
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import torch

from pipeline.config import JobConfig
from pipeline.data.decode import DecodedSample, Preprocess, batches, decode_stream
from pipeline.data.stream import iter_shard
from pipeline.engine.baselines import Baselines
from pipeline.engine.daam import DAAM
from pipeline.engine.transfer import to_host
from pipeline.errors import ConfigError, ShardError, UnitFailedError
from pipeline.evaluate import METHODS, evaluate_batch
from pipeline.models import create_model, model_data_config
from pipeline.stats import block_statistics, boxes_to_grid_mask, explainer_statistics
from pipeline.store.commit import UnitWriter
from pipeline.store.zarr_store import MapLayout, StoreOptions

__all__ = ["UnitWorker", "resolve_device", "unit_name"]

_log = logging.getLogger(__name__)

_AUTOCAST = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def unit_name(url: str) -> str:
    """The unit id of a shard: its file name without the ``.tar`` extension."""
    name = PurePosixPath(url.split("://", 1)[-1]).name
    return name[: -len(".tar")] if name.endswith(".tar") else name


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        _log.warning("job asks for device 'cuda' but this process sees no GPU; running on the CPU")
        return torch.device("cpu")
    return torch.device(device)


@dataclass
class _Fault:
    """Test hook: kill this process (as a crash would) after ``batches`` batches of ``unit``'s first attempt."""

    unit: str
    batches: int

    @classmethod
    def parse(cls, spec: str | None) -> _Fault | None:
        if not spec:
            return None
        unit, _, count = spec.rpartition(":")
        return cls(unit, int(count))


class UnitWorker:
    """Explains units of one job on one device; holds the model, the engine and the preprocessing.

    Args:
        job: The validated job.
        device: Where to run; default from the job (``auto``: a GPU when this process sees one).
        fault: ``UNIT:BATCHES`` test hook that kills the process mid-unit on its first attempt.
    """

    def __init__(self, job: JobConfig, device: str | torch.device | None = None, *, fault: str | None = None) -> None:
        self.job = job
        self.device = torch.device(device) if device is not None else resolve_device(job.device)
        torch.manual_seed(job.seed)
        spec = job.model
        self.model = create_model(
            spec.name,
            checkpoint=spec.checkpoint,
            pretrained=spec.pretrained,
            num_classes=spec.num_classes,
            model_kwargs=spec.kwargs,
        ).to(self.device)
        self.daam = DAAM(self.model, autocast_dtype=_AUTOCAST[job.dtype]).open()
        self.explainers = tuple(name for name in job.explainers if name != "daam")
        self.baselines = Baselines(self.daam, self.explainers) if self.explainers else None
        self.preprocess = Preprocess.from_data_config(model_data_config(self.model), job.data.preprocess)
        self.input_size = tuple(self.preprocess.size)
        self.layout = MapLayout(
            model=spec.name,
            n_blocks=self.daam.num_blocks,
            grid=self.daam.grid_size(self.input_size),
            channels=self.daam.num_heads * self.daam.head_dim,
            prefix_tokens=self.daam.num_prefix_tokens,
        )
        out = job.output
        self.store_options = StoreOptions(
            dtype=out.dtype,
            compressor=out.compressor,
            compression_level=out.compression_level,
            arrays=(*out.arrays, *self.explainers),
        )
        self.num_classes = getattr(self.model, "num_classes", 0)
        self._bank = None  # self-supervised jobs: loaded on first use, once the bank stage has built it
        self._fault = _Fault.parse(fault)
        self._check_evaluation()
        self._generator: torch.Generator | None = None  # random reference maps, reseeded per unit
        self._writer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unit-writer")

    def _check_evaluation(self) -> None:
        config = self.job.evaluate
        if config is not None and "faithfulness" in config.metrics and self.job.mode == "self-supervised":
            raise ConfigError(
                "evaluate.metrics: deletion/insertion ('faithfulness') follows the probability of an explained class, "
                "and a self-supervised job explains <f, w>; use metrics: [localisation]"
            )

    def bank(self):
        """The job's memory bank and each bank key's row, loaded once."""
        if self._bank is None:
            from pipeline.bank_stage import load_bank

            self._bank = load_bank(self.job, self.device)
        return self._bank

    def run(self, stage: str, url: str, *, attempt: int = 0) -> dict[str, Any]:
        """Process one unit of a stage: ``explain`` (maps and statistics) or ``bank`` (memory bank features)."""
        if stage == "bank":
            from pipeline.bank_stage import encode_unit

            return encode_unit(self, url, attempt=attempt)
        return self.process_unit(url, attempt=attempt)

    def process_unit(self, url: str, *, attempt: int = 0) -> dict[str, Any]:
        """Explain every sample of the shard at ``url`` and commit the unit.

        Returns:
            The commit marker: counts of samples, ok and failed, timings, and ``shard_error`` when the shard
            itself was truncated or corrupt after some samples (those are kept).

        Raises:
            UnitFailedError: more samples failed than the job's error policy allows.
        """
        unit = unit_name(url)
        start = time.perf_counter()
        if self.job.evaluate is not None:  # independent random reference maps per unit, reproducible per unit
            seed = self.job.evaluate.seed + zlib.crc32(unit.encode())
            self._generator = torch.Generator(self.device).manual_seed(seed)
        writer = UnitWriter(
            self.job.output.path, unit, self.layout, shard=url, job=self.job.name, store_options=self.store_options
        )
        failed: list[DecodedSample] = []
        shard_error = None
        pending: Future | None = None
        compute_s = 0.0
        try:
            for index, (pixels, samples) in enumerate(self._batches(url, failed)):
                tick = time.perf_counter()
                host = self._explain(pixels, samples)
                compute_s += time.perf_counter() - tick
                if pending is not None:
                    pending.result()  # at most one batch waits to be written
                pending = self._writer_thread.submit(self._write, writer, samples, host)
                self._flush_failed(writer, failed)
                if self._fault and attempt == 0 and unit == self._fault.unit and index + 1 >= self._fault.batches:
                    pending.result()
                    _log.error("fault injection: killing worker %d in unit %s", os.getpid(), unit)
                    os._exit(137)
        except ShardError as e:
            shard_error = str(e)
            _log.error("%s", e)
        if pending is not None:
            pending.result()
        self._flush_failed(writer, failed)
        total = writer.failed + writer.ok
        if total and writer.failed / total > self.job.errors.max_failed_fraction:
            raise UnitFailedError(
                f"unit {unit}: {writer.failed} of {total} samples failed, more than errors.max_failed_fraction="
                f"{self.job.errors.max_failed_fraction}"
            )
        seconds = time.perf_counter() - start
        summary = dict(url=url, attempt=attempt, seconds=seconds, compute_seconds=compute_s, device=str(self.device))
        if shard_error:
            summary["shard_error"] = shard_error
        return writer.commit(summary)

    def _batches(self, url: str, failed: list[DecodedSample]) -> Iterator[tuple[torch.Tensor, list[DecodedSample]]]:
        decoded = self._decode(url)
        yield from batches(self._check_targets(decoded, failed), self.job.batch_size, on_error=failed.append)

    def _decode(self, url: str) -> Iterator[DecodedSample]:
        """The unit's samples through the job's decoder: PIL in threads (host pixels), or torchvision in batches
        on the device (device pixels)."""
        data = self.job.data
        if data.decoder == "torchvision":
            from pipeline.data.gpu_decode import BatchDecoder, decode_batched

            decoder = BatchDecoder(
                self.preprocess, self.device, max_pixels=data.max_pixels, fallback_threads=data.decode_threads
            )
            return decode_batched(iter_shard(url), decoder, chunk=self.job.batch_size)
        return decode_stream(iter_shard(url), self.preprocess, threads=data.decode_threads, max_pixels=data.max_pixels)

    def _check_targets(self, decoded: Iterator[DecodedSample], failed: list[DecodedSample]) -> Iterator[DecodedSample]:
        """With target policy 'label', a sample without a usable label fails here, naming its key."""
        if self.job.target != "label":
            yield from decoded
            return
        for sample in decoded:
            if sample.error is None and (sample.label is None or not 0 <= sample.label < self.num_classes):
                reason = (
                    "has no label" if sample.label is None else f"label {sample.label} outside [0, {self.num_classes})"
                )
                sample.error = f"shard {sample.url} key {sample.key}: target policy 'label' but the sample {reason}"
                sample.pixels = None
            yield sample

    def _explain(self, pixels: torch.Tensor, samples: list[DecodedSample]) -> dict[str, torch.Tensor]:
        """DAAM and statistics of one batch on the device; one packed copy back to the host."""
        if self.device.type == "cuda" and pixels.device.type == "cpu":  # data.decoder torchvision: already there
            pixels = pixels.pin_memory()
        images = self.preprocess.normalize(pixels.to(self.device, non_blocking=True))
        if self.job.mode == "self-supervised":
            bank, rows = self.bank()
            exclude = None
            if self.job.bank.exclude_self:
                exclude = torch.tensor([rows.get(s.key, -1) for s in samples], device=self.device)
            query: dict[str, Any] = {}

            def weigh(features: torch.Tensor) -> torch.Tensor:
                query["result"] = bank.query(features, exclude=exclude)
                return query["result"].weights

            result = self.daam(images, weights=weigh)
            knn = query["result"]
            if knn.predicted is not None:
                predicted, score = knn.predicted, knn.vote_share
            else:  # label-free bank: no vote, no predicted class
                predicted = torch.full((len(samples),), -1, device=self.device)
                score = torch.full((len(samples),), float("nan"), device=self.device)
        else:
            target = None
            if self.job.target == "label":
                target = torch.tensor([s.label for s in samples], device=self.device)
            result = self.daam(images, target=target)
            probabilities = result.output.softmax(dim=-1)
            score, predicted = probabilities.max(dim=-1)
        box_mask = None
        if any(s.boxes is not None and len(s.boxes) for s in samples):
            boxes = [s.boxes if s.boxes is not None else torch.zeros(0, 4) for s in samples]
            box_mask = boxes_to_grid_mask(boxes, self.input_size, self.layout.grid, self.device)
        stats = block_statistics(result.block_maps, result.daam, result.coefficients, box_mask)
        explainer_maps = self.baselines.maps() if self.baselines else {}
        explainer_stats = {
            f"xstat:{name}:{stat}": value
            for name, maps in explainer_maps.items()
            if maps.shape[1] > 1  # per-block maps (rollout, attention)
            for stat, value in explainer_statistics(maps, box_mask).items()
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
                generator=self._generator,
                autocast_dtype=self.daam.autocast_dtype,
                explainer_maps={name: maps[:, -1] for name, maps in explainer_maps.items()},
            )
        device_results = {
            "block_maps": result.block_maps,
            "daam": result.daam,
            "coefficients": result.coefficients,
            "predicted": predicted,
            "score": score,
            **({"target": result.target} if result.target is not None else {}),
            **{f"stat:{k}": v for k, v in stats.items()},
            **{f"eval:{k}": v for k, v in evaluation.items()},
            **{f"explainer:{name}": maps if maps.shape[1] > 1 else maps[:, 0] for name, maps in explainer_maps.items()},
            **explainer_stats,
        }
        return to_host(device_results)

    def _write(self, writer: UnitWriter, samples: list[DecodedSample], host: dict[str, torch.Tensor]) -> None:
        target = host.get("target")
        rows = [
            dict(
                label=s.label,
                predicted=int(host["predicted"][i]) if host["predicted"][i] >= 0 else None,
                score=float(host["score"][i]) if not host["score"][i].isnan() else None,
                target=int(target[i]) if target is not None else None,
                width=s.size[0] if s.size else None,
                height=s.size[1] if s.size else None,
                n_boxes=len(s.boxes) if s.boxes is not None else 0,
            )
            for i, s in enumerate(samples)
        ]
        stats = {k.removeprefix("stat:"): v.numpy() for k, v in host.items() if k.startswith("stat:")}
        keys = [s.key for s in samples]
        explainer_maps = {
            k.removeprefix("explainer:"): v.numpy() for k, v in host.items() if k.startswith("explainer:")
        }
        writer.write_batch(
            keys,
            host["block_maps"].numpy(),
            host["daam"].numpy(),
            host["coefficients"].numpy(),
            rows,
            stats,
            explainer_maps,
        )
        explainer_stats: dict[str, dict[str, Any]] = {}
        for name, values in host.items():
            if name.startswith("xstat:"):
                _, explainer, stat = name.split(":")
                explainer_stats.setdefault(explainer, {})[stat] = values.numpy()
        if explainer_stats:
            writer.write_explainer_blocks(keys, explainer_stats)
        evaluation = {k.removeprefix("eval:"): v.numpy() for k, v in host.items() if k.startswith("eval:")}
        if evaluation:
            writer.write_evaluation(keys, _by_method(evaluation, self.explainers))

    @staticmethod
    def _flush_failed(writer: UnitWriter, failed: list[DecodedSample]) -> None:
        if not failed:
            return
        rows = [
            dict(
                key=s.key,
                error=s.error,
                label=s.label,
                width=s.size[0] if s.size else None,
                height=s.size[1] if s.size else None,
            )
            for s in failed
        ]
        failed.clear()
        writer.write_failed(rows)

    def close(self) -> None:
        self._writer_thread.shutdown(wait=True)
        if self.baselines is not None:
            self.baselines.remove()
        self.daam.close()

    def __enter__(self) -> UnitWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _by_method(columns: dict[str, Any], explainers: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """evaluate_batch's prefixed columns (``random_deletion_auc``) -> {method: {metric: values}}."""
    prefixes = {**METHODS, **{name: f"{name}_" for name in explainers}}
    methods: dict[str, dict[str, Any]] = {}
    for name, values in columns.items():
        method = next(m for m, prefix in sorted(prefixes.items(), key=lambda i: -len(i[1])) if name.startswith(prefix))
        methods.setdefault(method, {})[name.removeprefix(prefixes[method])] = values
    return methods
