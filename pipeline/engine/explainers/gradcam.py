"""Grad-CAM on a ViT, in DAAM's own forward and backward pass.

pytorch-grad-cam's ViT Grad-CAM on X, the tokens the last block's attention reads (the output of its ``norm1`` in
timm's pre-norm blocks): map[j] = ReLU(sum_c mean_i(dY/dX[i, c]) X[j, c]), means over the patch tokens i, with Y
DAAM's explained score. Not ``model.norm``'s output: with token pooling only the prefix tokens reach the head from
there, so dY/dX is zero on every patch token (pytorch-grad-cam's ViT tutorial takes ``blocks[-1].norm1`` for this
reason). One map, ``(B, h, w)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pipeline.engine.daam import DAAM
from pipeline.engine.explainers.base import PassExplainer, exact
from pipeline.errors import UnsupportedModelError

__all__ = ["GradCAM"]


class GradCAM(PassExplainer):
    """Grad-CAM on the last block's attention input.

    Raises:
        UnsupportedModelError: a one-block model (its layer lies below where DAAM's backward pass stops).
    """

    name = "gradcam"

    def __init__(self, daam: DAAM) -> None:
        if daam.num_blocks < 2:
            raise UnsupportedModelError(
                f"Grad-CAM needs at least 2 blocks: {type(daam.model).__name__} has {daam.num_blocks}, and block 0's "
                "attention input lies below block 0's `attn.proj` input, where DAAM's backward pass stops"
            )
        super().__init__(daam)
        self._handles.append(self.model.blocks[-1].attn.register_forward_pre_hook(self._forward_hook))

    def _reset(self) -> None:
        super()._reset()
        self._tokens: Tensor | None = None

    def _forward_hook(self, module: nn.Module, args: tuple) -> None:
        tokens = args[0]
        if not self._active() or not tokens.requires_grad:
            return
        self._tokens = tokens.detach()
        tokens.register_hook(self._gradient_hook)

    def _gradient_hook(self, grad: Tensor) -> None:
        prefix = self.num_prefix_tokens
        with exact(grad.device):
            weights = grad[:, prefix:].float().mean(dim=1)  # (B, C)
            cam = torch.einsum("bnc,bc->bn", self._tokens[:, prefix:].float(), weights)
            self._maps[:, 0] = cam.clamp_min(0)
        self._tokens = None
        self._finish()
