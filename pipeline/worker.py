"""One unit of work: stream a shard -> decode -> explain -> statistics -> write -> commit.

A :class:`UnitWorker` loads the model once and then processes units; a Ray actor wraps one, and the single-process
path of the runner uses one directly. Per batch the whole computation stays on the device and one packed result
moves to the host; reading and decoding run ahead in a prefetch thread and writes run behind in a writer thread.
On a GPU two units may be processed from two threads at once: the device is held by one unit at a time, so the
next unit's reading and decoding and the previous unit's commit (Parquet, fsyncs, marker) overlap the computation.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import torch

from pipeline.config import JobConfig
from pipeline.data.decode import DecodedSample, Preprocess, batches, decode_stream
from pipeline.data.prefetch import Prefetcher
from pipeline.data.stream import iter_shard
from pipeline.engine.baselines import Baselines
from pipeline.engine.daam import DAAM
from pipeline.engine.transfer import to_host
from pipeline.errors import ConfigError, PipelineError, ShardError, UnitFailedError
from pipeline.evaluate import METHODS, evaluate_batch
from pipeline.models import create_model, model_data_config
from pipeline.stats import block_statistics, boxes_to_grid_mask, explainer_statistics
from pipeline.store.commit import UnitWriter
from pipeline.store.zarr_store import MapLayout, StoreOptions

__all__ = ["UnitWorker", "resolve_device", "unit_name", "units_in_flight"]

_log = logging.getLogger(__name__)


def units_in_flight(job: JobConfig, device: torch.device | str) -> int:
    """Units a worker holds at once (``workers.units_in_flight``). ``auto``: on a GPU two, one on the device while
    the other commits or prefetches; on the CPU one, since there the computation uses the cores that the
    overlapped work would need."""
    return _on_device(job.workers.units_in_flight, device, gpu=2, cpu=1)


def _on_device(value: int | str, device: torch.device | str, *, gpu: int, cpu: int) -> int:
    """A job's ``auto``-or-number setting: the number, or its ``auto`` value on this device."""
    if value != "auto":
        return int(value)
    return gpu if torch.device(device).type == "cuda" else cpu


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
        self._device_lock = threading.Lock()  # one unit computes at a time; commits and prefetching overlap it
        self._prefetch_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

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
        """Process one unit of a stage: ``explain`` (maps and statistics) or ``bank`` (memory bank features).

        Safe to call from two threads at once (the Ray actor and the single-process runner do): the units take
        turns on the device while one's commit and the other's prefetching overlap.
        """
        if stage == "bank":
            from pipeline.bank_stage import encode_unit

            with self._device_lock:
                return encode_unit(self, url, attempt=attempt)
        return self.process_unit(url, attempt=attempt)

    def run_units(self, stage: str, urls: Sequence[str]) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
        """Process units in order, :func:`units_in_flight` at a time as a Ray actor does (see :meth:`run`).

        Yields:
            (url, commit marker, None), or (url, None, error message) for a unit that raised a PipelineError.
        """
        with ThreadPoolExecutor(units_in_flight(self.job, self.device), thread_name_prefix="unit") as pool:
            futures = deque((url, pool.submit(self.run, stage, url)) for url in urls)
            try:
                while futures:
                    url, future = futures.popleft()
                    try:
                        yield url, future.result(), None
                    except PipelineError as e:
                        yield url, None, str(e)
            finally:
                for _, future in futures:
                    future.cancel()

    def process_unit(self, url: str, *, attempt: int = 0) -> dict[str, Any]:
        """Explain every sample of the shard at ``url`` and commit the unit.

        Reading and decoding start at once; the computation waits until the device is free; the commit (durable
        tables and maps, then the marker) runs after the device is released.

        Returns:
            The commit marker: counts of samples, ok and failed, timings (``seconds``: holding the device;
            ``wait_seconds``: waiting for it), and ``shard_error`` when the shard itself was truncated or corrupt
            after some samples (those are kept).

        Raises:
            UnitFailedError: more samples failed than the job's error policy allows.
        """
        unit = unit_name(url)
        arrived = time.perf_counter()
        failed: deque[DecodedSample] = deque()
        with self.prefetch_batches(url, failed) as ready:
            writer = UnitWriter(
                self.job.output.path, unit, self.layout, shard=url, job=self.job.name, store_options=self.store_options
            )
            with self._device_lock:
                start = time.perf_counter()
                summary = self._explain_unit(unit, url, ready, failed, writer, attempt)
                seconds = time.perf_counter() - start
        total = writer.failed + writer.ok
        if total and writer.failed / total > self.job.errors.max_failed_fraction:
            raise UnitFailedError(
                f"unit {unit}: {writer.failed} of {total} samples failed, more than errors.max_failed_fraction="
                f"{self.job.errors.max_failed_fraction}"
            )
        return writer.commit({**summary, "seconds": seconds, "wait_seconds": start - arrived})

    def _explain_unit(
        self,
        unit: str,
        url: str,
        ready: Iterator[tuple[torch.Tensor, list[DecodedSample]]],
        failed: deque[DecodedSample],
        writer: UnitWriter,
        attempt: int,
    ) -> dict[str, Any]:
        """The unit's batches through the engine, their results handed to the writer thread; holds the device."""
        if self.job.evaluate is not None:  # independent random reference maps per unit, reproducible per unit
            seed = self.job.evaluate.seed + zlib.crc32(unit.encode())
            self._generator = torch.Generator(self.device).manual_seed(seed)
        shard_error = None
        pending: Future | None = None
        compute_s = 0.0
        try:
            for index, (pixels, samples) in enumerate(ready):
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
        summary = dict(url=url, attempt=attempt, compute_seconds=compute_s, device=str(self.device))
        if shard_error:
            summary["shard_error"] = shard_error
        return summary

    def prefetch_batches(
        self, url: str, failed: deque[DecodedSample]
    ) -> Prefetcher[tuple[torch.Tensor, list[DecodedSample]]]:
        """The unit's batches of good samples, read, decoded and collated.

        ``data.prefetch_batches`` batches ahead in a background thread started now (``auto``: two on a GPU; none
        on the CPU, where decoding and the model share the cores). On a GPU, host pixels are pinned for the copy
        and device pixels (the torchvision decoder) are made on a stream of their own. Hand each batch to
        :meth:`model_input`.

        Failed samples are appended to ``failed`` before the batch that follows them; a :class:`ShardError`
        (truncated shard) comes after the batches of the samples read before it. Close the prefetcher (``with``)
        when leaving early.
        """
        stream = self._prefetch_stream

        def produce() -> Iterator[tuple[torch.Tensor, list[DecodedSample]]]:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                for pixels, samples in batches(self._decode(url), self.job.batch_size, on_error=failed.append):
                    if stream is not None and pixels.device.type == "cpu":
                        pixels = pixels.pin_memory()
                    elif stream is not None:
                        stream.synchronize()  # decoded and collated before the model's stream reads it
                    yield pixels, samples

        depth = _on_device(self.job.data.prefetch_batches, self.device, gpu=2, cpu=0)
        return Prefetcher(produce(), depth, name=f"prefetch-{unit_name(url)}")

    def model_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """A prefetched batch's pixels as the model's normalised input on the device."""
        if pixels.device.type == "cuda":  # made on the prefetch stream: keep its memory until this stream is done
            pixels.record_stream(torch.cuda.current_stream(pixels.device))
        return self.preprocess.normalize(pixels.to(self.device, non_blocking=True))

    def _decode(self, url: str) -> Iterator[DecodedSample]:
        """The unit's samples through the job's decoder: PIL in threads (host pixels), or torchvision in batches
        on the device (device pixels)."""
        data = self.job.data
        if data.decoder == "torchvision":
            from pipeline.data.gpu_decode import BatchDecoder, decode_batched

            decoder = BatchDecoder(
                self.preprocess, self.device, max_pixels=data.max_pixels, fallback_threads=data.decode_threads
            )
            decoded = decode_batched(iter_shard(url), decoder, chunk=self.job.batch_size)
        else:
            decoded = decode_stream(
                iter_shard(url),
                self.preprocess,
                threads=data.decode_threads,
                prefetch=max(self.job.batch_size, 4 * data.decode_threads),
                max_pixels=data.max_pixels,
            )
        return self._check_targets(decoded)

    def _check_targets(self, decoded: Iterator[DecodedSample]) -> Iterator[DecodedSample]:
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
        images = self.model_input(pixels)
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
    def _flush_failed(writer: UnitWriter, failed: deque[DecodedSample]) -> None:
        """Record the failed samples the prefetch thread has queued so far."""
        drained = [failed.popleft() for _ in range(len(failed))]
        if not drained:
            return
        rows = [
            dict(
                key=s.key,
                error=s.error,
                label=s.label,
                width=s.size[0] if s.size else None,
                height=s.size[1] if s.size else None,
            )
            for s in drained
        ]
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
