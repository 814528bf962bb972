"""DAAM engine throughput against the forward+backward floor of the same model, batch and dtype.

The floor: one batched forward pass and one backward pass from the top-1 logit down to the input images, with
frozen parameters. A DAAM map needs exactly that much work, so DAAM / floor is the engine's efficiency.

    python benchmarks/engine.py --model vit_small_patch16_224 --batch 16 --dtype float32 --device cpu

Rounds of floor and DAAM alternate so that both see the same machine state; the median per round is reported.
Peak memory: CUDA allocator peaks on a GPU; on the CPU, the peak resident size of a fresh process per variant.

    python benchmarks/engine.py --explainers daam,rollout,attention,gradcam

adds one row per configuration: DAAM with the comparison explainers (pipeline.engine.explainers) attached, each batch
read as the explain stage reads it (explainers with a pass of their own, AttnLRP and CP-LRP, run it after DAAM's),
timed in the same alternating rounds, and a line with its cost relative to DAAM alone.
"""

from __future__ import annotations

import contextlib
import copy
import json
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable

import click
import timm
import torch

from pipeline import DAAM
from pipeline.engine.explainers import Explainers
from pipeline.names import COMPARISON_EXPLAINERS

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


def explainers_step(daam: DAAM, explainers: Explainers, images: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        explainers.explain(images, daam(images))

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


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _reset_peak_rss() -> int:
    """Reset this process's peak resident size to its current size (Linux), and return that size."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _proc_status_bytes("VmRSS")


def _peak_cpu_memory(
    variant: str, model_name: str, batch: int, dtype: str, queue: mp.Queue, explainers: tuple[str, ...] = ()
) -> None:
    """Child process: peak RSS growth of one variant after the model and batch exist.

    ru_maxrss is inherited across fork and exec, so the peak is read from /proc (VmHWM) after resetting it.
    """
    model, images = build(model_name, "cpu", batch)
    base = _reset_peak_rss()
    step = floor_step(model, images, DTYPES[dtype]) if variant == "floor" else None
    if variant == "daam":
        daam = DAAM(model, autocast_dtype=DTYPES[dtype]).open()
        step = daam_step(daam, images)
    if variant == "explainers":
        daam = DAAM(model, autocast_dtype=DTYPES[dtype]).open()
        step = explainers_step(daam, Explainers(daam, explainers), images)
    step()
    queue.put(_proc_status_bytes("VmHWM") - base)


def peak_memory(variant: str, model: torch.nn.Module, images: torch.Tensor, args: dict) -> int:
    if images.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        if variant == "floor":
            floor_step(model, images, DTYPES[args["dtype"]])()
        else:
            with DAAM(model, autocast_dtype=DTYPES[args["dtype"]]) as daam, contextlib.ExitStack() as stack:
                if variant == "explainers":
                    explainers = stack.enter_context(Explainers(daam, args["explainers"]))
                    explainers_step(daam, explainers, images)()
                else:
                    daam(images)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(
        target=_peak_cpu_memory,
        args=(variant, args["model"], args["batch"], args["dtype"], queue, args.get("explainers", ())),
    )
    proc.start()
    peak = queue.get(timeout=600)
    proc.join()
    return peak


def run_benchmark(
    model_name: str, batch: int, dtype: str, device: str, rounds: int, repeats: int, explainers: tuple[str, ...] = ()
) -> dict:
    model, images = build(model_name, device, batch)
    floor = floor_step(copy.deepcopy(model), images, DTYPES[dtype])  # the floor's model carries no hooks
    extra_model = copy.deepcopy(model) if explainers else None  # DAAM with the explainers attached, on its own copy
    floor_times, daam_times, extra_times = [], [], []
    with DAAM(model, autocast_dtype=DTYPES[dtype]) as daam, contextlib.ExitStack() as stack:
        step = daam_step(daam, images)
        floor(), step()  # warm-up
        if explainers:
            extra_daam = stack.enter_context(DAAM(extra_model, autocast_dtype=DTYPES[dtype]))
            extra_step = explainers_step(extra_daam, stack.enter_context(Explainers(extra_daam, explainers)), images)
            extra_step()
        for _ in range(rounds):
            floor_times.append(timed(floor, device, repeats))
            daam_times.append(timed(step, device, repeats))
            if explainers:
                extra_times.append(timed(extra_step, device, repeats))
    args = dict(model=model_name, batch=batch, dtype=dtype, explainers=explainers)
    floor_s, daam_s = statistics.median(floor_times), statistics.median(daam_times)
    floor_mem, daam_mem = peak_memory("floor", model, images, args), peak_memory("daam", model, images, args)
    if explainers:
        extra_s, extra_mem = statistics.median(extra_times), peak_memory("explainers", model, images, args)
        extra_row = dict(
            explainers=",".join(explainers),
            images_per_s=batch / extra_s,
            ratio=floor_s / extra_s,
            peak_mib=extra_mem / 2**20,
            memory_ratio=extra_mem / max(floor_mem, 1),
            time_vs_daam=extra_s / daam_s,
            memory_vs_daam=extra_mem / max(daam_mem, 1),
        )
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
        **({"with_explainers": extra_row} if explainers else {}),
    )


def print_header() -> None:
    header = f"{'model':28} {'dtype':9} {'batch':>5} {'floor img/s':>12} {'DAAM img/s':>11} {'ratio':>6} "
    print(header + f"{'floor MiB':>10} {'DAAM MiB':>9} {'mem ratio':>9}", flush=True)


def print_row(r: dict) -> None:
    """One configuration's line (and one with the comparison explainers attached), printed as soon as measured."""
    print(
        f"{r['model']:28} {r['dtype']:9} {r['batch']:>5} {r['floor_images_per_s']:>12.1f} "
        f"{r['daam_images_per_s']:>11.1f} {r['ratio']:>6.3f} {r['floor_peak_mib']:>10.0f} "
        f"{r['daam_peak_mib']:>9.0f} {r['memory_ratio']:>9.2f}",
        flush=True,
    )
    if "with_explainers" in r:
        b = r["with_explainers"]
        print(
            f"{'+' + b['explainers']:28} {r['dtype']:9} {r['batch']:>5} {r['floor_images_per_s']:>12.1f} "
            f"{b['images_per_s']:>11.1f} {b['ratio']:>6.3f} {r['floor_peak_mib']:>10.0f} "
            f"{b['peak_mib']:>9.0f} {b['memory_ratio']:>9.2f}",
            flush=True,
        )


def print_footer(rows: list[dict]) -> None:
    if rows:
        print(f"device: {rows[0]['device']}; torch {rows[0]['torch']}, timm {rows[0]['timm']}")
    for r in rows:
        if "with_explainers" in r:
            b = r["with_explainers"]
            print(
                f"+{b['explainers']} (DAAM with them attached) vs DAAM alone, {r['model']} {r['dtype']}: "
                f"time x{b['time_vs_daam']:.3f}, peak memory x{b['memory_vs_daam']:.2f}"
            )


def parse_explainers(value: str) -> tuple[str, ...]:
    """The comparison explainers named in ``value`` ("daam" is always run)."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in ("daam", *COMPARISON_EXPLAINERS)]
    if unknown:
        raise click.BadParameter(f"unknown explainers {unknown}; valid: daam, {', '.join(COMPARISON_EXPLAINERS)}")
    return tuple(dict.fromkeys(n for n in names if n != "daam"))


@click.command()
@click.option("--model", "models", multiple=True, default=["vit_small_patch16_224"], show_default=True)
@click.option("--batch", default=16, show_default=True)
@click.option("--dtype", "dtypes", multiple=True, type=click.Choice(sorted(DTYPES)), default=["float32"])
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu", show_default=True)
@click.option("--rounds", default=5, show_default=True, help="Alternating floor/DAAM rounds.")
@click.option("--repeats", default=3, show_default=True, help="Timed calls per round.")
@click.option(
    "--explainers",
    default="daam",
    show_default=True,
    callback=lambda ctx, param, value: parse_explainers(value),
    help=f"Comma-separated, among daam,{','.join(COMPARISON_EXPLAINERS)}: any other than daam adds a row of DAAM "
    "with them attached.",
)
@click.option("--json-out", type=click.Path(dir_okay=False), default=None, help="Also write the rows as JSON.")
def main(models, batch, dtypes, device, rounds, repeats, explainers, json_out) -> None:
    """Print DAAM throughput, the forward+backward floor, their ratio and peak memory of each."""
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 on both sides
    print_header()
    rows = []
    for model in models:
        for dtype in dtypes:
            rows.append(run_benchmark(model, batch, dtype, device, rounds, repeats, explainers))
            print_row(rows[-1])
            if json_out:  # rewritten after each row: a run stopped by its time budget keeps what it measured
                with open(json_out, "w") as f:
                    json.dump(rows, f, indent=2)
    print_footer(rows)


if __name__ == "__main__":
    main()
