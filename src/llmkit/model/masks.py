"""Attention masks: padding, causal (with a cache offset) and sliding-window, plus ALiBi biases.

One additive float mask (0 = visible, dtype-min = hidden) is built per forward pass and shared by
all layers. A dtype-min instead of -inf keeps rows whose keys are all hidden (left padding) finite
instead of NaN. When nothing needs masking, no mask is built and SDPA takes its fused causal path.
"""
from __future__ import annotations

from typing import Optional

import torch

from .positions import alibi_bias


def build_attention_mask(
    *,
    batch_size: int,
    q_len: int,
    past_len: int,
    attention_mask: Optional[torch.Tensor],
    causal: bool,
    sliding_window: Optional[int],
    alibi_heads: int,
    dtype: torch.dtype,
    device: torch.device,
    doc_ids: Optional[torch.Tensor] = None,
) -> tuple[Optional[torch.Tensor], bool]:
    """Return (mask, is_causal) for SDPA.

    attention_mask: (B, past_len + q_len) with 1 for real tokens and 0 for padding, or (B, q_len)
    when there is no cache. doc_ids: (B, T) index of the packed document each token belongs to; a
    token then sees only tokens of its own document (packing without cross-document attention).
    The mask returned is (B or 1, nh or 1, Tq, Tk) or None.
    """
    kv_len = past_len + q_len
    padded = attention_mask is not None and not bool(attention_mask.all())
    if doc_ids is not None and past_len:
        raise ValueError("doc_ids (document-separated attention) is for training forwards without a KV cache")
    if not padded and sliding_window is None and not alibi_heads and doc_ids is None:
        if not causal or q_len == 1:
            return None, False       # every key is visible
        if past_len == 0:
            return None, True        # SDPA's own causal mask (top-left aligned, correct here)

    q_pos = torch.arange(past_len, kv_len, device=device)                           # (Tq,)
    k_pos = torch.arange(kv_len, device=device)                                     # (Tk,)
    visible = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)            # (Tq, Tk)
    if causal:
        visible &= k_pos.view(1, -1) <= q_pos.view(-1, 1)
    if sliding_window is not None:
        visible &= k_pos.view(1, -1) > q_pos.view(-1, 1) - sliding_window
    visible = visible.view(1, 1, q_len, kv_len)
    if doc_ids is not None:  # (B, 1, T, T): same document only
        visible = visible & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    if padded:
        if attention_mask.shape[-1] != kv_len:
            raise ValueError(f"attention_mask has {attention_mask.shape[-1]} columns; expected "
                             f"{kv_len} (past {past_len} + new {q_len} tokens)")
        visible = visible & attention_mask.bool().view(batch_size, 1, 1, kv_len)
    mask = torch.zeros(visible.shape, dtype=dtype, device=device)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    if alibi_heads:
        mask = mask + alibi_bias(alibi_heads, q_pos, k_pos, causal).to(dtype)
    return mask, False


def padding_mask(attention_mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """(B, Tk) keep-mask -> (B, 1, 1, Tk) additive mask for cross-attention over encoder states."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    mask = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
    mask.masked_fill_(~attention_mask.bool(), torch.finfo(dtype).min)
    return mask[:, None, None, :]
