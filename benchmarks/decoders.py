"""JPEG decoders feeding the engine: PIL in threads against torchvision in batches on the device.

    python benchmarks/decoders.py                                    # CPU: a tiny ViT, 96 images
    python benchmarks/decoders.py --model vit_base_patch16_224 --dtype bfloat16 --batch 128 --pil-threads 16 \
        --images 2048 --per-shard 1024                               # GPU: nvjpeg against 16 PIL threads

Local WebDataset shards of ImageNet-size JPEGs (benchmarks/worker.py's; reused when ``--workdir`` already holds
them). For each ``data.decoder``, in one process:

1. decode alone: every shard into batches of model-input pixels on the device (read, decode, resize, crop, copy);
2. engine alone: DAAM on those batches, already resident on the device;
3. worker loop: the units through the worker (LocalPool) (decode, engine, statistics, writes, commit).

It prints images/s of each, worker loop / engine alone, and how far the two decoders' pixels are apart (mean
absolute difference in grey levels; resampler rounding, and nvjpeg's IDCT on a GPU).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import click
from worker import benchmark_options, device_name, make_job, measure, write_benchmark_shards


@click.command()
@benchmark_options
@click.option("--pil-threads", default=max(1, (os.cpu_count() or 2) - 1), show_default=True)
def main(model, images, per_shard, batch, dtype, device, workdir, pil_threads) -> None:
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
    name = device_name(device)
    print(
        f"{model} {dtype} batch {batch} on {name}; torchvision decodes on the device, PIL threads only for other "
        f"files; pixels apart by {diff.mean():.3f} grey levels on average (max {diff.max():.0f})"
    )


if __name__ == "__main__":
    main()
