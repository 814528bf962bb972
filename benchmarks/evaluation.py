"""What the evaluation costs a job, with and without the `perturbation` metric group.

One batch goes through what the explain stage does per batch when a job evaluates: the explanation (DAAM and the
job's comparison explainers in one pass), then `evaluate_batch` with the metric groups of the job. Rounds alternate
the evaluation without the perturbation group (localisation, segmentation, faithfulness), with it, and with
Chefer et al.'s protocol, so all see the same machine state; the median per round is reported. The model's forward
passes are counted too: the ratio of the times follows them.

    python benchmarks/evaluation.py --model vit_small_patch16_224 --batch 8 --explainers daam
"""

from __future__ import annotations

import contextlib
import json
import statistics
from collections.abc import Callable

import click
import timm
import torch
from engine import timed

from pipeline import DAAM
from pipeline.config import EvaluationConfig
from pipeline.engine.explainers import Explainers
from pipeline.evaluate import evaluate_batch

WITHOUT = ("localisation", "segmentation", "faithfulness")
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def run_benchmark(
    model_name: str, batch: int, explainers: tuple[str, ...], device: str, rounds: int, img_size: int | None = None
) -> dict:
    torch.manual_seed(0)
    kwargs = {} if img_size is None else {"img_size": img_size}
    model = timm.create_model(model_name, pretrained=False, **kwargs).to(device).eval()
    size = model.patch_embed.img_size
    images = torch.randn(batch, 3, *size, device=device)
    masks = (torch.rand(batch, *size, device=device) > 0.5).float()
    labels = torch.randint(0, model.num_classes, (batch,), device=device)
    comparison = tuple(name for name in explainers if name != "daam")
    configs = {
        "without perturbation": EvaluationConfig(metrics=WITHOUT),
        "with perturbation": EvaluationConfig(metrics=(*WITHOUT, "perturbation")),
        "with perturbation, chefer": EvaluationConfig(metrics=(*WITHOUT, "perturbation"), protocol="chefer"),
    }
    counter = ImagesSeen()
    model.register_forward_pre_hook(counter)
    passes = {}
    times: dict[str, list[float]] = {"explain": [], **{name: [] for name in configs}}
    with DAAM(model) as daam, Explainers(daam, comparison) if comparison else contextlib.nullcontext() as others:
        state: dict = {}

        def explain() -> None:
            result = daam(images)
            maps = others.explain(images, result) if comparison else {}
            state["result"], state["maps"] = result, {name: m.final for name, m in maps.items()}

        def evaluate(config: EvaluationConfig) -> Callable[[], None]:
            def step() -> None:
                result = state["result"]
                options = dict(explainer_maps=state["maps"], masks=masks, labels=labels, mean=MEAN, std=STD)
                evaluate_batch(model, images, result.daam, result.target, None, config, **options)

            return step

        explain()  # warm-up
        for _ in range(rounds):
            times["explain"].append(timed(explain, device, repeats=1))
            for name, config in configs.items():
                counter.images = 0
                times[name].append(timed(evaluate(config), device, repeats=1))
                passes[name] = counter.images
    median = {name: statistics.median(values) for name, values in times.items()}
    explain_s, without_s, with_s = median["explain"], median["without perturbation"], median["with perturbation"]
    return dict(
        model=model_name,
        batch=batch,
        explainers=",".join(explainers),
        maps=3 + len(comparison),
        device=torch.cuda.get_device_name(device) if device.startswith("cuda") else f"cpu x{torch.get_num_threads()}",
        seconds_per_image={name: value / batch for name, value in median.items()},
        forward_passes_per_image={name: value / batch for name, value in passes.items()},
        evaluation_ratio=with_s / without_s,
        job_ratio=(explain_s + with_s) / (explain_s + without_s),
        chefer_vs_patch=median["with perturbation, chefer"] / with_s,
        torch=torch.__version__,
        timm=timm.__version__,
    )


class ImagesSeen:
    """A forward pre-hook counting the images the model is run on."""

    def __init__(self) -> None:
        self.images = 0

    def __call__(self, module: torch.nn.Module, args: tuple) -> None:
        self.images += len(args[0])


@click.command()
@click.option("--model", "models", multiple=True, default=["vit_small_patch16_224"], show_default=True)
@click.option("--batch", default=8, show_default=True)
@click.option("--explainers", default="daam", show_default=True, help="Comma-separated, as the job's list.")
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu", show_default=True)
@click.option("--rounds", default=3, show_default=True)
@click.option("--img-size", type=int, default=None, help="Build the model for this input size (default: its own).")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None, help="Also write the rows as JSON.")
def main(models, batch, explainers, device, rounds, img_size, json_out) -> None:
    """Evaluation time per image with and without the perturbation group, and the whole job's ratio."""
    rows = []
    print(
        f"{'model':24} {'batch':>5} {'maps':>4} {'explain s/img':>13} {'eval s/img':>10} {'+perturb s/img':>14} "
        f"{'eval ratio':>10} {'job ratio':>9} {'passes':>13} {'chefer/patch':>12}",
        flush=True,
    )
    for model in models:
        row = run_benchmark(model, batch, tuple(explainers.split(",")), device, rounds, img_size)
        rows.append(row)
        seconds, passes = row["seconds_per_image"], row["forward_passes_per_image"]
        print(
            f"{row['model']:24} {row['batch']:>5} {row['maps']:>4} {seconds['explain']:>13.3f} "
            f"{seconds['without perturbation']:>10.3f} {seconds['with perturbation']:>14.3f} "
            f"{row['evaluation_ratio']:>10.3f} {row['job_ratio']:>9.3f} "
            f"{passes['without perturbation']:>5.0f} -> {passes['with perturbation']:<5.0f} "
            f"{row['chefer_vs_patch']:>12.3f}",
            flush=True,
        )
    print(f"device: {rows[0]['device']}, torch {rows[0]['torch']}, timm {rows[0]['timm']}")
    if json_out:
        with open(json_out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
