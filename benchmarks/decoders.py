"""JPEG decoders feeding the engine: PIL in threads against torchvision in batches on the device.

    python benchmarks/decoders.py                                    # CPU: a tiny ViT, 96 images
    python benchmarks/decoders.py --model vit_base_patch16_224 --dtype bfloat16 --batch 128 --pil-threads 16 \
        --images 2048 --per-shard 1024                               # GPU: nvjpeg against 16 PIL threads

Local WebDataset shards of ImageNet-size JPEGs (benchmarks/worker.py's; reused when ``--workdir`` already holds
them). For each ``data.decoder``, in one process:

1. decode alone: every shard into batches of model-input pixels on the device (read, decode, resize, crop, copy);
2. engine alone: DAAM on those batches, already resident on the device;
3. worker loop: UnitWorker.process_unit over the shards (decode, engine, statistics, writes, commit).

It prints images/s of each, worker loop / engine alone, and how far the two decoders' pixels are apart (mean
absolute difference in grey levels; resampler rounding, and nvjpeg's IDCT on a GPU).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import click
import torch
from worker import write_benchmark_shards

from pipeline.config import JobConfig, parse_job
from pipeline.worker import UnitWorker


def make_job(model: str, shards: list[str], decoder: str, threads: int, batch: int, dtype: str, out: Path) -> JobConfig:
    return parse_job(
        dict(
            name=f"decoders-{decoder}",
            model=dict(name=model, num_classes=1000),
            data=dict(shards=shards, decoder=decoder, decode_threads=threads, preprocess="crop"),
            batch_size=batch,
            dtype=dtype,
            output=dict(path=str(out)),
        )
    )


def measure(job: JobConfig, shards: list[str], device: str) -> dict:
    with UnitWorker(job, device) as worker:
        sync = torch.cuda.synchronize if worker.device.type == "cuda" else (lambda: None)
        next(worker._batches(shards[0], []))  # warm-up: decoder start (nvjpeg), threads

        start = time.perf_counter()
        resident = [
            pixels.to(worker.device, non_blocking=True) for url in shards for pixels, _ in worker._batches(url, [])
        ]
        sync()
        decode_s = time.perf_counter() - start
        images = [worker.preprocess.normalize(pixels) for pixels in resident]

        worker.daam(images[0])  # warm-up
        sync()
        start = time.perf_counter()
        for batch in images:
            worker.daam(batch)
        sync()
        engine_s = time.perf_counter() - start

        start = time.perf_counter()
        markers = [worker.process_unit(url) for url in shards]
        sync()
        loop_s = time.perf_counter() - start
    n = sum(len(p) for p in resident)
    assert n == sum(m["ok"] for m in markers), "every benchmark image decodes"
    return dict(
        decoder=job.data.decoder,
        threads=job.data.decode_threads,
        images=n,
        decode_images_per_s=n / decode_s,
        engine_images_per_s=n / engine_s,
        worker_images_per_s=n / loop_s,
        ratio=engine_s / loop_s,
        first_batch=resident[0].cpu(),
    )


@click.command()
@click.option("--model", default="vit_tiny_patch16_224", show_default=True)
@click.option("--images", default=96, show_default=True)
@click.option("--per-shard", default=48, show_default=True)
@click.option("--batch", default=16, show_default=True)
@click.option("--dtype", default="float32", type=click.Choice(["float32", "bfloat16"]), show_default=True)
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu", show_default=True)
@click.option("--pil-threads", default=max(1, (os.cpu_count() or 2) - 1), show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None)
def main(model, images, per_shard, batch, dtype, device, pil_threads, workdir) -> None:
    """Print decode-alone, engine-alone and worker-loop images/s of the PIL and torchvision decoders."""
    workdir = workdir or Path(tempfile.mkdtemp(prefix="daam-decoders-bench-"))
    shards = sorted(str(p) for p in (workdir / "shards").glob("*.tar"))
    if not shards:
        shards = write_benchmark_shards(workdir / "shards", images, per_shard)
    rows = [
        measure(make_job(model, shards, decoder, threads, batch, dtype, workdir / f"out-{decoder}"), shards, device)
        for decoder, threads in (("pil", pil_threads), ("torchvision", pil_threads))
    ]
    diff = (rows[0]["first_batch"].int() - rows[1]["first_batch"].int()).abs().float()
    print(
        f"{'decoder':12} {'threads':>7} {'images':>6} {'decode img/s':>13} {'engine img/s':>13} "
        f"{'worker img/s':>13} {'worker/engine':>13}"
    )
    for r in rows:
        print(
            f"{r['decoder']:12} {r['threads']:>7} {r['images']:>6} {r['decode_images_per_s']:>13.1f} "
            f"{r['engine_images_per_s']:>13.1f} {r['worker_images_per_s']:>13.1f} {r['ratio']:>13.3f}"
        )
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu x{torch.get_num_threads()}"
    print(
        f"{model} {dtype} batch {batch} on {name}; torchvision decodes on the device, PIL threads only for other "
        f"files; pixels apart by {diff.mean():.3f} grey levels on average (max {diff.max():.0f})"
    )


if __name__ == "__main__":
    main()
