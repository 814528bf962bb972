"""The demo's claim: on the shipped model and validation shards, the final DAAM map points at the object."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.data.decode import Preprocess, decode_image
from pipeline.data.stream import iter_shard
from pipeline.demo.train import METADATA_NAME
from pipeline.engine.daam import DAAM
from pipeline.models import create_model, model_data_config
from pipeline.stats import boxes_to_grid_mask, pointing_hit

ASSETS = Path(__file__).resolve().parents[2] / "pipeline" / "demo" / "assets"


def test_final_daam_map_of_the_shipped_model_points_at_the_object():
    meta = json.loads((ASSETS / METADATA_NAME).read_text())
    model = create_model(
        meta["model_name"],
        checkpoint=ASSETS / meta["checkpoint"],
        num_classes=meta["num_classes"],
        model_kwargs=meta["model_kwargs"],
    )
    preprocess = Preprocess.from_data_config(model_data_config(model))
    index = json.loads((ASSETS / "val" / "index.json").read_text())
    samples = [s for entry in index["shards"][:2] for s in iter_shard(str(ASSETS / "val" / entry["name"]))]
    images = [decode_image(s.image, shard=s.url, key=s.key) for s in samples]
    pixels = torch.stack([preprocess.to_uint8(img) for img in images])
    boxes = [preprocess.map_boxes(s.meta["boxes"], img.size) for s, img in zip(samples, images, strict=True)]

    with DAAM(model) as daam:
        result = daam(preprocess.normalize(pixels))
    h, w = result.daam.shape[-2:]
    box_mask = boxes_to_grid_mask(boxes, preprocess.size, (h, w))
    hits = pointing_hit(result.daam[:, -1], box_mask)

    assert (result.target == torch.tensor([s.label for s in samples])).all()
    assert len(samples) == 256 and not hits.isnan().any()
    # 0.994 on all 512 validation scenes; the demo job's acceptance bar is 0.9
    assert hits.mean().item() >= 0.95
