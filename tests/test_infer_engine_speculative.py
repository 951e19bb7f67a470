"""Speculative decoding in the engine (issue 16): greedy output token-identical to the target's for a
draft model and for prompt lookup, beside chunked prefills; sampled output distributed as the
target's (a chi-squared test on the joint law of the first two tokens); acceptance counted."""
from __future__ import annotations

import math

import pytest
import torch

import llmkit
from llmkit.infer import Engine, SamplingParams
from test_infer_engine import build, prompts, reference, run_with_arrivals


@pytest.mark.parametrize("draft", ["small", "self", "ngram"])
def test_greedy_speculation_is_token_identical_to_the_target(draft):
    target = build("llama-tiny", vocab_size=128)
    spec = {"small": build("llama-tiny", seed=1, vocab_size=128, n_layers=1, d_model=32, n_heads=2, n_kv_heads=1,
                           d_ff=64),
            "self": target, "ngram": "ngram"}[draft]
    engine = Engine(target, speculative=spec, num_speculative_tokens=3, block_size=4, max_num_batched_tokens=12)
    ps = prompts([5, 17, 9, 3])
    ps[3] = ps[3] * 5                                   # a repetitive prompt, so prompt lookup finds drafts
    got, by_id = run_with_arrivals(engine, {0: ps[:2], 2: ps[2:]}, SamplingParams(max_tokens=20, temperature=0))
    for rid, p in by_id.items():
        assert got[rid] == reference(target, p, 20)
    assert engine.stats["spec_proposed"] > 0 and engine.kv_blocks_in_use == 0
    if draft == "self":                                  # q = p: every draft is kept, 4 tokens a step
        assert engine.stats["spec_accepted"] == engine.stats["spec_proposed"]
        assert engine.stats["steps"] < 20


# Upper 0.9999 quantile of chi-squared with k degrees of freedom, Wilson-Hilferty approximation.
def chi2_critical(k: int, z: float = 3.719) -> float:
    return k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3


@pytest.mark.parametrize("draft", ["small", "ngram"])
def test_sampled_speculation_follows_the_target_distribution(draft):
    V = 6
    target = build("llama-tiny", vocab_size=V, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64)
    small = build("llama-tiny", seed=3, vocab_size=V, n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64)
    with torch.no_grad():                                # a sharper target, so p and q really differ
        target.lm_head.weight.mul_(8)
        small.lm_head.weight.mul_(8)
    prompt = [1, 2, 3, 1, 2]                             # prompt lookup proposes 3, then 1 (after "1 2")
    n, requests = 500, 20                                 # 10^4 samples
    engine = Engine(target, speculative=small if draft == "small" else "ngram", num_speculative_tokens=2,
                    max_num_seqs=n * requests, max_num_batched_tokens=4 * n * requests, seed=0)
    outs = engine.generate([prompt] * requests, SamplingParams(max_tokens=3, temperature=1.0, n=n))
    pairs = torch.tensor([s[:2] for o in outs for s in o])                          # (10000, 2)
    assert len(pairs) == 10_000
    counts = torch.bincount(pairs[:, 0] * V + pairs[:, 1], minlength=V * V).double()
    with torch.no_grad():                                # the exact joint law p(t1) p(t2 | t1)
        p1 = target(torch.tensor([prompt])).logits[0, -1].softmax(-1).double()
        ids = torch.tensor([prompt + [t] for t in range(V)])
        p2 = target(ids).logits[:, -1].softmax(-1).double()                           # (V, V)
    expected = (p1[:, None] * p2).reshape(-1) * len(pairs)
    keep = expected >= 5                                 # pool the rare cells
    stat = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    rare_o, rare_e = counts[~keep].sum(), expected[~keep].sum()
    if rare_e > 0:
        stat += (rare_o - rare_e) ** 2 / rare_e
    dof = int(keep.sum()) + (1 if rare_e > 0 else 0) - 1
    assert stat < chi2_critical(dof), (float(stat), dof)
    assert engine.stats["spec_accepted"] > 0 and engine.stats["spec_accepted"] < engine.stats["spec_proposed"]


def test_tokens_per_target_call_match_the_geometric_formula():
    """Context-free target and draft (zeroed final norms: p = uniform, q = softmax(lm_head bias)), so
    every draft token is kept with the same probability α = Σ_v min(p_v, q_v), independently:
    a call with γ drafts emits (1 − α^{γ+1}) / (1 − α) tokens on average."""
    V, gamma = 6, 3
    target = build("gpt2-tiny", vocab_size=V)
    draft = build("gpt2-tiny", seed=1, vocab_size=V, lm_head_bias=True)
    with torch.no_grad():
        for m in (target, draft):
            m.transformer.final_norm.weight.zero_()
            m.transformer.final_norm.bias.zero_()
        draft.lm_head.bias.copy_(torch.tensor([2.0, 1.0, 0.0, 0.0, -1.0, -2.0]))
    p = torch.full((V,), 1 / V)
    q = draft.lm_head.bias.detach().softmax(-1)
    alpha = float(torch.minimum(p, q).sum())
    engine = Engine(target, speculative=draft, num_speculative_tokens=gamma, max_num_seqs=64, seed=0)
    engine.generate([[1, 2, 3]] * 64, SamplingParams(max_tokens=40, temperature=1.0))
    summary = engine.speculation_summary()
    full = {a: c for (g, a), c in engine.stats["spec_calls"].items() if g == gamma}
    calls = sum(full.values())
    measured = sum((a + 1) * c for a, c in full.items()) / calls
    expected = (1 - alpha ** (gamma + 1)) / (1 - alpha)
    assert calls > 500
    assert abs(measured - expected) < 0.06, (measured, expected)
    assert abs(summary["alpha"] - alpha) < 0.03 and abs(summary["measured"] - summary["predicted"]) < 0.06
