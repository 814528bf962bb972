"""Moving a batch's results between devices in one copy."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

import torch

__all__ = ["move_tree", "to_host"]

T = TypeVar("T")

_ALIGN = 16  # bytes; keeps every tensor's slice of the packed buffer aligned for its dtype


def to_host(tensors: Mapping[str, torch.Tensor], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Copy several tensors to ``device`` as one packed byte buffer: one transfer instead of one per tensor.

    Dtypes and shapes are kept exactly. Tensors already on ``device`` are returned as they are.
    """
    device = torch.device(device)
    moving = {k: t for k, t in tensors.items() if t.device != device}
    result = {k: t for k, t in tensors.items() if t.device == device}
    if not moving:
        return result
    source = next(iter(moving.values())).device
    pieces, layout, offset = [], [], 0
    for name, tensor in moving.items():
        raw = tensor.detach().contiguous().view(-1).view(torch.uint8)
        pad = -raw.numel() % _ALIGN
        pieces += [raw, raw.new_zeros(pad)] if pad else [raw]
        layout.append((name, tensor.dtype, tensor.shape, offset, raw.numel()))
        offset += raw.numel() + pad
    packed = torch.cat(pieces)
    if device.type == "cpu" and source.type == "cuda":
        host = torch.empty(packed.numel(), dtype=torch.uint8, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        torch.cuda.current_stream(source).synchronize()
    else:
        host = packed.to(device)
    for name, dtype, shape, start, size in layout:
        result[name] = host[start : start + size].view(dtype).view(shape)
    return {k: result[k] for k in tensors}


def move_tree(tree: T, device: str | torch.device = "cpu") -> T:
    """``tree`` with every tensor moved to ``device`` in one packed copy (:func:`to_host`).

    ``tree`` nests dataclasses and mappings (rebuilt as dicts) around tensors; other leaves (None, numbers,
    strings) are kept as they are.
    """
    tensors: dict[tuple, torch.Tensor] = {}
    _collect(tree, (), tensors)
    return _rebuild(tree, (), to_host(tensors, device))


def _collect(node: Any, path: tuple, tensors: dict[tuple, torch.Tensor]) -> None:
    if isinstance(node, torch.Tensor):
        tensors[path] = node
    elif dataclasses.is_dataclass(node) and not isinstance(node, type):
        for f in dataclasses.fields(node):
            _collect(getattr(node, f.name), (*path, f.name), tensors)
    elif isinstance(node, Mapping):
        for key, value in node.items():
            _collect(value, (*path, key), tensors)


def _rebuild(node: Any, path: tuple, moved: Mapping[tuple, torch.Tensor]) -> Any:
    if isinstance(node, torch.Tensor):
        return moved[path]
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        changes = {f.name: _rebuild(getattr(node, f.name), (*path, f.name), moved) for f in dataclasses.fields(node)}
        return dataclasses.replace(node, **changes)
    if isinstance(node, Mapping):
        return {key: _rebuild(value, (*path, key), moved) for key, value in node.items()}
    return node
