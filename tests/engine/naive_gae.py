"""A naive, per-image GAE (Chefer, Gur & Wolf, ICCV 2021) written straight from the paper, in float64.

It shares nothing with the engine but timm's own layers: every block's attention is an explicit, non-fused
softmax(q k^T * scale) whose gradient autograd takes directly.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def naive_gae(model: nn.Module, image: torch.Tensor, target: int | None, weights: torch.Tensor | None = None):
    """GAE of one image (3, H, W) in float64, straight from the paper: (L, h, w).

    Every block's attention A_l (H, N, N) is materialised by an explicit, non-fused attention and dY/dA_l taken by
    autograd; Ā_l = mean_h ReLU(dY/dA_l ⊙ A_l), R_0 = I, R_l = R_{l-1} + Ā_l R_{l-1}, map l = R_l[0, P:].
    """
    model = copy.deepcopy(model).double().eval().requires_grad_(False)
    for module in model.modules():  # a copy made inside `with DAAM(model)` carries the engine's hooks
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    attentions = []
    for block in model.blocks:
        attn = block.attn

        def naive_forward(x, attn_mask=None, is_causal=False, attn=attn):
            batch, tokens, _ = x.shape
            qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            q, k = attn.q_norm(q), attn.k_norm(k)
            attention = (q @ k.transpose(-2, -1) * attn.scale).softmax(dim=-1)  # (1, H, N, N)
            attentions.append(attention)
            return attn.proj((attention @ v).transpose(1, 2).reshape(batch, tokens, -1))

        attn.forward = naive_forward

    x = image[None].double().requires_grad_(True)
    features = model.forward_features(x)
    if weights is None:
        score = model.forward_head(features)[0, target]
    else:
        score = (model.forward_head(features, pre_logits=True)[0] * weights.double()).sum()
    gradients = torch.autograd.grad(score, attentions)
    tokens, prefix = attentions[0].shape[-1], model.num_prefix_tokens
    relevance, maps = torch.eye(tokens, dtype=torch.float64), []
    for a, g in zip(attentions, gradients, strict=True):
        mixed = (g[0] * a[0].detach()).clamp(min=0).mean(dim=0)
        relevance = relevance + mixed @ relevance
        maps.append(relevance[0, prefix:])
    h, w = model.patch_embed.dynamic_feat_size(image.shape[-2:])
    return torch.stack(maps).reshape(-1, h, w)
