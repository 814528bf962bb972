"""Reproducible training of the shipped demo models, and the rebuild of all demo assets.

A small timm ViT ([class] token, token pooling, patch 8 on 64x64 inputs, 6 blocks) learns the colour of the one
coloured object in the synthetic scenes of :mod:`pipeline.demo.synthetic`; a second one of another depth and patch
size (4 blocks, patch 4) learns the same from the same scenes, for ``daam-pipeline compare``
(:data:`DEMO_MODELS`). Training scenes are drawn fresh
for every step from the ``train`` stream of the seed; the validation scenes are exactly those of the shipped
``val`` shards. Images are preprocessed like the pipeline does (the resize is a no-op at 64x64, then the
model's own mean/std), so the shipped accuracy holds for the pipeline's inputs.

Run ``python -m pipeline.demo.train --out pipeline/demo/assets`` to rebuild the shipped assets (``--model-only``:
the models alone; ``--only demo_vit_d4p4``: one of them).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.optim import create_optimizer_v2
from torch import nn

from pipeline.demo.synthetic import (
    CLASS_NAMES,
    IMAGE_SIZE,
    generate_empty_scene,
    generate_scene,
    split_rng,
    split_scenes,
    write_demo_split,
)

__all__ = [
    "ASSETS_DIR",
    "CHECKPOINT_NAME",
    "DEFAULT_STEPS",
    "DEMO_MODELS",
    "METADATA_NAME",
    "DemoModel",
    "build_demo_assets",
    "build_demo_model",
    "demo_model_kwargs",
    "main",
    "train_demo_model",
    "train_demo_models",
    "write_demo_shards",
]

logger = logging.getLogger(__name__)

MODEL_NAME = "vit_tiny_patch16_224"
CHECKPOINT_NAME = "demo_vit.safetensors"
METADATA_NAME = "demo_vit.json"
DEFAULT_STEPS = 150
DEFAULT_SEED = 1
ASSETS_DIR = Path(__file__).resolve().parent / "assets"  # the shipped demo assets


def demo_model_kwargs(
    *, embed_dim: int = 80, depth: int = 6, num_heads: int = 4, mlp_ratio: float = 4.0, patch_size: int = 8
) -> dict:
    """The ``timm.create_model`` keyword arguments of the demo ViT (besides ``num_classes``), JSON-ready.

    The pretrained-config overlay makes timm's data config report the real input size and no crop.
    """
    return {
        "img_size": IMAGE_SIZE,
        "patch_size": patch_size,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": num_heads,
        "mlp_ratio": mlp_ratio,
        "pretrained_cfg_overlay": {"input_size": [3, IMAGE_SIZE, IMAGE_SIZE], "crop_pct": 1.0},
        "pre_norm": True,
    }


@dataclass(frozen=True)
class DemoModel:
    """One shipped demo model: the stem of its files (``<stem>.safetensors``, ``<stem>.json``) and its
    ``timm.create_model`` arguments."""

    stem: str
    kwargs: dict


DEMO_MODELS = (
    DemoModel("demo_vit", demo_model_kwargs()),
    DemoModel("demo_vit_d4p4", demo_model_kwargs(embed_dim=48, depth=4, num_heads=3, patch_size=4)),
)
"""The shipped demo models: ``jobs/demo.yaml``'s, and ``jobs/demo-compare.yaml``'s (another depth and patch size,
trained the same way on the same scenes) that ``daam-pipeline compare`` sets beside it."""


def build_demo_model(model_kwargs: Mapping[str, Any], num_classes: int = len(CLASS_NAMES)) -> nn.Module:
    """A randomly initialised demo ViT (never pretrained); seed torch first for reproducible weights."""
    return timm.create_model(MODEL_NAME, pretrained=False, num_classes=num_classes, **model_kwargs)


def _normalise(images: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, H, W, 3)`` -> float ``(B, 3, H, W)``, as ``pipeline.data.decode.Preprocess.normalize`` does."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    return (x - (mean.double() * 255).float().view(1, -1, 1, 1)) / (std.double() * 255).float().view(1, -1, 1, 1)


def _train_batches(seed: int, batch_size: int, empty_fraction: float) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Endless fresh batches of the ``train`` stream of ``seed``: images and target class probabilities.

    A scene is object-free with probability ``empty_fraction``; its target is uniform over the classes.
    """
    rng = split_rng("train", seed)
    num_classes = len(CLASS_NAMES)
    while True:
        images, targets = [], torch.full((batch_size, num_classes), 1.0 / num_classes)
        for i in range(batch_size):
            if rng.random() < empty_fraction:
                images.append(generate_empty_scene(rng))
            else:
                image, label, _ = generate_scene(rng)
                images.append(image)
                targets[i] = 0.0
                targets[i, label] = 1.0
        yield np.stack(images), targets


