"""AttnLRP and CP-LRP: layer-wise relevance propagation through a timm ViT, in a pass of their own.

Both are Gradient x Input with modified backward rules (Achtibat et al., "AttnLRP: Attention-Aware Layer-Wise
Relevance Propagation for Transformers", ICML 2024; CP-LRP: Ali et al., "XAI for Transformers: Better Explanations
through Conservative Propagation", ICML 2022). Relevance at a tensor x is R = x ⊙ dY/dx with the modified gradient;
through every linear map (the linear layers, the residual adds, LayerScale, the head) the plain gradient is LRP's
z-rule, so only the non-linear steps get a rule, set by swapping the forwards of a few module instances for the
explanation pass only (:func:`relevance_rules`):

- every LayerNorm: its standard deviation is held constant in the backward pass (the identity rule on the
  normalisation; the mean is subtracted as the linear map it is);
- the MLP's activation f (GELU): the identity rule, dY/dx = f(x) / x * dY/df (relevance passes through unchanged);
- the attention, through the gradient of the q, k and v thirds of ``attn.qkv``'s output. AttnLRP: the uniform rule
  on the two products, softmax(q k^T) and A v, halves the relevance at each factor, so q and k get 1/4 of their
  gradient and v 1/2; the softmax keeps its plain gradient, which is AttnLRP's softmax rule in Gradient x Input
  form. CP-LRP: q and k get no gradient (the attention matrix is a constant) and v its whole gradient.

Every swapped forward returns exactly what the module's own forward returns (timm's fused attention stays on), so
the pass computes the model's outputs bit for bit. With Y the score DAAM explained, the relevance is read at the
patch embedding's output (the patch tokens before the position embedding and the prefix tokens join them: the input
map) and at every block's input (block l's map), summed over the channels. CP-LRP conserves relevance: in a model
without biases, position embedding or learned prefix tokens, every block's input relevance over all tokens, and the
input map, sum to Y. AttnLRP's softmax rule absorbs part of it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial

import torch
from timm.layers import Mlp
from torch import Tensor, nn

from pipeline.engine.daam import DAAM, DAAMResult
from pipeline.engine.explainers.base import Explainer, ExplainerMaps
from pipeline.errors import UnsupportedModelError
from pipeline.names import EXPLAINER_ARRAYS

__all__ = ["CPLRP", "LRP", "QKV_GRADIENT", "AttnLRP", "RelevanceTaps", "relevance", "relevance_rules"]

QKV_GRADIENT = {"attnlrp": (0.25, 0.25, 0.5), "cplrp": (0.0, 0.0, 1.0)}
"""The share of the gradient the q, k and v thirds of ``attn.qkv``'s output pass on, by rule set."""


