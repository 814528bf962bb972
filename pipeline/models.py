"""timm model creation, safe checkpoint loading and the model's own data config."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import fsspec
import timm
import torch
from torch import nn

from pipeline.errors import CheckpointError

__all__ = ["check_model_source", "create_model", "load_checkpoint", "model_data_config", "pooled_features"]

_log = logging.getLogger(__name__)

# Wrappers that training scripts put around a state dict.
_STATE_DICT_KEYS = ("state_dict", "model", "model_ema", "module", "teacher")


def check_model_source(name: str, *, pretrained: bool = False, checkpoint: str | None = None) -> None:
    """Placeholder until the models helper lands: unknown names fail in create_model."""


def create_model(
    name: str,
    *,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    num_classes: int | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Create a timm model in eval mode with frozen parameters.

    Args:
        name: timm model name, with an optional pretrained tag (``vit_small_patch16_224.dino``).
        checkpoint: Local path or fsspec URL of a ``.safetensors`` file or a torch file loadable with
            ``weights_only=True``. Takes precedence over ``pretrained``.
        pretrained: Download hub weights (needs network access).
        num_classes: Classifier size; 0 removes the head (self-supervised models).
        model_kwargs: Further keyword arguments for ``timm.create_model`` (``img_size``, ``dynamic_img_size``, ...).
    """
    kwargs = dict(model_kwargs or {})
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        model = timm.create_model(name, pretrained=pretrained and checkpoint is None, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise CheckpointError(f"unknown timm model {name!r}") from e
        raise
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    model.eval().requires_grad_(False)
    return model


def _read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = str(path)
    try:
        with fsspec.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {path} not found") from e
    if path.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        return load_safetensors(data)
    import io

    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors carry many types
        raise CheckpointError(f"checkpoint {path} cannot be loaded with weights_only=True: {e}") from e
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _STATE_DICT_KEYS if k in obj), None)
        if inner is None:
            raise CheckpointError(f"checkpoint {path} holds no state dict (keys: {sorted(obj)[:10]})")
        obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load weights strictly, through timm's own checkpoint filter (so original DINO/DeiT files load too).

    Raises:
        CheckpointError: the file is missing, unsafe to unpickle, or does not match the model.
    """
    state_dict = _read_state_dict(path)
    filter_fn = getattr(model, "pretrained_cfg", {}).get("checkpoint_filter_fn") or _model_filter_fn(model)
    if filter_fn is not None:
        try:
            state_dict = filter_fn(state_dict, model)
        except Exception as e:  # timm filters raise assorted errors on foreign layouts
            _log.debug("checkpoint filter of %s failed (%s); loading the raw state dict", type(model).__name__, e)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not match {type(model).__name__}: "
            f"missing {sorted(missing)[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {sorted(unexpected)[:8]}{'...' if len(unexpected) > 8 else ''}"
        )


def _model_filter_fn(model: nn.Module):
    module = __import__(type(model).__module__, fromlist=["checkpoint_filter_fn"])
    return getattr(module, "checkpoint_filter_fn", None)


def model_data_config(model: nn.Module) -> dict[str, Any]:
    """timm's data config of the model, with the input size the model was built for.

    ``resolve_model_data_config`` reports the pretrained config's size, which is wrong for a model built with
    another ``img_size``; a fixed-size model can only take its own size, so that wins.
    """
    config = timm.data.resolve_model_data_config(model)
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    if img_size is not None and not getattr(model, "dynamic_img_size", False):
        config["input_size"] = (3, *tuple(img_size))
    return config


def pooled_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The pooled [class] feature (pre-logits, not normalised): what a memory bank stores."""
    return model.forward_head(model.forward_features(images), pre_logits=True)
