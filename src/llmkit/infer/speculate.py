"""Speculative decoding inside the engine: who proposes the draft tokens, and how the target's
verification forward turns them into output (the rule itself is in speculative.py).

Per step, every sequence that is decoding (one token to compute, no penalties, no logprobs) gets a
draft of γ ≤ num_speculative_tokens tokens, cut so it never passes max_tokens or the context, and
only when the pool has the slots (speculation never preempts). The target then runs ONE forward
with [last token, x_1 … x_γ] for those sequences beside the other sequences' prefill chunks and
decodes, and scores γ + 1 positions for each. `verify` keeps n ≤ γ drafts and one more token, so a
step emits 1 … γ + 1 tokens per sequence; the keys and values of the kept drafts are already in
the cache, and those of rejected ones are overwritten later.

Proposers:
- `DraftProposer` (Leviathan et al. 2023; Chen et al. 2023): a small model with the same vocabulary
  and its own paged KV storage indexed by the same block tables. Each step it first catches up on
  the tokens the target computed since its last step (prefill chunks, the previous step's accepted
  tokens), then decodes γ tokens from its own (warped) distribution q, one forward per token for
  all speculating sequences at once.
- `NgramProposer` (prompt lookup, Saxena 2023): copies what followed the latest earlier occurrence
  of the sequence's last n tokens; q is one-hot, so a draft token is kept with probability p(x).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from ..model.modes import eval_mode
from .paged import PagedKV
from .sampler import draw, warp_for, warped_probs
from .speculative import accept_draft, accept_greedy, ngram_propose


def verify(logits: torch.Tensor, draft: list[int], q: Optional[torch.Tensor], seq,
           p: Optional[torch.Tensor] = None) -> tuple[int, int]:
    """logits (γ+1, V) of the target at [last token, x_1 … x_γ]; q (γ, V) the draft's distribution
    (None: a deterministic proposal, one-hot); p (γ+1, V) the target's warped distribution when
    the caller has it already. Returns (drafts kept, the next token)."""
    x = torch.tensor(draft, dtype=torch.long)                                        # (γ,)
    if seq.params.greedy:
        return accept_greedy(logits, x)
    p = warped_probs(logits, seq.params) if p is None else p                        # (γ+1, V)
    if q is None:
        q = torch.nn.functional.one_hot(x, p.shape[-1]).float()                      # (γ, V)
    return accept_draft(p, q, x, seq.generator)


class NgramProposer:
    def __init__(self, n_max: int = 3, n_min: int = 1):
        self.n_max, self.n_min = n_max, n_min

    def propose(self, engine, scheduled, gammas: dict[int, int]) -> dict[int, tuple[list[int], None]]:
        out = {}
        for item in scheduled:
            g = gammas.get(item.seq.seq_id, 0)
            draft = ngram_propose(item.seq.tokens, g, self.n_max, self.n_min) if g else []
            if draft:
                out[item.seq.seq_id] = (draft, None)
        return out

    def settle(self, seq) -> None:
        pass


class DraftProposer:
    def __init__(self, draft: nn.Module, engine):
        cfg, tcfg = getattr(draft, "config", None), engine.config
        if cfg is None or getattr(draft, "transformer", None) is None or cfg.is_encoder_decoder:
            raise ValueError(f"speculative={type(draft).__name__}: expected an llmkit causal LM as the draft model")
        if cfg.vocab_size != tcfg.vocab_size:
            raise ValueError(f"speculative draft vocab_size={cfg.vocab_size}: expected the target's "
                             f"{tcfg.vocab_size} (the draft proposes the target's token ids)")
        self.model = draft
        attn = draft.transformer.layers[0].self_attn
        param = next(draft.parameters())
        self.kv = PagedKV(len(draft.transformer.layers), engine.pool.num_blocks, engine.pool.block_size,
                          attn.n_kv_heads, attn.head_dim, dtype=param.dtype, device=param.device)
        self.computed: dict[int, int] = {}          # seq_id -> tokens whose draft keys / values are written

    def propose(self, engine, scheduled, gammas: dict[int, int]) -> dict[int, tuple[list[int], torch.Tensor]]:
        rows, spec = [], []
        for item in scheduled:
            seq = item.seq
            # a new sequence trusts the draft KV of its prefix-cache hits; a preempted one starts over
            done = min(self.computed.get(seq.seq_id, seq.num_computed), seq.num_computed)
            end = seq.num_computed + item.num_new
            g = gammas.get(seq.seq_id, 0)
            rows.append((seq, done, seq.tokens[done:end], [False] * (end - done - 1) + [g > 0]))
            self.computed[seq.seq_id] = end
            if g:
                spec.append(seq)
        if not spec:
            engine_run(engine, self.model, self.kv, rows)                    # catch up only
            return {}
        drafts = {s.seq_id: [] for s in spec}
        qs = {s.seq_id: [] for s in spec}
        logits = engine_run(engine, self.model, self.kv, rows)               # (len(spec), V)
        while True:
            tokens = logits.argmax(-1).tolist()                                      # greedy drafts
            sampled = [i for i, s in enumerate(spec) if not s.params.greedy]
            if sampled:                                                              # all rows warped at once
                q = warp_for(logits[sampled], [spec[i].params for i in sampled])     # (S, V)
                for j, (i, token) in enumerate(zip(sampled, draw(q, [spec[i].generator for i in sampled]))):
                    tokens[i] = token
                    qs[spec[i].seq_id].append(q[j])
            for seq, token in zip(spec, tokens):
                drafts[seq.seq_id].append(token)
            spec = [s for s in spec if len(drafts[s.seq_id]) < gammas[s.seq_id]]
            if not spec:
                break
            rows = [(s, self.computed[s.seq_id], [drafts[s.seq_id][-1]], [True]) for s in spec]
            for s in spec:
                self.computed[s.seq_id] += 1
            logits = engine_run(engine, self.model, self.kv, rows)
        return {sid: (toks, torch.stack(qs[sid]) if qs[sid] else None) for sid, toks in drafts.items()}

    def settle(self, seq) -> None:
        """After verification: only drafts the target kept have valid draft keys / values."""
        self.computed[seq.seq_id] = min(self.computed.get(seq.seq_id, 0), seq.num_computed)
        if seq.finished:
            self.computed.pop(seq.seq_id, None)


def engine_run(engine, model, kv, rows) -> torch.Tensor:
    with eval_mode(model):
        return engine._run(model, kv, rows)


def build_proposer(speculative: Union[None, str, nn.Module], engine, num_tokens: int):
    if speculative is None:
        return None
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"num_speculative_tokens={num_tokens!r}: expected an integer >= 1")
    if speculative == "ngram":
        return NgramProposer()
    if isinstance(speculative, nn.Module):
        return DraftProposer(speculative, engine)
    raise ValueError(f"speculative={speculative!r}: expected None, 'ngram' or a draft llmkit causal LM")
