"""Real small outputs for the viz tests: non-square images (64x40) with their object's box and mask through a 4-block
tiny ViT, run in-process."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from builders import TINY_MODEL, job_dict
from PIL import Image

from pipeline.compare import compare
from pipeline.config import parse_job
from pipeline.data.shards import ShardSample, write_shards
from pipeline.runner import run_job
from pipeline.store.results import open_results
from pipeline.viz.report import report

WIDTH, HEIGHT = 64, 40
BLOCKS = 4  # L of the tiny model (4x4 patch grid on its 32x32 input)
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}


def _samples(shard: int, count: int, corrupt: tuple[int, ...] = ()) -> list[ShardSample]:
    rng = np.random.default_rng(100 + shard)
    samples = []
    for i in range(count):
        image = rng.integers(90, 160, (HEIGHT, WIDTH, 3), dtype=np.uint8)
        label = int(rng.integers(len(COLOURS)))
        x, y = int(rng.integers(0, WIDTH - 16)), int(rng.integers(0, HEIGHT - 16))
        image[y : y + 16, x : x + 16] = list(COLOURS.values())[label]
        mask = np.zeros((HEIGHT, WIDTH), np.uint8)
        mask[y : y + 16, x : x + 16] = 1
        data = b"broken" if i in corrupt else _png(image)
        meta = {"boxes": [[x, y, x + 16, y + 16]], "label_name": list(COLOURS)[label]}
        samples.append(ShardSample(f"img{shard}_{i:02d}", data, "png", label, meta, mask=_png(mask)))
    return samples


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def _run(folder: Path, shards: list[str], **overrides) -> Path:
    out = folder / "out"
    model = {**TINY_MODEL, "kwargs": {**TINY_MODEL["kwargs"], "depth": BLOCKS}}
    job = job_dict(shards, out, model=model, **overrides)
    job["name"] = "viz"
    summary = run_job(parse_job(job), use_ray=False, progress=False)
    assert summary.samples_ok > 0
    return out


@pytest.fixture(scope="session")
def viz_shards(tmp_path_factory) -> list[str]:
    """Two shards of five 64x40 images with a coloured square (its colour is the label); one is corrupt."""
    folder = tmp_path_factory.mktemp("viz_shards")
    for s in range(2):
        write_shards(_samples(s, 5, corrupt=(3,) if s == 1 else ()), folder, prefix=f"part{s}")
    return sorted(str(p) for p in folder.glob("*.tar"))


@pytest.fixture(scope="session")
def crop_output(viz_shards, tmp_path_factory) -> Path:
    """A supervised output with 'crop' preprocessing and an evaluation table."""
    return _run(tmp_path_factory.mktemp("viz_crop"), viz_shards, **{"data.preprocess": "crop"}, evaluate={"steps": 4})


@pytest.fixture(scope="session")
def resize_output(viz_shards, tmp_path_factory) -> Path:
    """A supervised output with 'resize' preprocessing (the paper's), no evaluation."""
    return _run(tmp_path_factory.mktemp("viz_resize"), viz_shards)


@pytest.fixture(scope="session")
def explainers_output(viz_shards, tmp_path_factory) -> Path:
    """A supervised output with every comparison explainer (rollout, attention, gae, attnlrp and cplrp per block,
    gradcam one map), an evaluation table and the cascading sanity check on three samples."""
    explainers = ["daam", "rollout", "attention", "gradcam", "gae", "attnlrp", "cplrp"]
    metrics = ["localisation", "segmentation", "faithfulness", "perturbation"]
    evaluate = {"steps": 4, "metrics": metrics, "sanity": "cascading", "sanity_samples": 3}
    return _run(tmp_path_factory.mktemp("viz_explainers"), viz_shards, explainers=explainers, evaluate=evaluate)


@pytest.fixture(scope="session")
def explainers_report(explainers_output, tmp_path_factory) -> Path:
    """The report of ``explainers_output`` without a gallery, drawn once: its 32 charts take seconds."""
    return report(explainers_output, tmp_path_factory.mktemp("explainers_report") / "r.html", gallery=0, progress=False)


@pytest.fixture(scope="session")
def other_shards(viz_shards, tmp_path_factory) -> list[str]:
    """The second shard of ``viz_shards`` (five keys shared with its outputs, one of them corrupt) and a shard of five
    new keys."""
    folder = tmp_path_factory.mktemp("other_shards")
    write_shards(_samples(2, 5), folder, prefix="part2")
    return [viz_shards[1], *sorted(str(p) for p in folder.glob("*.tar"))]


@pytest.fixture(scope="session")
def other_output(other_shards, tmp_path_factory) -> Path:
    """Another model over a partial overlap of ``crop_output``'s samples: 2 blocks instead of 4, patch 4 (an 8x8 grid)
    instead of 8 (4x4), 'resize' preprocessing, an evaluation table."""
    depth_and_patch = {"model.kwargs.depth": 2, "model.kwargs.patch_size": 4}
    return _run(tmp_path_factory.mktemp("viz_other"), other_shards, **depth_and_patch, evaluate={"steps": 4})


@pytest.fixture(scope="session")
def comparison(crop_output, other_output):
    """``crop_output`` and ``other_output`` compared, named deep and fine (the tables and the comparison report)."""
    return compare(open_results(crop_output), open_results(other_output), names=["deep", "fine"])


@pytest.fixture(scope="session")
def disjoint_output(other_shards, tmp_path_factory) -> Path:
    """A 3-block model over the new shard only: no key in common with ``crop_output``."""
    return _run(tmp_path_factory.mktemp("viz_disjoint"), other_shards[1:], **{"model.kwargs.depth": 3})


@pytest.fixture(scope="session")
def apart(crop_output, disjoint_output):
    """``crop_output`` and ``disjoint_output`` compared, named deep and apart: outputs without a shared key."""
    return compare(crop_output, disjoint_output, names=["deep", "apart"])
