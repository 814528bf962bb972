"""Comparison explainers computed in DAAM's own forward and backward pass: attention rollout, raw attention, Grad-CAM
and GAE.

``Baselines(daam, names)`` adds hooks next to DAAM's; one ``daam(images, ...)`` call then also yields the
requested maps, read with :meth:`Baselines.maps`. Per block l, P prefix tokens, patch tokens j >= P:

- ``rollout`` (Abnar & Zuidema 2020): A_l = the head-averaged full attention (N x N), recomputed in float32 from
  the block's q and k (the model's own fused attention stays on); Â_l = 0.5 A_l + 0.5 I, rows normalised;
  R_l = Â_l @ R_{l-1} with R_1 = Â_1, so R_L = Â_L @ ... @ Â_1. Map l = R_l[0, j]. Only the running (B, N, N)
  product is kept, one block at a time.
- ``attention``: map l = the [class] row a_l averaged over heads, a_l[j] (the row DAAM's capture computes).
- ``gradcam``: pytorch-grad-cam's ViT Grad-CAM on X, the tokens the last block's attention reads (the output of
  its ``norm1`` in timm's pre-norm blocks): map[j] = ReLU(sum_c mean_i(dY/dX[i, c]) X[j, c]), means over patch
  tokens i, with Y DAAM's explained score. Not ``model.norm``'s output: with token pooling only the prefix tokens
  reach the head from there, so dY/dX is zero on every patch token (pytorch-grad-cam's ViT tutorial takes
  ``blocks[-1].norm1`` for this reason).

- ``gae`` (Chefer, Gur & Wolf, "Generic Attention-model Explainability", ICCV 2021, gradient-weighted rollout):
  Ā_l = mean_h ReLU(dY/dA_l^h ⊙ A_l^h), with A_l^h the block's full softmax attention (N x N, recomputed in float32
  from q and k) and Y DAAM's explained score; R_0 = I, R_l = R_{l-1} + Ā_l @ R_{l-1}; map l = R_l[0, j]. The
  gradient dY/dA is read off DAAM's backward pass without materialising A in the model: the attention output of
  head h is O^h = A^h V^h (dropout is off in eval, and :func:`~pipeline.engine.hooks.check_explainable` admits no
  norm or gate between it and ``attn.proj``), so dY/dA^h = (dY/dO^h) (V^h)^T exactly, with dY/dO the gradient at
  T_l, the input of ``attn.proj``. Memory per image: a transient (H, N, N) float32 A and dY/dA for one block at a
  time in its gradient hook, the (L, N, N) float32 Ā of every block until the backward pass reaches block 0 (it
  visits the blocks last to first, R is built first to last), and the running (N, N) R: for ViT-B/16 at 224
  (N = 197, H = L = 12) 3.7 MB transient and 1.9 MB held. The blocks' q, k and v are held until their gradient
  arrives; autograd keeps them anyway for every block but the first.

Rollout, attention and GAE have one map per block, (B, L, h, w), the last being the method's map; Grad-CAM has one,
(B, 1, h, w). Maps are raw float32 values on the images' device, not normalised.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from timm.layers import Attention
from torch import nn
from torch.utils.hooks import RemovableHandle

from pipeline.engine.daam import DAAM
from pipeline.engine.hooks import BlockCapture
from pipeline.errors import ConfigError, PipelineError, UnsupportedModelError
from pipeline.names import COMPARISON_EXPLAINERS as BASELINES
from pipeline.names import PER_BLOCK_EXPLAINERS

__all__ = ["BASELINES", "Baselines"]


@contextlib.contextmanager
def _exact(device: torch.device) -> Iterator[None]:
    """Float32 arithmetic outside autograd, whatever autocast the model runs under."""
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        yield


class Baselines:
    """Attention rollout, raw attention, Grad-CAM and GAE alongside DAAM; a context manager owning its hooks.

    Hooks act only while DAAM's capture is active, i.e. during a ``daam(...)`` call::

        with DAAM(model) as daam, Baselines(daam, ["rollout", "attention", "gradcam"]) as extra:
            result = daam(images)
            maps = extra.maps()  # {"rollout": (B, L, h, w), "attention": (B, L, h, w), "gradcam": (B, 1, h, w)}

    Args:
        daam: The DAAM engine whose passes compute the maps (opened now or later).
        names: Explainers among :data:`BASELINES`.

    Raises:
        ConfigError: an unknown or empty list of names.
        UnsupportedModelError: Grad-CAM on a one-block model (its layer lies below T_1, where DAAM's backward stops).
    """

    def __init__(self, daam: DAAM, names: Sequence[str]) -> None:
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in BASELINES]
        if unknown or not names:
            raise ConfigError(f"unknown explainers {unknown or names}; valid names: {', '.join(BASELINES)}")
        self.names = tuple(dict.fromkeys(names))
        self.daam = daam
        model = daam.model
        self.model = model
        self.num_blocks = len(model.blocks)
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        if "gradcam" in self.names and self.num_blocks < 2:
            raise UnsupportedModelError(
                f"Grad-CAM needs at least 2 blocks: {type(model).__name__} has {self.num_blocks}, and the first "
                "block's attention input lies below T_1, where DAAM's backward pass stops"
            )
        self._handles: list[RemovableHandle] = [model.patch_embed.register_forward_pre_hook(self._start_hook)]
        for i, block in enumerate(model.blocks):
            attn: Attention = block.attn
            if "rollout" in self.names:
                self._handles += [
                    attn.q_norm.register_forward_hook(self._query_hook),
                    attn.k_norm.register_forward_hook(self._rollout_hook(i, attn)),
                ]
            if "attention" in self.names:
                self._handles.append(attn.proj.register_forward_hook(self._attention_hook(i)))
            if "gae" in self.names:
                self._handles += [
                    attn.q_norm.register_forward_hook(self._gae_store_hook(i, "q")),
                    attn.k_norm.register_forward_hook(self._gae_store_hook(i, "k")),
                    attn.proj.register_forward_hook(self._gae_forward_hook(i, attn)),
                ]
        if "gradcam" in self.names:
            self._handles.append(model.blocks[-1].attn.register_forward_pre_hook(self._gradcam_forward_hook))
        self._reset()

    # -- state ---------------------------------------------------------------------------------------------
    def _capture(self) -> BlockCapture | None:
        """DAAM's current capture (a DAAM makes a new one each time it is opened); None while it is closed."""
        return self.daam.capture

    def _active(self) -> bool:
        capture = self._capture()
        return capture is not None and capture.active

    def _reset(self) -> None:
        self._grid: tuple[int, int] | None = None
        self._maps: dict[str, torch.Tensor] = {}
        self._pending: set[str] = set()
        self._query: torch.Tensor | None = None
        self._product: torch.Tensor | None = None
        self._tokens: torch.Tensor | None = None
        self._gae_inputs: dict[int, dict[str, torch.Tensor]] = {}  # block -> q, k (B, H, N, d), v (B, N, H, d)
        self._gae_mixed: dict[int, torch.Tensor] = {}  # block -> Ā_l (B, N, N) float32

    def maps(self) -> dict[str, torch.Tensor]:
        """The maps of the latest explanation, then forgotten.

        Returns:
            {name: float32 maps on the images' device}: (B, L, h, w) for rollout and attention (block l's map at
            index l, blocks numbered from 0), (B, 1, h, w) for Grad-CAM; in the order the names were given.

        Raises:
            PipelineError: no explanation ran since the last read, or it failed before computing every map.
        """
        if self._grid is None or self._pending:
            missing = sorted(self._pending) if self._grid is not None else list(self.names)
            raise PipelineError(f"no maps for {missing}: read them once after each completed daam(...) call")
        h, w = self._grid
        maps = {name: self._maps[name].unflatten(-1, (h, w)) for name in self.names}
        self._reset()
        return maps

    # -- hooks ---------------------------------------------------------------------------------------------
    def _start_hook(self, module: nn.Module, args: tuple) -> None:
        """Start of a forward pass: fresh buffers for this batch."""
        if not self._active():
            return
        self._reset()
        images = args[0]
        self._grid = tuple(int(s) for s in module.dynamic_feat_size(tuple(images.shape[-2:])))
        patches = self._grid[0] * self._grid[1]
        kw = dict(device=images.device, dtype=torch.float32)
        for name in self.names:
            maps = self.num_blocks if name in PER_BLOCK_EXPLAINERS else 1
            self._maps[name] = torch.zeros(images.shape[0], maps, patches, **kw)
        self._pending = set(self.names)

    def _query_hook(self, module: nn.Module, args: tuple, q: torch.Tensor) -> None:
        if self._active():
            self._query = q

    def _rollout_hook(self, i: int, attn: Attention):
        def hook(module: nn.Module, args: tuple, k: torch.Tensor) -> None:
            if not self._active():
                return
            q, self._query = self._query, None
            with _exact(k.device):
                scores = (q.detach().float() * attn.scale) @ k.detach().float().transpose(-2, -1)  # (B, H, N, N)
                mixed = scores.softmax(dim=-1).mean(dim=1)  # A_l, (B, N, N)
                del scores
                mixed.mul_(0.5).diagonal(dim1=1, dim2=2).add_(0.5)
                mixed.div_(mixed.sum(dim=-1, keepdim=True))
                self._product = mixed if self._product is None else torch.bmm(mixed, self._product)
                self._maps["rollout"][:, i] = self._product[:, 0, self.num_prefix_tokens :]
            if i == self.num_blocks - 1:
                self._product = None
                self._pending.discard("rollout")

        return hook

    def _attention_hook(self, i: int):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if not self._active():
                return
            attention = self._capture().blocks[i].attention  # (B, H, N) float32, set by the capture's pre-hook
            with _exact(attention.device):
                self._maps["attention"][:, i] = attention.detach().mean(dim=1)[:, self.num_prefix_tokens :]
            if i == self.num_blocks - 1:
                self._pending.discard("attention")

        return hook

    def _gradcam_forward_hook(self, module: nn.Module, args: tuple) -> None:
        tokens = args[0]
        if not self._active() or not tokens.requires_grad:
            return
        self._tokens = tokens.detach()
        tokens.register_hook(self._gradcam_gradient_hook)

    def _gradcam_gradient_hook(self, grad: torch.Tensor) -> None:
        prefix = self.num_prefix_tokens
        with _exact(grad.device):
            weights = grad[:, prefix:].float().mean(dim=1)  # (B, C)
            cam = torch.einsum("bnc,bc->bn", self._tokens[:, prefix:].float(), weights)
            self._maps["gradcam"][:, 0] = cam.clamp_min(0)
        self._tokens = None
        self._pending.discard("gradcam")

    def _gae_store_hook(self, i: int, slot: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if self._active():
                self._gae_inputs.setdefault(i, {})[slot] = out.detach()

        return hook

    def _gae_forward_hook(self, i: int, attn: Attention):
        """After ``attn.proj``: keep v and hook the gradient at T_l (its input, as DAAM's capture passed it on)."""

        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if not self._active():
                return
            (t,) = args
            inputs = self._gae_inputs.setdefault(i, {})
            inputs["v"] = self._capture().blocks[i].values.detach()  # set by the capture's qkv hook
            if t.requires_grad:  # the capture makes T_l part of the graph whenever it explains
                t.register_hook(lambda grad: self._gae_gradient_hook(i, attn, grad))

        return hook

    def _gae_gradient_hook(self, i: int, attn: Attention, grad: torch.Tensor) -> None:
        """Ā_l from dY/dT_l (B, N, C); at block 0, the last to get its gradient, the rollout R_l of every block."""
        inputs = self._gae_inputs.pop(i)
        batch, tokens, _ = grad.shape
        with _exact(grad.device):
            attention = ((inputs["q"].float() * attn.scale) @ inputs["k"].float().transpose(-2, -1)).softmax(dim=-1)
            grad_out = grad.float().view(batch, tokens, attn.num_heads, attn.head_dim).transpose(1, 2)  # dY/dO^h
            grad_attention = grad_out @ inputs["v"].float().permute(0, 2, 3, 1)  # (B, H, N, d) @ (B, H, d, N)
            del grad_out, inputs
            self._gae_mixed[i] = attention.mul_(grad_attention).clamp_min_(0).mean(dim=1)  # Ā_l, (B, N, N)
            del attention, grad_attention
            if i != 0:
                return
            product = torch.eye(tokens, device=grad.device).expand(batch, tokens, tokens)  # R_0 = I
            for block in range(self.num_blocks):
                mixed = self._gae_mixed.pop(block)
                product = product + torch.bmm(mixed, product)
                self._maps["gae"][:, block] = product[:, 0, self.num_prefix_tokens :]
        self._pending.discard("gae")

    # -- context -------------------------------------------------------------------------------------------
    def remove(self) -> None:
        """Remove the hooks and drop all captured state."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._reset()

    def __enter__(self) -> Baselines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
