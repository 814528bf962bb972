"""Moving a batch's results between devices in one copy."""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["to_host"]

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
