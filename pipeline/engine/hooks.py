"""The one object that owns DAAM's hooks on a timm ViT and what they capture.

Per block l, during the forward pass:
- ``attn.qkv`` (forward hook): the value vectors v_l, a view of the qkv output that autograd keeps anyway;
- ``attn.q_norm`` / ``attn.k_norm`` (forward hooks): q and k after any qk-norm, held only until ``attn.proj``;
- ``attn.proj`` (forward pre-hook): the [class] row of the attention, a_l = softmax(q_0 K^T * scale), computed
  in float32 without the N x N matrix; and a gradient hook on T_l (the input of ``attn.proj``) that hands the
  [class] row of dY/dT_l to a callback during the backward pass.

timm's fused attention is left on: only the [class] row is recomputed here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from timm.layers import Attention
from torch import nn
from torch.utils.hooks import RemovableHandle

from pipeline.errors import UnsupportedModelError

__all__ = ["BlockCapture", "BlockState", "check_explainable"]

# (block index, [class] row of dY/dT_l of shape (B, C)) -> None
GradientCallback = Callable[[int, torch.Tensor], None]


@dataclass
class BlockState:
    """What one block captured in the current forward pass."""

    attention: torch.Tensor | None = None  # (B, H, N) float32: a_l, the [class] query's attention row per head
    values: torch.Tensor | None = None  # (B, N, H, d): v_l, in the model's compute dtype
    _q: torch.Tensor | None = None
    _k: torch.Tensor | None = None


def check_explainable(model: nn.Module) -> None:
    """Raise UnsupportedModelError unless DAAM can explain ``model`` exactly.

    DAAM needs a [class] token that makes the decision (token pooling) and, in every block, timm's token
    attention with T_l = concatenated heads at the input of ``attn.proj``.
    """
    name = type(model).__name__
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential | nn.ModuleList) or len(blocks) == 0:
        raise UnsupportedModelError(f"{name} has no sequence of transformer blocks (`model.blocks`)")
    if getattr(model, "cls_token", None) is None:
        raise UnsupportedModelError(f"{name} has no [class] token: DAAM explains the [class] token's decision")
    pool = getattr(model, "global_pool", None)
    if pool != "token":
        raise UnsupportedModelError(
            f"{name} pools its output with global_pool={pool!r}; DAAM needs 'token' pooling, where the [class] "
            "token alone carries the decision"
        )
    for i, block in enumerate(blocks):
        attn = getattr(block, "attn", None)
        if not isinstance(attn, Attention):
            kind = type(attn).__name__ if attn is not None else "no `attn` module"
            raise UnsupportedModelError(
                f"{name} block {i} has {kind}, not timm's token attention (timm.layers.Attention); DAAM needs "
                "softmax attention between tokens (XCiT's cross-covariance attention, relative-position or rotary "
                "attention and fused parallel blocks are not supported)"
            )
        if not isinstance(attn.norm, nn.Identity) or attn.gate is not None:
            raise UnsupportedModelError(
                f"{name} block {i} normalises or gates the attention output before `attn.proj`, so the [class] row "
                "is no longer a sum of per-token contributions"
            )


class BlockCapture:
    """Hooks every block of a timm ViT; a context manager that removes its hooks on exit.

    Args:
        model: A model that passes :func:`check_explainable`.
        on_gradient: Called during the backward pass with (block index, [class] row of dY/dT_l).
    """

    def __init__(self, model: nn.Module, on_gradient: GradientCallback) -> None:
        check_explainable(model)
        self.model = model
        self.on_gradient = on_gradient
        self.blocks = [BlockState() for _ in model.blocks]
        self.root: torch.Tensor | None = None  # T_0, the tensor the backward pass differentiates down to
        self.active = False  # hooks capture only while True: the model stays usable as usual otherwise
        self._handles: list[RemovableHandle] = []
        for i, block in enumerate(model.blocks):
            attn: Attention = block.attn
            self._handles += [
                attn.qkv.register_forward_hook(self._values_hook(i, attn)),
                attn.q_norm.register_forward_hook(self._store_hook(i, "_q")),
                attn.k_norm.register_forward_hook(self._store_hook(i, "_k")),
                attn.proj.register_forward_pre_hook(self._proj_pre_hook(i, attn)),
            ]

    def _values_hook(self, i: int, attn: Attention):
        def hook(module: nn.Module, args: tuple, qkv: torch.Tensor) -> None:
            if not self.active:
                return
            batch, tokens, _ = qkv.shape
            self.blocks[i].values = qkv.view(batch, tokens, 3, attn.num_heads, attn.head_dim)[:, :, 2]

        return hook

    def _store_hook(self, i: int, slot: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if self.active:
                setattr(self.blocks[i], slot, out)

        return hook

    def _proj_pre_hook(self, i: int, attn: Attention):
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            if not self.active:
                return None
            state = self.blocks[i]
            # float32 even under the model's autocast, and no graph: a_l is data, not part of Y
            with torch.no_grad(), torch.autocast(state._k.device.type, enabled=False):
                q0 = state._q[:, :, 0].float()  # (B, H, d)
                scores = torch.einsum("bhd,bhnd->bhn", q0, state._k.float()) * attn.scale
                state.attention = scores.softmax(dim=-1)
            state._q = state._k = None
            (t,) = args
            if not torch.is_grad_enabled():
                return None
            if not t.requires_grad:
                # Nothing upstream needs a gradient (frozen parameters, plain images): T_l becomes the leaf,
                # and the backward pass stops here instead of running through the embedding.
                t = t.detach().requires_grad_(True)
            t.register_hook(lambda grad: self.on_gradient(i, grad[:, 0]))
            if i == 0:
                self.root = t
            return (t,)

        return hook

    def clear(self) -> None:
        """Drop the captured tensors (they pin the batch's activations)."""
        self.blocks = [BlockState() for _ in self.blocks]
        self.root = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def __enter__(self) -> BlockCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
