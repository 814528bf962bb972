"""pipeline.models: safe checkpoint loading, clear refusals, the input size of the model as built."""

from __future__ import annotations

import pickle

import pytest
import torch
from builders import TINY_MODEL
from safetensors.torch import save_file

from pipeline import DAAM
from pipeline.errors import CheckpointError, InputError
from pipeline.models import check_model_source, create_model, load_checkpoint, model_data_config


def tiny(seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return create_model(TINY_MODEL["name"], num_classes=4, model_kwargs={**TINY_MODEL["kwargs"], **kwargs})


def same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_safetensors_round_trip(tmp_path):
    source, target = tiny(0), tiny(1)
    assert not same_weights(source, target)
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    load_checkpoint(target, tmp_path / "w.safetensors")
    assert same_weights(source, target)
    built = create_model(
        TINY_MODEL["name"],
        num_classes=4,
        model_kwargs=TINY_MODEL["kwargs"],
        checkpoint=str(tmp_path / "w.safetensors"),
    )
    assert same_weights(source, built) and not built.training
    assert not any(p.requires_grad for p in built.parameters())


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"model": sd, "epoch": 3},
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
        lambda sd: {"teacher": sd, "student": {"other": torch.zeros(1)}},  # DINO's training checkpoints
    ],
    ids=["model", "state_dict-module", "teacher"],
)
def test_torch_files_with_nested_state_dicts(tmp_path, wrap):
    source, target = tiny(0), tiny(1)
    torch.save(wrap(source.state_dict()), tmp_path / "w.pth")
    load_checkpoint(target, tmp_path / "w.pth")
    assert same_weights(source, target)


class Payload:
    def __reduce__(self):
        return (print, ("code ran while unpickling",))


def test_a_pickle_with_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"state_dict": Payload()}))
    with pytest.raises(CheckpointError, match=r"evil.pth cannot be loaded safely .*weights_only=True"):
        load_checkpoint(tiny(), path)
    assert "code ran" not in capsys.readouterr().out


def test_a_checkpoint_that_does_not_fit_names_the_first_tensor(tmp_path):
    wider = create_model(TINY_MODEL["name"], num_classes=4, model_kwargs={**TINY_MODEL["kwargs"], "embed_dim": 96})
    save_file(wider.state_dict(), tmp_path / "wide.safetensors")
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(tiny(), tmp_path / "wide.safetensors")
    assert str(error.value).endswith(
        "does not fit VisionTransformer: cls_token: checkpoint (1, 1, 96) vs model (1, 1, 48)"
    )
    partial = {k: v for k, v in tiny().state_dict().items() if not k.startswith("head.")}
    save_file({**partial, "extra.weight": torch.zeros(2)}, tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointError, match=r"missing \['head.bias', 'head.weight'\], unexpected \['extra.weight'\]"):
        load_checkpoint(tiny(), tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointError, match=r"nowhere.safetensors not found"):
        load_checkpoint(tiny(), tmp_path / "nowhere.safetensors")


def test_model_sources_are_checked_without_building_anything(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match=r"unknown timm model 'vit_tiny_patch16_2244'; close matches: vit_tiny"):
        check_model_source("vit_tiny_patch16_2244")
    with pytest.raises(CheckpointError, match=r"model.checkpoint: .*missing.pth does not exist"):
        check_model_source("vit_tiny_patch16_224", checkpoint=str(tmp_path / "missing.pth"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    for name, pretrained in (("vit_small_patch16_224.dino", True), ("hf-hub:timm/vit_small_patch16_224.dino", False)):
        with pytest.raises(CheckpointError, match=r"cannot reach .* give model.checkpoint"):
            check_model_source(name, pretrained=pretrained)
    check_model_source("vit_small_patch16_224.dino")  # random init: nothing to fetch


def test_the_input_size_is_the_model_as_built():
    fixed = tiny(img_size=(24, 40))
    assert model_data_config(fixed)["input_size"] == (3, 24, 40)
    dynamic = create_model(
        "vit_tiny_patch16_224",
        num_classes=4,
        model_kwargs={**TINY_MODEL["kwargs"], "img_size": (160, 256), "patch_size": 16, "dynamic_img_size": True},
    )
    assert model_data_config(dynamic)["input_size"] == (3, 160, 256)  # not the pretrained config's 224
    with DAAM(dynamic) as explain:
        assert explain(torch.randn(1, 3, 64, 96)).daam.shape == (1, 2, 4, 6)
        with pytest.raises(InputError, match=r"\(60, 96\) are not divisible by the patch size \(16, 16\)"):
            explain(torch.randn(1, 3, 60, 96))
