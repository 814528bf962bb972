"""docs/method.md as code: ``DAAM(model)(images)`` -> block maps, accumulated maps and coefficients, batched.

One forward pass (timm's fused attention kept) and one backward pass from the explained score down to T_0, the
input of the first block's ``attn.proj``. Parameters get no gradients. During the backward pass each block's
gradient hook turns the [class] row of dY/dT_l into the block map with the cheap form of docs/method.md ("The
cheap form used in the backward pass"),

    M_l[j] = ReLU( sum_h a_l^h[j] * <v_l^h[j, :], c_l^h> ),   c_l -> ReLU(c_l) for supervised models,

so the decomposed features S_l never exist as a (B, N, C) tensor. Everything stays on the images' device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.engine.hooks import BlockCapture, check_explainable
from pipeline.engine.transfer import move_tree
from pipeline.errors import InputError, TargetError

__all__ = ["DAAM", "DAAMResult", "WeightsFn"]

# pooled features (B, D) float32, detached -> dimension-wise importance weights (B, D)
WeightsFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class DAAMResult:
    """DAAM of one batch; float32 tensors on the images' device unless moved."""

    block_maps: torch.Tensor  # (B, L, h, w): M_l
    daam: torch.Tensor  # (B, L, h, w): D_l = sum_{i <= l} M_i
    coefficients: torch.Tensor  # (B, L, C): c_l, the raw gradient before any ReLU
    output: torch.Tensor  # (B, K) logits, or (B, D) pooled features for a model without a head
    target: torch.Tensor | None  # (B,) explained class; None in self-supervised mode
    weights: torch.Tensor | None = None  # (B, D) dimension-wise weights w used in self-supervised mode

    def to(self, device: str | torch.device) -> DAAMResult:
        """All tensors on ``device``, moved with one copy."""
        return move_tree(self, device)

    def cpu(self) -> DAAMResult:
        return self.to("cpu")


