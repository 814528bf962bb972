"""Raw attention: block l's map is its [class] attention row averaged over the heads, mean_h a_l^h[j] over the patch
tokens j, the row DAAM's capture computes in float32 (docs/method.md)."""

from __future__ import annotations

from torch import Tensor, nn

from pipeline.engine.daam import DAAM
from pipeline.engine.explainers.base import PassExplainer, exact

__all__ = ["RawAttention"]


class RawAttention(PassExplainer):
    """The [class] row of each block's attention, mean over heads, ``(B, L, h, w)``."""

    name = "attention"

    def __init__(self, daam: DAAM) -> None:
        super().__init__(daam)
        for i, block in enumerate(self.model.blocks):
            self._handles.append(block.attn.proj.register_forward_hook(self._hook(i)))

    def _hook(self, i: int):
        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            if not self._active():
                return
            attention = self._capture().blocks[i].attention  # (B, H, N) float32, set by the capture's pre-hook
            with exact(attention.device):
                self._maps[:, i] = attention.detach().mean(dim=1)[:, self.num_prefix_tokens :]
            if i == self.num_blocks - 1:
                self._finish()

        return hook
