"""Attention rollout (Abnar & Zuidema 2020), in DAAM's own forward pass.

A_l is block l's head-averaged full attention (N x N), recomputed in float32 from its q and k (the model's own fused
attention stays on); Â_l = 0.5 A_l + 0.5 I with its rows normalised; R_0 = Â_0 and R_l = Â_l R_{l-1}, so
R_{L-1} = Â_{L-1} ... Â_0. Map l is R_l[0, j] over the patch tokens j. Only the running (B, N, N) product is kept,
one block at a time.
"""

from __future__ import annotations

import torch
from timm.layers import Attention
from torch import Tensor, nn

from pipeline.engine.daam import DAAM
from pipeline.engine.explainers.base import PassExplainer, exact

__all__ = ["Rollout"]


class Rollout(PassExplainer):
    """Attention rollout per block, ``(B, L, h, w)``."""

    name = "rollout"

    def __init__(self, daam: DAAM) -> None:
        super().__init__(daam)
        for i, block in enumerate(self.model.blocks):
            attn: Attention = block.attn
            self._handles += [
                attn.q_norm.register_forward_hook(self._query_hook),
                attn.k_norm.register_forward_hook(self._key_hook(i, attn)),
            ]

    def _reset(self) -> None:
        super()._reset()
        self._query: Tensor | None = None
        self._product: Tensor | None = None

    def _query_hook(self, module: nn.Module, args: tuple, q: Tensor) -> None:
        if self._active():
            self._query = q

    def _key_hook(self, i: int, attn: Attention):
        def hook(module: nn.Module, args: tuple, k: Tensor) -> None:
            if not self._active():
                return
            q, self._query = self._query, None
            with exact(k.device):
                scores = (q.detach().float() * attn.scale) @ k.detach().float().transpose(-2, -1)  # (B, H, N, N)
                mixed = scores.softmax(dim=-1).mean(dim=1)  # A_l, (B, N, N)
                del scores
                mixed.mul_(0.5).diagonal(dim1=1, dim2=2).add_(0.5)
                mixed.div_(mixed.sum(dim=-1, keepdim=True))
                self._product = mixed if self._product is None else torch.bmm(mixed, self._product)
                self._maps[:, i] = self._product[:, 0, self.num_prefix_tokens :]
            if i == self.num_blocks - 1:
                self._product = None
                self._finish()

        return hook
