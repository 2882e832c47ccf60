"""The decoder-layer forward both exported graphs share.

Target and drafter run the Hugging Face layer modules (their weights and names) through this one
function, because the graphs need an I/O contract transformers' own forward does not give:
- past K/V per layer laid out sequence-major, `[1, past, kv_heads * head_dim]`, so the runtime can
  hand a prefix of one preallocated buffer to ONNX Runtime without copying;
- only the new tokens' K/V as outputs (`[1, seq, kv_heads * head_dim]`), which the runtime writes
  straight into that buffer;
- an additive mask over the last `window` key positions only; every earlier key is visible. A tree
  step passes its tree (plus, for the drafter, the draft nodes before it), never a full
  `[seq, past + seq]` mask.
"""
from __future__ import annotations

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def full_mask(mask: torch.Tensor, total: torch.Tensor | int) -> torch.Tensor:
    """Left-pad the `[1, 1, seq, window]` mask with zeros (visible) up to `total` keys."""
    seq, window = mask.shape[2], mask.shape[3]
    visible = torch.zeros(mask.shape[0], 1, seq, total - window, dtype=mask.dtype, device=mask.device)
    return torch.cat((visible, mask), dim=-1)


def attention(
    attn: nn.Module,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    past_k: torch.Tensor,
    past_v: torch.Tensor,
    mask: torch.Tensor,
    dims: tuple[int, int, int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GQA self-attention with RoPE; returns (output, new_k, new_v), new K/V sequence-major.

    `dims` is (query heads, KV heads, head dim).
    """
    num_heads, num_kv_heads, head_dim = dims
    batch, seq = x.shape[0], x.shape[1]
    q = attn.q_proj(x).view(batch, seq, num_heads, head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(batch, seq, num_kv_heads, head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(batch, seq, num_kv_heads, head_dim).transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    new_k = k.transpose(1, 2).reshape(batch, seq, num_kv_heads * head_dim)
    new_v = v.transpose(1, 2).reshape(batch, seq, num_kv_heads * head_dim)

    past = past_k.shape[1]
    keys = torch.cat((past_k.view(batch, past, num_kv_heads, head_dim).transpose(1, 2), k), dim=2)
    values = torch.cat((past_v.view(batch, past, num_kv_heads, head_dim).transpose(1, 2), v), dim=2)
    # GQA without expanding K/V: the query heads sharing a KV head are stacked along the rows.
    groups = num_heads // num_kv_heads
    q = q.reshape(batch, num_kv_heads, groups * seq, head_dim)
    scores = torch.matmul(q, keys.transpose(2, 3)) * head_dim**-0.5
    scores = scores + full_mask(mask, keys.shape[2]).repeat(1, 1, groups, 1)
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    out = torch.matmul(probs, values).view(batch, num_heads, seq, head_dim)
    out = out.transpose(1, 2).reshape(batch, seq, num_heads * head_dim)
    return attn.o_proj(out), new_k, new_v


def decoder_layer(
    layer: nn.Module,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    past_k: torch.Tensor,
    past_v: torch.Tensor,
    mask: torch.Tensor,
    dims: tuple[int, int, int],
    norm_input: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pre-norm Llama/Qwen2 layer; `norm_input=False` is EAGLE's and Dovetail's first drafter layer."""
    h = layer.input_layernorm(x) if norm_input else x
    h, new_k, new_v = attention(layer.self_attn, h, cos, sin, past_k, past_v, mask, dims)
    x = x + h
    x = x + layer.mlp(layer.post_attention_layernorm(x))
    return x, new_k, new_v


def causal_mask(seq: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`[1, 1, seq, seq]` additive causal mask (the window covering only the new tokens)."""
    return torch.full((seq, seq), torch.finfo(dtype).min, dtype=dtype).triu(1)[None, None]