class DAAM:
    """Explains a timm ViT with DAAM; a context manager owning the model's hooks.

    On entry the model is put in eval mode with frozen parameters; both are restored on exit.

    Args:
        model: A timm ViT with a [class] token and token pooling (``vit_*``, ``deit*``, DINO, DINOv2 with
            registers, qk-norm models, ``dynamic_img_size=True`` models). For distilled DeiT the explained score
            is the model's eval output, the mean of the [class] and distillation heads, and the maps are those of
            the [class] token's attention (the distillation token is a prefix token, dropped from the maps).
        autocast_dtype: Run the model under ``torch.autocast`` with this dtype (e.g. ``torch.bfloat16``); the
            maps and coefficients are returned in float32 either way.

    Raises:
        UnsupportedModelError: the model has no [class] token, does not pool it, or lacks token attention.
    """

    def __init__(self, model: nn.Module, *, autocast_dtype: torch.dtype | None = None) -> None:
        check_explainable(model)
        self.model = model
        self.autocast_dtype = autocast_dtype
        self.num_blocks = len(model.blocks)
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        attn = model.blocks[0].attn
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        self._capture: BlockCapture | None = None
        self._saved_state: tuple[bool, list[bool]] | None = None
        self._batch: dict[str, Any] = {}

    @property
    def capture(self) -> BlockCapture | None:
        """The hooks and their per-block captures while the engine is open (comparison explainers read them)."""
        return self._capture

    # -- context -------------------------------------------------------------------------------------------
    def open(self) -> DAAM:
        """Install the hooks and freeze the model (what ``with DAAM(model)`` does)."""
        if self._capture is None:
            params = list(self.model.parameters())
            self._saved_state = (self.model.training, [p.requires_grad for p in params])
            self.model.eval().requires_grad_(False)
            self._capture = BlockCapture(self.model, self._on_gradient)
        return self

    def close(self) -> None:
        """Remove the hooks and restore the model's mode and ``requires_grad`` flags."""
        if self._capture is None:
            return
        self._capture.remove()
        self._capture = None
        training, flags = self._saved_state
        self.model.train(training)
        for p, flag in zip(self.model.parameters(), flags, strict=True):
            p.requires_grad_(flag)

    def __enter__(self) -> DAAM:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- explaining ----------------------------------------------------------------------------------------
    def grid_size(self, image_size: Sequence[int]) -> tuple[int, int]:
        """The (h, w) patch grid of an input of ``image_size`` (H, W), as the model computes it."""
        patch_embed = self.model.patch_embed
        if getattr(self.model, "dynamic_img_size", False):
            patch = tuple(patch_embed.patch_size)
            if not getattr(patch_embed, "dynamic_img_pad", False) and any(
                s % p for s, p in zip(image_size, patch, strict=True)
            ):
                raise InputError(
                    f"images of size {tuple(image_size)} are not divisible by the patch size {patch} of "
                    f"{type(self.model).__name__}; resize them or build the model with dynamic_img_pad=True"
                )
            return tuple(patch_embed.dynamic_feat_size(tuple(image_size)))
        expected = tuple(patch_embed.img_size)
        if tuple(image_size) != expected and getattr(patch_embed, "strict_img_size", True):
            raise InputError(
                f"images of size {tuple(image_size)} do not fit {type(self.model).__name__}, built for {expected}; "
                "resize them or build the model with dynamic_img_size=True"
            )
        return tuple(patch_embed.grid_size)

    def __call__(
        self,
        images: torch.Tensor,
        target: torch.Tensor | Sequence[int] | None = None,
        weights: torch.Tensor | WeightsFn | None = None,
    ) -> DAAMResult:
        """Explain a batch.

        Args:
            images: (B, 3, H, W) normalised images on the model's device.
            target: Supervised mode: the class to explain per image; default the predicted top-1 class.
            weights: Self-supervised mode (Y = <f, w>): the weights w (B, D), or a function of the detached
                pooled features f (B, D) returning them (how a memory bank joins the same pass).

        Returns:
            The maps, coefficients and output of the batch, on the images' device.
        """
        if target is not None and weights is not None:
            raise TargetError("pass either target= (supervised) or weights= (self-supervised), not both")
        if images.ndim != 4:
            raise InputError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        self.open()
        batch = images.shape[0]
        h, w = self.grid_size(images.shape[-2:])
        supervised = weights is None
        kw = dict(device=images.device, dtype=torch.float32)
        self._batch = dict(
            supervised=supervised,
            maps=torch.zeros(batch, self.num_blocks, h * w, **kw),
            coefficients=torch.zeros(batch, self.num_blocks, self.num_heads * self.head_dim, **kw),
        )
        autocast = (
            torch.autocast(images.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        self._capture.active = True
        try:
            with torch.enable_grad():
                with autocast:
                    features = self.model.forward_features(images)
                    tokens = self._capture.blocks[0].values.shape[1]
                    if tokens != self.num_prefix_tokens + h * w:
                        raise InputError(
                            f"{tokens} tokens do not match {self.num_prefix_tokens} prefix tokens and a {h}x{w} grid"
                        )
                    if supervised:
                        score, output, target = self._class_score(features, target)
                        used_weights = None
                    else:
                        score, output, used_weights = self._feature_score(features, weights)
                torch.autograd.grad(score, self._capture.root)
            maps = self._batch["maps"].view(batch, self.num_blocks, h, w)
            return DAAMResult(
                block_maps=maps,
                daam=maps.cumsum(dim=1),
                coefficients=self._batch["coefficients"],
                output=output,
                target=target,
                weights=used_weights,
            )
        finally:
            self._capture.active = False
            self._batch = {}
            self._capture.clear()

    def _class_score(self, features: torch.Tensor, target: torch.Tensor | Sequence[int] | None):
        if getattr(self.model, "num_classes", None) == 0:
            raise TargetError(
                f"{type(self.model).__name__} has no classifier; explain it in self-supervised mode with weights="
            )
        logits = self.model.forward_head(features)
        if target is None:
            target = logits.detach().argmax(dim=-1)
        else:
            target = torch.as_tensor(target, device=logits.device).long()
            if target.shape != logits.shape[:1]:
                raise TargetError(
                    f"target must hold one class per image, shape ({logits.shape[0]},), got {tuple(target.shape)}"
                )
            bad = (target < 0) | (target >= logits.shape[1])
            if bad.any():
                raise TargetError(f"target classes {target[bad].tolist()} outside [0, {logits.shape[1]})")
        score = logits.gather(1, target[:, None]).float().sum()
        return score, logits.detach().float(), target

    def _feature_score(self, features: torch.Tensor, weights: torch.Tensor | WeightsFn):
        pooled = self.model.forward_head(features, pre_logits=True)
        detached = pooled.detach().float()
        w = weights(detached) if callable(weights) else torch.as_tensor(weights)
        if w.shape != pooled.shape:
            raise TargetError(
                f"weights must have the pooled features' shape {tuple(pooled.shape)}, got {tuple(w.shape)}"
            )
        w = w.to(device=pooled.device, dtype=torch.float32)
        score = (pooled.float() * w).sum()
        if getattr(self.model, "num_classes", 0):
            with torch.no_grad():
                output = self.model.forward_head(features.detach()).float()
        else:
            output = detached
        return score, output, w

    def _on_gradient(self, block: int, grad_cls: torch.Tensor) -> None:
        """Backward hook of block ``block``: coefficients c_l and the block map M_l, on the device."""
        state = self._capture.blocks[block]
        batch = grad_cls.shape[0]
        coefficients = grad_cls.float()
        self._batch["coefficients"][:, block] = coefficients
        channel_weights = coefficients.clamp_min(0) if self._batch["supervised"] else coefficients
        # <v^h[j, :], c^h> for every token j and head h, then weighted by the [class] attention a^h[j]
        head_scores = torch.einsum(
            "bnhd,bhd->bhn", state.values.float(), channel_weights.view(batch, self.num_heads, self.head_dim)
        )
        block_map = (state.attention * head_scores).sum(dim=1)[:, self.num_prefix_tokens :]
        self._batch["maps"][:, block] = block_map.clamp_min(0)
        state.values = state.attention = None
