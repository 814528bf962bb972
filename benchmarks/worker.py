"""The worker loop end to end against the engine alone, and bytes per image on disk.

    python benchmarks/worker.py --model vit_tiny_patch16_224 --images 96 --batch 16

Writes local WebDataset shards of ImageNet-size JPEGs (500x375, textured, ~100 KB), then in one process:
1. engine alone: DAAM on already decoded, preprocessed batches resident on the device (the same batches);
2. worker loop: the units through the worker as the runner drives it in one process (LocalPool): read, decode,
   preprocess, copy, DAAM, statistics on the device, one packed copy to the host, Zarr and Parquet writes, commit;
   the next unit's decoding and the last one's commit overlap the computation.
It prints images/s of both, their ratio, and the bytes per image of the outputs (maps.zarr and the Parquet tables).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import numpy as np
import torch
from PIL import Image

from pipeline.config import JobConfig, parse_job
from pipeline.data.shards import ShardSample, write_shards
from pipeline.runner.pools import LocalPool
from pipeline.worker import UnitWorker


def photo_like_jpeg(rng: np.random.Generator, width: int = 500, height: int = 375) -> bytes:
    """A JPEG with smooth structure plus grain, about the size of an ImageNet photo."""
    coarse = rng.random((height // 25 + 1, width // 25 + 1, 3)) * 255
    image = Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(image).astype(np.int16) + rng.integers(-40, 40, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_benchmark_shards(folder: Path, images: int, per_shard: int, seed: int = 0) -> list[str]:
    """Shards of photo-like JPEGs (made in threads, each from its own seed); a folder written earlier with the same
    arguments is reused, so the benchmarks of one run share their shards."""
    recipe = {"images": images, "per_shard": per_shard, "seed": seed}
    stamp = folder / "benchmark.json"
    if not (stamp.exists() and json.loads(stamp.read_text()) == recipe):

        def sample(i: int) -> ShardSample:
            rng = np.random.default_rng((seed, i))
            label = int(rng.integers(0, 1000))
            return ShardSample(f"img_{i:06d}", photo_like_jpeg(rng), "jpg", label, {"width": 500, "height": 375})

        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            samples = list(pool.map(sample, range(images)))
        shutil.rmtree(folder, ignore_errors=True)
        write_shards(samples, folder, samples_per_shard=per_shard)
        stamp.write_text(json.dumps(recipe))
    return sorted(str(p) for p in folder.glob("*.tar"))


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


OVERLAP = {  # (workers.units_in_flight, data.prefetch_batches, workers.commits_in_flight)
    "auto": ("auto", "auto", "auto"),  # the job defaults: on a GPU two units in flight, two batches ahead; on the CPU
    # neither; a commit beside the next unit (one on a local disk)
    "sequential": (1, 0, 0),  # one unit at a time, decoding as the model asks, committing before the next
}


def make_job(
    model: str,
    shards: list[str],
    decoder: str,
    threads: int,
    batch: int,
    dtype: str,
    out: Path,
    overlap: str = "auto",
) -> JobConfig:
    units, prefetch, commits = OVERLAP[overlap]
    return parse_job(
        dict(
            name=f"bench-{decoder}",
            model=dict(name=model, num_classes=1000),
            data=dict(
                shards=shards, decoder=decoder, decode_threads=threads, preprocess="crop", prefetch_batches=prefetch
            ),
            batch_size=batch,
            dtype=dtype,
            output=dict(path=str(out)),
            workers=dict(units_in_flight=units, commits_in_flight=commits),
        )
    )


def measure(job: JobConfig, shards: list[str], device: str) -> dict:
    with UnitWorker(job, device) as worker:
        sync = torch.cuda.synchronize if worker.device.type == "cuda" else (lambda: None)
        with worker.prefetch_batches(shards[0]) as ready:  # warm-up: decoder start (nvjpeg), threads
            next(ready)

        start = time.perf_counter()
        resident = []
        for url in shards:
            with worker.prefetch_batches(url) as ready:
                resident += [batch.pixels.to(worker.device, non_blocking=True) for batch in ready]
        sync()
        decode_s = time.perf_counter() - start
        images = [worker.model_input(pixels) for pixels in resident]

        engine = worker.stages["explain"].daam
        engine(images[0])  # warm-up
        sync()
        start = time.perf_counter()
        for batch in images:
            engine(batch)
        sync()
        engine_s = time.perf_counter() - start

        start = time.perf_counter()
        markers = [outcome.marker for outcome in LocalPool(job, worker=worker).run("explain", shards)]
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


def benchmark_options(command):
    """The options every worker-loop benchmark takes."""
    options = [
        click.option("--model", default="vit_tiny_patch16_224", show_default=True),
        click.option("--images", default=96, show_default=True),
        click.option("--per-shard", default=48, show_default=True),
        click.option("--batch", default=16, show_default=True),
        click.option("--dtype", default="float32", type=click.Choice(["float32", "bfloat16"]), show_default=True),
        click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu", show_default=True),
        click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu x{torch.get_num_threads()}"


@click.command()
@benchmark_options
@click.option("--decode-threads", default=max(1, (os.cpu_count() or 2) - 1), show_default=True)
@click.option(
    "--overlap",
    "modes",
    multiple=True,
    type=click.Choice(sorted(OVERLAP)),
    default=["auto"],
    show_default=True,
    help="auto: the job defaults (overlapped units and prefetching on a GPU); sequential: one unit at a time, "
    "decoding as the model asks. Repeat to compare.",
)
def main(model, images, per_shard, batch, dtype, device, workdir, decode_threads, modes) -> None:
    """Print worker-loop and engine-alone throughput, their ratio, and output bytes per image."""
    workdir = workdir or Path(tempfile.mkdtemp(prefix="daam-worker-bench-"))
    shards = write_benchmark_shards(workdir / "shards", images, per_shard)
    print(
        f"{'model':24} {'dtype':9} {'batch':>5} {'overlap':>10} {'engine img/s':>13} {'worker img/s':>13} {'ratio':>6}",
        flush=True,
    )
    for mode in modes:
        out = workdir / f"out-{mode}"
        r = measure(make_job(model, shards, "pil", decode_threads, batch, dtype, out, mode), shards, device)
        print(
            f"{model:24} {dtype:9} {batch:>5} {mode:>10} {r['engine_images_per_s']:>13.1f} "
            f"{r['worker_images_per_s']:>13.1f} {r['ratio']:>6.3f}",
            flush=True,
        )
    n = r["images"]
    maps_bytes = folder_bytes(out / "maps.zarr")
    table_bytes = folder_bytes(out / "samples") + folder_bytes(out / "blocks")
    print(
        f"bytes per image: maps.zarr {maps_bytes / n / 1024:.1f} KB, Parquet {table_bytes / n / 1024:.1f} KB, "
        f"total {(maps_bytes + table_bytes) / n / 1024:.1f} KB ({n} images in {len(shards)} shards, default float16 "
        "+ zstd)"
    )
    print(f"device: {device_name(device)}; decode threads {decode_threads}; outputs in {workdir}")


if __name__ == "__main__":
    main()
