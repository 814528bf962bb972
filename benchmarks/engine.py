"""DAAM engine throughput against the forward+backward floor of the same model, batch and dtype.

The floor: one batched forward pass and one backward pass from the top-1 logit down to the input images, with
frozen parameters. A DAAM map needs exactly that much work, so DAAM / floor is the engine's efficiency.

    python benchmarks/engine.py --model vit_small_patch16_224 --batch 16 --dtype float32 --device cpu

Rounds of floor and DAAM alternate so that both see the same machine state; the median per round is reported.
Peak memory: CUDA allocator peaks on a GPU; on the CPU, the peak resident size of a fresh process per variant.
"""

from __future__ import annotations

import copy
import json
import multiprocessing as mp
import resource
import statistics
import time
from collections.abc import Callable

import click
import timm
import torch

from pipeline import DAAM

DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build(model_name: str, device: str, batch: int) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False).to(device).eval().requires_grad_(False)
    size = model.patch_embed.img_size
    return model, torch.randn(batch, 3, *size, device=device)


def floor_step(model: torch.nn.Module, images: torch.Tensor, dtype: torch.dtype | None) -> Callable[[], None]:
    def step() -> None:
        x = images.detach().requires_grad_(True)
        with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(x)
        score = logits.gather(1, logits.detach().argmax(1, keepdim=True)).float().sum()
        torch.autograd.grad(score, x)

    return step


def daam_step(daam: DAAM, images: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        daam(images)

    return step


def timed(step: Callable[[], None], device: str, repeats: int) -> float:
    """Median seconds per call."""
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak_cpu_memory(variant: str, model_name: str, batch: int, dtype: str, queue: mp.Queue) -> None:
    """Child process: peak RSS growth of one variant after the model and batch exist."""
    torch.set_num_threads(torch.get_num_threads())
    model, images = build(model_name, "cpu", batch)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step = floor_step(model, images, DTYPES[dtype]) if variant == "floor" else None
    if variant == "daam":
        daam = DAAM(model, autocast_dtype=DTYPES[dtype]).open()
        step = daam_step(daam, images)
    step()
    queue.put((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)


def peak_memory(variant: str, model: torch.nn.Module, images: torch.Tensor, args: dict) -> int:
    if images.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        if variant == "floor":
            floor_step(model, images, DTYPES[args["dtype"]])()
        else:
            with DAAM(model, autocast_dtype=DTYPES[args["dtype"]]) as daam:
                daam(images)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_cpu_memory, args=(variant, args["model"], args["batch"], args["dtype"], queue))
    proc.start()
    peak = queue.get(timeout=600)
    proc.join()
    return peak


def run_benchmark(model_name: str, batch: int, dtype: str, device: str, rounds: int, repeats: int) -> dict:
    model, images = build(model_name, device, batch)
    floor = floor_step(copy.deepcopy(model), images, DTYPES[dtype])  # the floor's model carries no hooks
    floor_times, daam_times = [], []
    with DAAM(model, autocast_dtype=DTYPES[dtype]) as daam:
        step = daam_step(daam, images)
        floor(), step()  # warm-up
        for _ in range(rounds):
            floor_times.append(timed(floor, device, repeats))
            daam_times.append(timed(step, device, repeats))
    args = dict(model=model_name, batch=batch, dtype=dtype)
    floor_s, daam_s = statistics.median(floor_times), statistics.median(daam_times)
    floor_mem, daam_mem = peak_memory("floor", model, images, args), peak_memory("daam", model, images, args)
    return dict(
        model=model_name,
        batch=batch,
        dtype=dtype,
        device=torch.cuda.get_device_name(device) if device.startswith("cuda") else f"cpu x{torch.get_num_threads()}",
        floor_images_per_s=batch / floor_s,
        daam_images_per_s=batch / daam_s,
        ratio=floor_s / daam_s,
        floor_peak_mib=floor_mem / 2**20,
        daam_peak_mib=daam_mem / 2**20,
        memory_ratio=daam_mem / max(floor_mem, 1),
        torch=torch.__version__,
        timm=timm.__version__,
    )


def print_table(rows: list[dict]) -> None:
    header = f"{'model':28} {'dtype':9} {'batch':>5} {'floor img/s':>12} {'DAAM img/s':>11} {'ratio':>6} "
    header += f"{'floor MiB':>10} {'DAAM MiB':>9} {'mem ratio':>9}"
    print(header)
    for r in rows:
        print(
            f"{r['model']:28} {r['dtype']:9} {r['batch']:>5} {r['floor_images_per_s']:>12.1f} "
            f"{r['daam_images_per_s']:>11.1f} {r['ratio']:>6.3f} {r['floor_peak_mib']:>10.0f} "
            f"{r['daam_peak_mib']:>9.0f} {r['memory_ratio']:>9.2f}"
        )
    if rows:
        print(f"device: {rows[0]['device']}; torch {rows[0]['torch']}, timm {rows[0]['timm']}")


@click.command()
@click.option("--model", "models", multiple=True, default=["vit_small_patch16_224"], show_default=True)
@click.option("--batch", default=16, show_default=True)
@click.option("--dtype", "dtypes", multiple=True, type=click.Choice(sorted(DTYPES)), default=["float32"])
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu", show_default=True)
@click.option("--rounds", default=5, show_default=True, help="Alternating floor/DAAM rounds.")
@click.option("--repeats", default=3, show_default=True, help="Timed calls per round.")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None, help="Also write the rows as JSON.")
def main(models, batch, dtypes, device, rounds, repeats, json_out) -> None:
    """Print DAAM throughput, the forward+backward floor, their ratio and peak memory of each."""
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 on both sides
    rows = [run_benchmark(m, batch, d, device, rounds, repeats) for m in models for d in dtypes]
    print_table(rows)
    if json_out:
        with open(json_out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
