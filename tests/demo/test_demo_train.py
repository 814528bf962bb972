"""Training of the demo model, and the shipped checkpoint and validation shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from pipeline.data.decode import Preprocess, decode_image
from pipeline.data.stream import iter_shard
from pipeline.demo.synthetic import CLASS_NAMES, split_scenes, write_demo_split
from pipeline.demo.train import (
    CHECKPOINT_NAME,
    DEMO_MODELS,
    METADATA_NAME,
    build_demo_model,
    demo_model_kwargs,
    main,
    train_demo_model,
)
from pipeline.models import model_data_config

ASSETS = Path(__file__).resolve().parents[2] / "pipeline" / "demo" / "assets"
TINY = demo_model_kwargs(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


def _val_loss(model: torch.nn.Module, seed: int, n: int = 64) -> float:
    scenes = list(split_scenes("val", n, seed))
    x = torch.from_numpy(np.stack([s[0] for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        return F.cross_entropy(model(x), torch.tensor([s[1] for s in scenes])).item()


def test_a_few_steps_reduce_the_loss_and_save_a_loadable_reproducible_checkpoint(tmp_path):
    kwargs = dict(steps=8, seed=3, batch_size=32, lr=3e-3, warmup_steps=1, n_val=32, model_kwargs=TINY)
    meta = train_demo_model(tmp_path / "a", **kwargs)

    torch.manual_seed(3)
    initial = build_demo_model(TINY).eval()
    trained = build_demo_model(meta["model_kwargs"])
    trained.load_state_dict(load_file(tmp_path / "a" / CHECKPOINT_NAME), strict=True)
    trained.eval()
    # a few steps move every trained tensor away from the seeded initialisation, and the loss stays finite
    changed = [name for name, p in trained.state_dict().items() if not torch.equal(p, initial.state_dict()[name])]
    assert len(changed) == len(initial.state_dict()) and np.isfinite(_val_loss(trained, 3))

    assert json.loads((tmp_path / "a" / METADATA_NAME).read_text()) == meta
    assert meta["steps"] == 8 and meta["seed"] == 3 and meta["class_names"] == list(CLASS_NAMES)
    assert meta["mean"] == [0.5, 0.5, 0.5] and meta["input_size"] == [3, 64, 64]
    assert meta["num_params"] == sum(p.numel() for p in trained.parameters())
    assert 0.0 <= meta["val_accuracy"] <= 1.0 and meta["val_split"] == {"split": "val", "n": 32, "seed": 3}

    train_demo_model(tmp_path / "b", **kwargs)
    assert (tmp_path / "a" / CHECKPOINT_NAME).read_bytes() == (tmp_path / "b" / CHECKPOINT_NAME).read_bytes()


def test_cli_builds_shards_and_models(tmp_path, capsys):
    main(["--out", str(tmp_path), "--steps", "2", "--n-val", "8", "--samples-per-shard", "4"])
    summaries = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [s["model"] for s in summaries] == [m.stem for m in DEMO_MODELS] == ["demo_vit", "demo_vit_d4p4"]
    for summary, model in zip(summaries, DEMO_MODELS, strict=True):
        meta = json.loads((tmp_path / f"{model.stem}.json").read_text())
        assert summary["val_accuracy"] == meta["val_accuracy"] and meta["steps"] == 2
        assert meta["model_kwargs"] == model.kwargs and meta["checkpoint"] == f"{model.stem}.safetensors"
    assert json.loads((tmp_path / "val" / "index.json").read_text())["total"] == 8
    assert sorted(p.name for p in (tmp_path / "val").glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    with pytest.raises(ValueError, match="steps"):
        train_demo_model(tmp_path, steps=0)


def test_shipped_assets_are_small_and_reproducible(tmp_path):
    meta = json.loads((ASSETS / METADATA_NAME).read_text())
    assert (ASSETS / CHECKPOINT_NAME).stat().st_size <= 5 * 2**20
    # the checkpoints (1.9 MiB, and 0.5 MiB for the second model of `compare`), 512 validation scenes with masks and
    # 256 training scenes for the self-supervised demo's bank
    assert sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file()) <= 8 * 2**20
    index = json.loads((ASSETS / "val" / "index.json").read_text())
    split = meta["val_split"]
    assert index["total"] == split["n"] and len(index["shards"]) >= 4
    written = write_demo_split(tmp_path, "val", split["n"], split["seed"], index["shards"][0]["samples"])
    assert written == index["shards"]
    for entry in written:
        assert (tmp_path / entry["name"]).read_bytes() == (ASSETS / "val" / entry["name"]).read_bytes()


@pytest.mark.parametrize("stem", [m.stem for m in DEMO_MODELS])
def test_shipped_checkpoint_reaches_its_recorded_accuracy_through_the_pipeline_preprocessing(stem):
    meta = json.loads((ASSETS / f"{stem}.json").read_text())
    model = timm.create_model(
        meta["model_name"], pretrained=False, num_classes=meta["num_classes"], **meta["model_kwargs"]
    )
    model.load_state_dict(load_file(ASSETS / meta["checkpoint"]), strict=True)
    model.eval()
    assert sum(p.numel() for p in model.parameters()) == meta["num_params"]
    assert len(model.blocks) >= 4 and model.num_prefix_tokens == 1 and model.global_pool == "token"

    data_config = model_data_config(model)
    assert list(data_config["input_size"]) == meta["input_size"] == [3, 64, 64]
    assert data_config["crop_pct"] == 1.0 and list(data_config["mean"]) == meta["mean"]
    preprocess = Preprocess.from_data_config(data_config)

    index = json.loads((ASSETS / "val" / "index.json").read_text())
    samples = [s for entry in index["shards"] for s in iter_shard(str(ASSETS / "val" / entry["name"]))]
    assert all(s.error is None for s in samples) and len(samples) == meta["val_split"]["n"]
    pixels = torch.stack([preprocess.to_uint8(decode_image(s.image, shard=s.url, key=s.key)) for s in samples])
    labels = torch.tensor([s.label for s in samples])
    with torch.no_grad():
        preds = model(preprocess.normalize(pixels)).argmax(-1)
    accuracy = (preds == labels).float().mean().item()
    assert accuracy == pytest.approx(meta["val_accuracy"], abs=1 / len(samples))
    assert accuracy >= 0.98


@pytest.mark.parametrize(
    ("stem", "jobs"), [("demo_vit", ("demo.yaml", "demo-ssl.yaml")), ("demo_vit_d4p4", ("demo-compare.yaml",))]
)
def test_demo_jobs_describe_the_shipped_models(stem, jobs):
    from pipeline.config import load_job

    meta = json.loads((ASSETS / f"{stem}.json").read_text())
    assert meta["model_kwargs"] == next(m.kwargs for m in DEMO_MODELS if m.stem == stem)
    for name in jobs:
        job = load_job(ASSETS.parents[2] / "jobs" / name)
        assert job.model.name == meta["model_name"] and job.model.num_classes == meta["num_classes"]
        assert job.model.kwargs == meta["model_kwargs"]
        assert job.model.checkpoint == str(ASSETS / meta["checkpoint"])
        assert all(Path(url).is_file() for url in job.shard_urls())
