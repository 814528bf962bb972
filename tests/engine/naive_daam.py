"""A naive, per-image DAAM written straight from METHOD.md, in float64: the engine's reference.

It shares nothing with the engine but timm's own layers: the attention is recomputed as the full N x N matrix,
S_l is materialised, and the coefficients come from zero probes added to the [class] row of T_l.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class NaiveDAAM:
    block_maps: torch.Tensor  # (L, h, w)
    daam: torch.Tensor  # (L, h, w)
    coefficients: torch.Tensor  # (L, C)
    output: torch.Tensor  # (K,) or (D,)
    target: int | None


def naive_daam(
    model: nn.Module, image: torch.Tensor, target: int | None = None, weights: torch.Tensor | None = None
) -> NaiveDAAM:
    """DAAM of one image (3, H, W); ``weights`` (D,) selects the self-supervised form."""
    model = copy.deepcopy(model).double().eval()
    model.requires_grad_(False)
    for module in model.modules():  # a copy made inside `with DAAM(model)` would carry the engine's hooks
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    records: list[dict] = []

    for block in model.blocks:
        attn = block.attn

        def naive_forward(x, attn_mask=None, is_causal=False, attn=attn):
            batch, tokens, _ = x.shape
            heads, dim = attn.num_heads, attn.head_dim
            qkv = attn.qkv(x).reshape(batch, tokens, 3, heads, dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            q, k = attn.q_norm(q), attn.k_norm(k)
            full_attention = (q @ k.transpose(-2, -1) * attn.scale).softmax(dim=-1)  # (1, H, N, N)
            t = (full_attention @ v).transpose(1, 2).reshape(batch, tokens, heads * dim)
            probe = torch.zeros(heads * dim, dtype=t.dtype, requires_grad=True)
            t = t + torch.cat([probe[None], t.new_zeros(tokens - 1, heads * dim)])[None]
            records.append(dict(a=full_attention[0, :, 0].detach(), v=v[0].detach(), t=t[0].detach(), probe=probe))
            return attn.proj(t)

        attn.forward = naive_forward

    x = image[None].double()
    features = model.forward_features(x)
    if weights is None:
        logits = model.forward_head(features)[0]
        target = int(logits.argmax()) if target is None else int(target)
        score, output = logits[target], logits.detach()
    else:
        pooled = model.forward_head(features, pre_logits=True)[0]
        score = (pooled * weights.double()).sum()
        output = model.forward_head(features)[0].detach() if model.num_classes else pooled.detach()
        target = None
    grads = torch.autograd.grad(score, [r["probe"] for r in records])

    prefix = model.num_prefix_tokens
    maps, coefficients = [], []
    for record, c in zip(records, grads, strict=True):
        a, v = record["a"], record["v"]  # (H, N), (H, N, d)
        heads, tokens, dim = v.shape
        # S[j, (h, k)] = a^h[j] * v^h[j, k]
        spatial = torch.stack([a[h][:, None] * v[h] for h in range(heads)], dim=1).reshape(tokens, heads * dim)
        torch.testing.assert_close(spatial.sum(dim=0), record["t"][0], rtol=1e-9, atol=1e-9)
        channel = c.clamp_min(0) if weights is None else c
        maps.append((spatial[prefix:] @ channel).clamp_min(0))
        coefficients.append(c)
    h, w = model.patch_embed.dynamic_feat_size(image.shape[-2:])
    block_maps = torch.stack(maps).reshape(len(maps), h, w)
    return NaiveDAAM(block_maps, block_maps.cumsum(0), torch.stack(coefficients), output, target)