def _wide(t: Tensor) -> Tensor:
    """``t`` in float32 at least (float64 stays float64, for exact references)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class _IdentityRule(torch.autograd.Function):
    """y = f(x) for an elementwise f; backward dy -> dy * f(x) / x, so that x * dY/dx = y * dY/dy (zero at x = 0)."""

    @staticmethod
    def forward(ctx, x: Tensor, f: Callable[[Tensor], Tensor]) -> Tensor:
        y = f(x)
        ctx.save_for_backward(torch.where(x == 0, 0, y / x))
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (ratio,) = ctx.saved_tensors
        return grad * ratio, None


class _LayerNormIdentityRule(torch.autograd.Function):
    """LayerNorm's own output; backward with its standard deviation sigma held constant: y = (x - mean) / sigma * w +
    b is then linear in x, and dy -> c / sigma * w * dy with c the centring over the channels (its own transpose)."""

    @staticmethod
    def forward(ctx, x: Tensor, norm: nn.LayerNorm, forward: Callable[[Tensor], Tensor]) -> Tensor:
        y = forward(x)
        sigma = (_wide(x).var(dim=-1, unbiased=False, keepdim=True) + norm.eps).sqrt()
        ctx.save_for_backward(sigma, norm.weight)
        ctx.dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        sigma, weight = ctx.saved_tensors
        scaled = _wide(grad) / sigma
        if weight is not None:
            scaled = scaled * weight
        return (scaled - scaled.mean(dim=-1, keepdim=True)).to(ctx.dtype), None, None


class _QKVGradient(torch.autograd.Function):
    """The qkv output as it is; backward scales the gradient of its q, k and v thirds (timm's channel layout)."""

    @staticmethod
    def forward(ctx, qkv: Tensor, factors: tuple[float, float, float]) -> Tensor:
        ctx.factors = factors
        return qkv.view_as(qkv)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        factors = torch.tensor(ctx.factors, dtype=grad.dtype, device=grad.device)
        return (grad.unflatten(-1, (3, -1)) * factors[:, None]).flatten(-2), None


def _layer_norm_rule(norm: nn.LayerNorm) -> Callable[[Tensor], Tensor]:
    forward = norm.forward
    return lambda x: _LayerNormIdentityRule.apply(x, norm, forward)


def _activation_rule(act: nn.Module) -> Callable[[Tensor], Tensor]:
    forward = act.forward
    return lambda x: _IdentityRule.apply(x, forward)


def _qkv_rule(qkv: nn.Linear, factors: tuple[float, float, float]) -> Callable[[Tensor], Tensor]:
    forward = qkv.forward
    return lambda x: _QKVGradient.apply(forward(x), factors)


@dataclass
class RelevanceTaps:
    """What the swapped forwards tap during one pass: the tensors whose relevance is read."""

    embedding: Tensor | None = None  # the patch embedding's output, a leaf of the pass's graph
    block_inputs: list[Tensor] = field(default_factory=list)  # block l's input, in block order


def _check_rules_apply(model: nn.Module) -> None:
    """Raise UnsupportedModelError where a rule is missing: a norm other than LayerNorm, an MLP other than timm's."""
    name = type(model).__name__
    for path, module in model.named_modules():
        if "Norm" in type(module).__name__ and not isinstance(module, nn.LayerNorm):
            raise UnsupportedModelError(
                f"{name}.{path} is a {type(module).__name__}; the LRP rules hold LayerNorm's standard deviation "
                "constant and have no rule for other normalisations"
            )
    for i, block in enumerate(model.blocks):
        if type(getattr(block, "mlp", None)) is not Mlp:
            raise UnsupportedModelError(
                f"{name} block {i} has a {type(getattr(block, 'mlp', None)).__name__} MLP; the LRP rules are written "
                "for timm's Mlp (one elementwise activation between two linear layers), not gated MLPs"
            )


@contextlib.contextmanager
def relevance_rules(model: nn.Module, qkv_gradient: tuple[float, float, float]) -> Iterator[RelevanceTaps]:
    """The LRP rules on ``model`` for the passes run inside the context, by swapping forwards per module instance.

    Nothing global changes: each swapped module gets its own ``forward`` attribute, removed on exit (also on an
    exception), restoring whatever it had. Outputs are unchanged; only the backward pass follows the rules.

    Args:
        model: A timm ViT that :func:`~pipeline.engine.hooks.check_explainable` accepts, with LayerNorm norms and
            timm's Mlp.
        qkv_gradient: The shares of the gradient the q, k and v thirds of ``attn.qkv`` pass on
            (:data:`QKV_GRADIENT`).

    Yields:
        The tapped tensors of the latest pass (the patch embedding's output, each block's input).

    Raises:
        UnsupportedModelError: a norm other than LayerNorm or an MLP other than timm's Mlp.
    """
    _check_rules_apply(model)
    taps = RelevanceTaps()
    swapped: list[tuple[nn.Module, Callable | None]] = []  # module, its own forward attribute before (or None)

    def swap(module: nn.Module, forward: Callable) -> None:
        swapped.append((module, module.__dict__.get("forward")))
        module.forward = forward

    def embed(forward: Callable, images: Tensor) -> Tensor:
        taps.embedding = forward(images).detach().requires_grad_(True)
        taps.block_inputs.clear()
        return taps.embedding

    def block_input(forward: Callable, x: Tensor, *args, **kwargs) -> Tensor:
        taps.block_inputs.append(x)
        return forward(x, *args, **kwargs)

    try:
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                swap(module, _layer_norm_rule(module))
        for block in model.blocks:
            swap(block.mlp.act, _activation_rule(block.mlp.act))
            swap(block.attn.qkv, _qkv_rule(block.attn.qkv, qkv_gradient))
            swap(block, partial(block_input, block.forward))
        swap(model.patch_embed, partial(embed, model.patch_embed.forward))
        yield taps
    finally:
        taps.embedding = None
        taps.block_inputs.clear()
        for module, forward in reversed(swapped):
            if forward is None:
                del module.forward
            else:
                module.forward = forward


def relevance(
    model: nn.Module,
    images: Tensor,
    qkv_gradient: tuple[float, float, float],
    *,
    target: Tensor | None = None,
    weights: Tensor | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Relevance of every token at every block's input and of the patch embedding, in one forward and backward pass.

    Y is summed over the batch (images do not interact in eval mode): the logit of ``target`` per image, or
    ``<f, w>`` with f the pooled features and ``weights`` w (self-supervised), as DAAM explains them.

    Args:
        model: A timm ViT in eval mode (see :func:`relevance_rules`).
        images: ``(B, 3, H, W)`` normalised images.
        qkv_gradient: The attention's rule (:data:`QKV_GRADIENT`).
        target: ``(B,)`` explained classes (supervised), or None with ``weights``.
        weights: ``(B, D)`` dimension-wise weights (self-supervised), or None with ``target``.
        autocast_dtype: Run the model under autocast with this dtype; the relevance is float32 either way.

    Returns:
        ``(B, L, N)``: block l's input relevance per token (prefix tokens first), and ``(B, n)``: the patch
        embedding's relevance per patch, row-major; float32 (float64 for a float64 model).
    """
    autocast = torch.autocast(images.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    with relevance_rules(model, qkv_gradient) as taps, torch.enable_grad():
        with autocast:
            features = model.forward_features(images)
            if target is not None:
                score = _wide(model.forward_head(features).gather(1, target[:, None])).sum()
            else:
                score = (_wide(model.forward_head(features, pre_logits=True)) * weights).sum()
        blocks: list[Tensor | None] = [None] * len(taps.block_inputs)
        for i, x in enumerate(taps.block_inputs):  # read as the backward pass goes: one (B, N, C) gradient at a time
            x.register_hook(partial(_read_relevance, blocks, i, x.detach()))  # detached: no cycle through the hook
        (grad,) = torch.autograd.grad(score, taps.embedding)
        embedding = _token_relevance(taps.embedding, grad).flatten(1)
    return torch.stack(blocks, dim=1), embedding


def _token_relevance(x: Tensor, grad: Tensor) -> Tensor:
    """sum_c x[..., c] * grad[..., c], outside autograd."""
    with torch.no_grad():
        return (_wide(x) * _wide(grad)).sum(dim=-1)


def _read_relevance(blocks: list[Tensor | None], i: int, x: Tensor, grad: Tensor) -> None:
    blocks[i] = _token_relevance(x, grad)


class LRP(Explainer):
    """Relevance maps of the score DAAM explained, in the explainer's own pass after DAAM's.

    ``explain(images, result)`` stores, float32 and signed, ``<name>`` ``(B, L, h, w)``: block l's map, the relevance
    at block l's input over the patch tokens; and ``<name>_input`` ``(B, h, w)``: the input map, the relevance at the
    patch embedding. Statistics and evaluation take their positive parts; the input map is the method's map, and the
    per-block maps are read from the last block down (:attr:`ExplainerMaps.top_down`).

    Args:
        daam: The DAAM engine whose score Y (and autocast dtype) the explainer uses.

    Raises:
        UnsupportedModelError: the model has a norm or an MLP without a rule (:func:`relevance_rules`).
    """

    def __init__(self, daam: DAAM) -> None:
        super().__init__(daam)
        _check_rules_apply(self.model)
        self.qkv_gradient = QKV_GRADIENT[self.name]

    def explain(self, images: Tensor, result: DAAMResult) -> ExplainerMaps:
        blocks, embedding = relevance(
            self.model,
            images,
            self.qkv_gradient,
            target=result.target,
            weights=result.weights,
            autocast_dtype=self.daam.autocast_dtype,
        )
        h, w = self.daam.grid_size(images.shape[-2:])
        blocks = blocks[..., self.num_prefix_tokens :].unflatten(-1, (h, w)).float()
        embedding = embedding.unflatten(-1, (h, w)).float()
        block_array, input_array = EXPLAINER_ARRAYS[self.name]
        return ExplainerMaps(
            arrays={block_array: blocks, input_array: embedding},
            blocks=blocks.clamp_min(0),
            final=embedding.clamp_min(0),
            top_down=True,
        )


class AttnLRP(LRP):
    """AttnLRP: the uniform rule on both attention products, the softmax rule in Gradient x Input form."""

    name = "attnlrp"


class CPLRP(LRP):
    """CP-LRP: the attention matrix held constant, relevance through the values only."""

    name = "cplrp"
