"""GAE (Chefer, Gur & Wolf, "Generic Attention-model Explainability", ICCV 2021): gradient-weighted attention
rollout, in DAAM's own forward and backward pass.

Ā_l = mean_h ReLU(dY/dA_l^h ⊙ A_l^h), with A_l^h the block's full softmax attention (N x N, recomputed in float32
from q and k) and Y DAAM's explained score; R_{-1} = I, R_l = R_{l-1} + Ā_l R_{l-1}; map l = R_l[0, j] over the patch
tokens j. The gradient dY/dA is read off DAAM's backward pass without materialising A in the model: the attention
output of head h is O^h = A^h V^h (dropout is off in eval, and :func:`~pipeline.engine.hooks.check_explainable` admits
no norm or gate between it and ``attn.proj``), so dY/dA^h = (dY/dO^h) (V^h)^T exactly, with dY/dO the gradient at
T_l, the input of ``attn.proj``.

Memory per image: a transient (H, N, N) float32 A and dY/dA for one block at a time in its gradient hook, the
(L, N, N) float32 Ā of every block until the backward pass reaches block 0 (it visits the blocks last to first, R is
built first to last), and the running (N, N) R: for ViT-B/16 at 224 (N = 197, H = L = 12) 3.7 MB transient and
1.9 MB held. The blocks' q, k and v are held until their gradient arrives; autograd keeps them anyway for every
block but the first.
"""

from __future__ import annotations

import torch
from timm.layers import Attention
from torch import Tensor, nn

from pipeline.engine.daam import DAAM
from pipeline.engine.explainers.base import PassExplainer, exact

__all__ = ["GAE"]


class GAE(PassExplainer):
    """Gradient-weighted attention rollout per block, ``(B, L, h, w)``."""

    name = "gae"

    def __init__(self, daam: DAAM) -> None:
        super().__init__(daam)
        for i, block in enumerate(self.model.blocks):
            attn: Attention = block.attn
            self._handles += [
                attn.q_norm.register_forward_hook(self._store_hook(i, "q")),
                attn.k_norm.register_forward_hook(self._store_hook(i, "k")),
                attn.proj.register_forward_hook(self._forward_hook(i, attn)),
            ]

    def _reset(self) -> None:
        super()._reset()
        self._inputs: dict[int, dict[str, Tensor]] = {}  # block -> q, k (B, H, N, d), v (B, N, H, d)
        self._mixed: dict[int, Tensor] = {}  # block -> Ā_l (B, N, N) float32

    def _store_hook(self, i: int, slot: str):
        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            if self._active():
                self._inputs.setdefault(i, {})[slot] = out.detach()

        return hook

    def _forward_hook(self, i: int, attn: Attention):
        """After ``attn.proj``: keep v and hook the gradient at T_l (its input, as DAAM's capture passed it on)."""

        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            if not self._active():
                return
            (t,) = args
            inputs = self._inputs.setdefault(i, {})
            inputs["v"] = self._capture().blocks[i].values.detach()  # set by the capture's qkv hook
            if t.requires_grad:  # the capture makes T_l part of the graph whenever it explains
                t.register_hook(lambda grad: self._gradient_hook(i, attn, grad))

        return hook

    def _gradient_hook(self, i: int, attn: Attention, grad: Tensor) -> None:
        """Ā_l from dY/dT_l (B, N, C); at block 0, the last to get its gradient, the rollout R_l of every block."""
        inputs = self._inputs.pop(i)
        batch, tokens, _ = grad.shape
        with exact(grad.device):
            attention = ((inputs["q"].float() * attn.scale) @ inputs["k"].float().transpose(-2, -1)).softmax(dim=-1)
            grad_out = grad.float().view(batch, tokens, attn.num_heads, attn.head_dim).transpose(1, 2)  # dY/dO^h
            grad_attention = grad_out @ inputs["v"].float().permute(0, 2, 3, 1)  # (B, H, N, d) @ (B, H, d, N)
            del grad_out, inputs
            self._mixed[i] = attention.mul_(grad_attention).clamp_min_(0).mean(dim=1)  # Ā_l, (B, N, N)
            del attention, grad_attention
            if i != 0:
                return
            product = torch.eye(tokens, device=grad.device).expand(batch, tokens, tokens)  # R_{-1} = I
            for block in range(self.num_blocks):
                mixed = self._mixed.pop(block)
                product = product + torch.bmm(mixed, product)
                self._maps[:, block] = product[:, 0, self.num_prefix_tokens :]
        self._finish()
