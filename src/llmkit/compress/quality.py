"""How much a compressed model lost: two protocols, always named in the result.

**ppl** - perplexity as the pruning papers compute it (SparseGPT, Frantar & Alistarh 2023; Wanda,
Sun et al. 2024): the held-out token stream is cut into non-overlapping windows of T tokens and
every position of every window is scored from its own prefix (T - 1 predictions a window):

    PPL = exp( -(1/N) Σ_windows Σ_{t=1}^{T-1} log p(x_t | x_<t) )

**kld** - llama.cpp's `perplexity --kl-divergence` protocol: the same non-overlapping windows, but
only the second half of each window is scored (the first half is context only, so every scored
token sees at least T/2 tokens). At each scored position, with P the reference (fp32) distribution
and Q the compressed model's:

    KLD      = Σ_v P(v) (log P(v) - log Q(v))            mean, max, 99th percentile, median
    same-top-1 = the rate at which argmax P == argmax Q
    Δp       = Q(x_t) - P(x_t), the change of the true next token's probability (mean, RMS)
    ΔPPL     = PPL(Q) - PPL(P) over the scored positions (and the ratio)

The two protocols score different positions, so their perplexities are not comparable: a result
always carries its `protocol` string.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional

import torch
from torch import nn

from ..model.modes import evaluating
from .errors import CompressError

PPL_PROTOCOL = "ppl: non-overlapping windows of {T} tokens, every position scored (pruning papers)"
KLD_PROTOCOL = ("kld: llama.cpp's perplexity --kl-divergence protocol: non-overlapping windows of {T} tokens, "
                "the second half of each scored, against the reference model")


def heldout_ids(text: str, tokenizer, fraction: float = 0.1) -> torch.Tensor:
    """The last `fraction` of the text's tokens (n,): the val split `llmkit pretrain` makes of a
    one-document corpus (a contiguous split), so a model trained by a recipe is scored on text it
    never saw."""
    if not 0 < fraction <= 1:
        raise CompressError(f"heldout_fraction={fraction!r}: expected a number in (0, 1]")
    ids = tokenizer.encode(text, add_special_tokens=False)
    return torch.tensor(ids[int(len(ids) * (1 - fraction)):], dtype=torch.long)


def token_windows(ids: torch.Tensor, window: int, max_windows: Optional[int] = None) -> torch.Tensor:
    """(n,) token ids -> (W, window) non-overlapping windows; the tail shorter than a window is dropped."""
    if window < 2:
        raise CompressError(f"window={window!r}: expected at least 2 tokens")
    count = ids.numel() // window
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise CompressError(f"held-out text of {ids.numel()} tokens is shorter than one window of {window}")
    return ids[: count * window].view(count, window)


@torch.no_grad()
def window_log_probs(model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> Iterator[torch.Tensor]:
    """Log-probabilities (b, T, V) in float32 for each batch of windows (B, T), in order."""
    with evaluating(model):
        for start in range(0, windows.shape[0], batch_size):
            logits = model(windows[start:start + batch_size]).logits                    # (b, T, V)
            yield torch.log_softmax(logits.float(), dim=-1)


def perplexity(model: nn.Module, ids: torch.Tensor, *, window: int = 128, batch_size: int = 8,
               max_windows: Optional[int] = None) -> dict:
    """The `ppl` protocol on held-out ids (n,): every position of each window scored."""
    windows = token_windows(ids, window, max_windows)                                   # (W, T)
    nll, count = 0.0, 0
    for i, logp in enumerate(window_log_probs(model, windows, batch_size)):
        targets = windows[i * batch_size: i * batch_size + logp.shape[0], 1:]           # (b, T-1)
        picked = logp[:, :-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1)             # (b, T-1)
        nll -= picked.double().sum().item()
        count += targets.numel()
    return {"protocol": PPL_PROTOCOL.format(T=window), "ppl": math.exp(nll / count), "nll": nll / count,
            "tokens": count, "windows": windows.shape[0]}


def token_kld(ref_logp: torch.Tensor, logp: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-position figures from log-probabilities at the scored positions.

    ref_logp, logp: (N, V) log-probabilities of the reference and the compressed model; targets: (N,)
    the true next tokens. Pure, so llama.cpp's own logits are scored the same way.
    """
    ref_logp, logp = ref_logp.double(), logp.double()
    return {"kld": (ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp_min(0),        # (N,) rounding can dip < 0
            "same": (ref_logp.argmax(-1) == logp.argmax(-1)).double(),                 # (N,)
            "ref_true": ref_logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1),       # (N,) log P(x_t)
            "q_true": logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)}             # (N,) log Q(x_t)


def kld_summary(parts: list[dict[str, torch.Tensor]]) -> dict:
    """The kld protocol's figures from `token_kld` outputs (one per batch)."""
    kld, same, ref_true, q_true = (torch.cat([p[k] for p in parts]) for k in ("kld", "same", "ref_true", "q_true"))
    dp = q_true.exp() - ref_true.exp()                                                 # (N,) Δp of the true token
    ppl_ref, ppl_q = math.exp(-ref_true.mean().item()), math.exp(-q_true.mean().item())
    return {"kld_mean": kld.mean().item(), "kld_max": kld.max().item(),
            "kld_p99": torch.quantile(kld, 0.99).item(), "kld_median": kld.median().item(),
            "same_top1": same.mean().item(), "dp_mean": dp.mean().item(), "dp_rms": dp.pow(2).mean().sqrt().item(),
            "ppl_ref": ppl_ref, "ppl": ppl_q, "delta_ppl": ppl_q - ppl_ref, "ppl_ratio": ppl_q / ppl_ref,
            "tokens": int(kld.numel())}


def scored_half(windows: torch.Tensor) -> tuple[slice, torch.Tensor]:
    """The kld protocol's positions: predictions made at t in [T/2 - 1, T - 2] for targets x_{T/2..T-1}."""
    T = windows.shape[1]
    first = T // 2
    return slice(first - 1, T - 1), windows[:, first:]                                 # logits rows, (W, T - T/2)


def kl_divergence(model: nn.Module, reference: nn.Module, ids: torch.Tensor, *, window: int = 128,
                  batch_size: int = 8, max_windows: Optional[int] = None) -> dict:
    """The `kld` protocol: `model` against `reference` on held-out ids (n,)."""
    windows = token_windows(ids, window, max_windows)                                   # (W, T)
    rows, targets = scored_half(windows)                                                # (W, T/2)
    parts = []
    for i, (ref_logp, logp) in enumerate(zip(window_log_probs(reference, windows, batch_size),
                                             window_log_probs(model, windows, batch_size))):
        V, b = logp.shape[-1], logp.shape[0]
        batch_targets = targets[i * batch_size: i * batch_size + b].reshape(-1)       # (b·T/2,)
        parts.append(token_kld(ref_logp[:, rows].reshape(-1, V), logp[:, rows].reshape(-1, V), batch_targets))
    return {"protocol": KLD_PROTOCOL.format(T=window), "windows": windows.shape[0], **kld_summary(parts)}