@torch.no_grad()
def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    preds = torch.cat([model(images[i : i + batch_size]).argmax(-1) for i in range(0, len(images), batch_size)])
    return (preds == labels).float().mean().item()


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` intra-op threads (None: leave as is), restored afterwards."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_demo_model(
    out_dir: str | Path,
    *,
    steps: int = DEFAULT_STEPS,
    seed: int = DEFAULT_SEED,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    warmup_steps: int = 20,
    empty_fraction: float = 0.2,
    class_token_std: float | None = None,
    n_val: int = 512,
    threads: int | None = 2,
    model_kwargs: Mapping[str, Any] | None = None,
    stem: str = "demo_vit",
) -> dict[str, Any]:
    """Train a demo ViT and save ``<stem>.safetensors`` and ``<stem>.json`` (default ``demo_vit``) in ``out_dir``.

    The result is a function of the arguments, the torch version and the thread count: torch and the data
    streams are seeded from ``seed``, and every step draws ``batch_size`` fresh scenes of the train stream.

    Args:
        out_dir: Output folder (created).
        steps: Optimiser steps (AdamW, linear warm-up then cosine decay).
        seed: Seed of the weights and of the train and validation scenes.
        batch_size: Scenes per step.
        lr: Peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps.
        empty_fraction: Share of training scenes without the object, trained towards the uniform distribution.
        class_token_std: Standard deviation of the initial [class] token; None keeps timm's (1e-6), as the shipped
            model was trained.
        n_val: Validation scenes (the first ``n_val`` of the ``val`` stream, as in the shipped shards).
        threads: torch intra-op threads during training (None leaves the setting alone).
        model_kwargs: ``timm.create_model`` arguments; default :func:`demo_model_kwargs`.
        stem: The files' name stem.

    Returns:
        The metadata written to ``<stem>.json``.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps ({steps}) and batch_size ({batch_size}) must be positive")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_kwargs = dict(model_kwargs or demo_model_kwargs())
    start = time.perf_counter()
    with _torch_threads(threads):
        torch.manual_seed(seed)
        model = build_demo_model(model_kwargs)
        if class_token_std is not None:
            with torch.no_grad():
                model.cls_token.normal_(std=class_token_std)
        data_config = timm.data.resolve_model_data_config(model)
        mean, std = torch.tensor(data_config["mean"]), torch.tensor(data_config["std"])

        val = list(split_scenes("val", n_val, seed))
        val_x = _normalise(np.stack([s[0] for s in val]), mean, std)
        val_y = torch.tensor([s[1] for s in val])

        # timm's parameter groups: no weight decay on biases, norms, the [class] token and position embeddings
        optimizer = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: (
                (s + 1) / warmup_steps
                if s < warmup_steps
                else 0.5 * (1 + math.cos(math.pi * (s - warmup_steps) / max(1, steps - warmup_steps)))
            ),
        )
        model.train()
        losses = []
        batches = _train_batches(seed, batch_size, empty_fraction)
        for step, (images, targets) in zip(range(steps), batches, strict=False):
            # KL divergence to the targets: cross-entropy minus the targets' entropy, so a perfect fit is 0
            loss = F.kl_div(model(_normalise(images, mean, std)).log_softmax(-1), targets, reduction="batchmean")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            if (step + 1) % 50 == 0 or step + 1 == steps:
                logger.info("step %d/%d  loss %.4f  lr %.2e", step + 1, steps, loss.item(), schedule.get_last_lr()[0])
        model.eval()
        val_accuracy = _accuracy(model, val_x, val_y)
    wall = time.perf_counter() - start

    metadata = {
        "model_name": MODEL_NAME,
        "model_kwargs": model_kwargs,
        "num_classes": len(CLASS_NAMES),
        "class_names": list(CLASS_NAMES),
        "checkpoint": f"{stem}.safetensors",
        "num_params": sum(p.numel() for p in model.parameters()),
        "input_size": list(data_config["input_size"]),
        "mean": list(data_config["mean"]),
        "std": list(data_config["std"]),
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "warmup_steps": warmup_steps,
        "empty_fraction": empty_fraction,
        "class_token_std": class_token_std,
        "threads": threads if threads is not None else torch.get_num_threads(),
        "final_train_loss": losses[-1],
        "mean_train_loss_last_20": float(np.mean(losses[-20:])),
        "val_split": {"split": "val", "n": n_val, "seed": seed},
        "val_accuracy": val_accuracy,
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
        "wall_time_s": round(wall, 1),
    }
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, out_dir / f"{stem}.safetensors", metadata={"model_name": MODEL_NAME})
    (out_dir / f"{stem}.json").write_text(json.dumps(metadata, indent=2) + "\n")
    logger.info("demo model: val accuracy %.4f after %d steps in %.1f s -> %s", val_accuracy, steps, wall, out_dir)
    return metadata


def train_demo_models(
    out_dir: str | Path,
    *,
    models: tuple[DemoModel, ...] = DEMO_MODELS,
    steps: int = DEFAULT_STEPS,
    seed: int = DEFAULT_SEED,
    n_val: int = 512,
    threads: int | None = 2,
) -> dict[str, dict[str, Any]]:
    """Train each of ``models`` (default every shipped demo model) with :func:`train_demo_model`, the same
    arguments for all of them.

    Returns:
        The metadata of each model, by stem.
    """
    return {
        m.stem: train_demo_model(
            out_dir, steps=steps, seed=seed, n_val=n_val, threads=threads, model_kwargs=m.kwargs, stem=m.stem
        )
        for m in models
    }


def write_demo_shards(
    out_dir: str | Path,
    *,
    n_val: int = 512,
    n_train: int = 256,
    samples_per_shard: int = 128,
    seed: int = DEFAULT_SEED,
) -> None:
    """Write the shipped demo shards: ``val/`` (with the objects' masks) and ``train/`` (the reference set of the
    self-supervised demo's memory bank, without masks), each with its ``index.json``. The bytes depend only on the
    arguments."""
    out_dir = Path(out_dir)
    write_demo_split(out_dir / "val", "val", n_val, seed, samples_per_shard, masks=True)
    write_demo_split(out_dir / "train", "train", n_train, seed, samples_per_shard, masks=False)


def build_demo_assets(
    out_dir: str | Path,
    *,
    n_val: int = 512,
    n_train: int = 256,
    samples_per_shard: int = 128,
    steps: int = DEFAULT_STEPS,
    seed: int = DEFAULT_SEED,
    threads: int | None = 2,
) -> dict[str, dict[str, Any]]:
    """Regenerate the shipped demo assets: the shards (:func:`write_demo_shards`), and every demo model's checkpoint
    and JSON.

    The shard bytes depend only on the arguments; the checkpoints also on the torch version and ``threads``.

    Returns:
        The metadata of each model (as written to ``<stem>.json``), by stem.
    """
    write_demo_shards(out_dir, n_val=n_val, n_train=n_train, samples_per_shard=samples_per_shard, seed=seed)
    return train_demo_models(out_dir, steps=steps, seed=seed, n_val=n_val, threads=threads)


def main(argv: list[str] | None = None) -> None:
    """Command line: rebuild the demo assets (or only the models with ``--model-only``, or one with ``--only``)."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.demo.train", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="assets folder")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--n-val", type=int, default=512)
    parser.add_argument("--samples-per-shard", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model-only", action="store_true", help="train and save the models, write no shards")
    parser.add_argument("--only", choices=[m.stem for m in DEMO_MODELS], help="train this model alone, no shards")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    common = {"steps": args.steps, "seed": args.seed, "n_val": args.n_val, "threads": args.threads}
    if args.only or args.model_only:
        models = tuple(m for m in DEMO_MODELS if args.only in (None, m.stem))
        metas = train_demo_models(args.out, models=models, **common)
    else:
        metas = build_demo_assets(args.out, samples_per_shard=args.samples_per_shard, **common)
    for stem, meta in metas.items():
        fields = ("val_accuracy", "final_train_loss", "num_params", "wall_time_s")
        print(json.dumps({"model": stem, **{k: meta[k] for k in fields}}))


if __name__ == "__main__":
    main()
