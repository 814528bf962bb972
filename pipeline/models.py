"""timm model creation, safe checkpoint loading and the model's own data config."""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
import timm
import torch
from torch import nn

from pipeline.errors import CheckpointError, ConfigError, one_line

if TYPE_CHECKING:
    from pipeline.config import ModelConfig

__all__ = [
    "check_model_source",
    "create_job_model",
    "create_model",
    "load_checkpoint",
    "model_data_config",
    "pooled_features",
    "read_state_dict",
    "tensors_digest",
]

_log = logging.getLogger(__name__)

# Wrappers that training scripts put around a state dict.
_STATE_DICT_KEYS = ("state_dict", "model", "model_ema", "module", "teacher")


def check_model_source(name: str, *, pretrained: bool = False, checkpoint: str | None = None) -> None:
    """Check, without building anything or touching the network, that a model can be created as the job says.

    Raises:
        CheckpointError: an unknown timm name (close matches named), hub weights asked for where downloads are
            off (``HF_HUB_OFFLINE=1``, or an ``hf-hub:`` name without ``DAAM_ALLOW_DOWNLOAD=1``), or a checkpoint
            that does not exist.
    """
    hub = name.startswith(("hf-hub:", "hf_hub:"))
    architecture = name.split(".", 1)[0]
    if not hub and not timm.is_model(architecture):
        close = difflib.get_close_matches(architecture, timm.list_models(), n=3)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise CheckpointError(f"model.name: unknown timm model {name!r}{hint}")
    if checkpoint is not None:
        if not _exists(checkpoint):
            raise CheckpointError(f"model.checkpoint: {checkpoint} does not exist")
        return
    if (pretrained or hub) and not _hub_weights_available(name):
        raise CheckpointError(
            f"model: {name} needs weights from the Hugging Face hub, which this machine cannot reach (and they are "
            "not in its cache); give model.checkpoint (a local .safetensors or torch file)"
        )


def _hub_weights_available(name: str) -> bool:
    """Whether hub weights can be had: in the local hub cache, or the hub answers within 3 s (unless offline)."""
    if os.environ.get("DAAM_ALLOW_DOWNLOAD") == "1":
        return True
    try:
        from huggingface_hub import try_to_load_from_cache

        repo = name.split(":", 1)[1] if ":" in name else timm.models.get_pretrained_cfg(name).hf_hub_id
        if repo and any(
            isinstance(try_to_load_from_cache(repo, file), str) for file in ("model.safetensors", "pytorch_model.bin")
        ):
            return True
    except Exception:  # no pretrained config, no hub library: decided by reachability alone
        _log.debug("no hub cache entry found for %s", name, exc_info=True)
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=3):
            return True
    except OSError:
        return False


def _exists(url: str) -> bool:
    try:
        fs, path = fsspec.core.url_to_fs(url)
        return fs.exists(path)
    except (OSError, ValueError, ImportError):
        return False


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
    except TypeError as e:  # an argument the model's constructor does not take
        raise ConfigError(f"model.kwargs: timm model {name!r} refuses them: {one_line(e)}") from None
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    model.eval().requires_grad_(False)
    return model


def create_job_model(spec: ModelConfig, *, weights: bool = True) -> nn.Module:
    """A job's model (its ``model:`` section), in eval mode with frozen parameters.

    Args:
        spec: The job's model section.
        weights: Load the checkpoint (or hub weights); False builds the architecture only (its data config).
    """
    return create_model(
        spec.name,
        checkpoint=spec.checkpoint if weights else None,
        pretrained=spec.pretrained and weights,
        num_classes=spec.num_classes,
        model_kwargs=spec.kwargs,
    )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors, through timm's reader (safetensors, or torch files with ``weights_only=True``); an
    fsspec URL is copied to a local cache first; wrappers of training scripts (``teacher``, ...) are unwrapped."""
    path = str(path)
    try:
        local = path if "://" not in path else fsspec.open_local(f"simplecache::{path}")
        obj = timm.models.load_state_dict(local, use_ema=False, weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"model.checkpoint: {path} not found") from e
    except Exception as e:  # unpickling refusals and damaged files come in many types
        raise CheckpointError(
            f"model.checkpoint: {path} cannot be loaded safely (safetensors, or torch with weights_only=True): "
            f"{one_line(e)}"
        ) from None
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _STATE_DICT_KEYS if k in obj), None)
        if inner is None:
            raise CheckpointError(f"model.checkpoint: {path} holds no state dict (keys: {sorted(obj)[:10]})")
        obj = inner
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load weights strictly, through timm's own checkpoint filter (so original DINO/DeiT files load too).

    Raises:
        CheckpointError: the file is missing or unsafe to unpickle, or does not fit the model: the first tensor of
            another shape is named with both shapes, then missing and unexpected keys.
    """
    state_dict = read_state_dict(path)
    filter_fn = getattr(model, "pretrained_cfg", {}).get("checkpoint_filter_fn") or _model_filter_fn(model)
    if filter_fn is not None:
        try:
            state_dict = filter_fn(state_dict, model)
        except Exception as e:  # timm filters raise assorted errors on foreign layouts
            _log.debug("checkpoint filter of %s failed (%s); loading the raw state dict", type(model).__name__, e)
    own = model.state_dict()
    for key, tensor in own.items():
        if key in state_dict and tuple(state_dict[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"model.checkpoint: {path} does not fit {type(model).__name__}: {key}: checkpoint "
                f"{tuple(state_dict[key].shape)} vs model {tuple(tensor.shape)}"
            )
    missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"model.checkpoint: {path} does not fit {type(model).__name__}: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    model.load_state_dict(state_dict, strict=True)


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of tensors by name: each one's name, dtype, shape and values, in name order (how they were saved,
    .safetensors or a torch file, does not count)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\n".encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return "sha256:" + digest.hexdigest()


def _model_filter_fn(model: nn.Module):
    module = __import__(type(model).__module__, fromlist=["checkpoint_filter_fn"])
    return getattr(module, "checkpoint_filter_fn", None)


def model_data_config(model: nn.Module) -> dict[str, Any]:
    """timm's data config of the model, with the input size the model was built for.

    ``resolve_model_data_config`` reports the pretrained config's size, which is wrong for a model built with
    another ``img_size`` (``kwargs: {img_size: [160, 256]}``): the size it was built with wins, dynamic or not.
    """
    config = timm.data.resolve_model_data_config(model)
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:  # the size the model was built for (a dynamic model's natural size too)
        config["input_size"] = (3, *tuple(img_size))
    return config


def pooled_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The pooled [class] feature (pre-logits, not normalised): what a memory bank stores."""
    return model.forward_head(model.forward_features(images), pre_logits=True)
