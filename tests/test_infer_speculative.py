"""Speculative decoding math (issue 16, part): the sampling rule emits tokens distributed exactly as
the target (χ² goodness of fit, and the same test rejects wrong rules), its edge cases, greedy
verification equal to target greedy decoding, and prompt-lookup proposals."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmkit.infer.speculative import (accept_draft, accept_draft_batched, accept_greedy, accept_greedy_batched,
                                      ngram_propose)

V = 6
# χ² upper critical value for V − 1 = 5 degrees of freedom at p = 1e-4 (standard table;
# scipy.stats.chi2.ppf(1 - 1e-4, 5) = 25.745). Seeds are fixed, so the test is deterministic.
CHI2_CRIT_5DF = 25.74


def chi2(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's χ² of observed tokens (N,) against probabilities (V,)."""
    counts = torch.bincount(tokens, minlength=probs.numel()).double()             # (V,)
    expected = tokens.numel() * probs.double()                                     # (V,)
    return float(((counts - expected) ** 2 / expected).sum())


def _dist(rows: int) -> torch.Tensor:
    """(rows, V) random distributions bounded away from 0 (expected χ² counts stay large)."""
    d = torch.distributions.Dirichlet(torch.ones(V)).sample((rows,))               # the global RNG, seeded by the caller
    return 0.5 * d + 0.5 / V


def _trials(draft: str, n: int, gamma: int, seed: int):
    """p (γ+1, V), and n trials of q (n, γ, V), x (n, γ) with x_i ~ q_i."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    p = _dist(gamma + 1)                                                         # (γ+1, V)
    if draft == "sampled":
        q1 = _dist(gamma)                                                        # (γ, V)
        x = torch.multinomial(q1.repeat(n, 1), 1, generator=g).view(n, gamma)      # (n, γ)
        q = q1.expand(n, gamma, V)
    else:   # a deterministic proposer: any token, q = its one-hot
        x = torch.randint(0, V, (n, gamma), generator=g)                          # (n, γ)
        q = F.one_hot(x, V).float()                                                 # (n, γ, V)
    return p, q, x, g


@pytest.mark.parametrize("draft", ["sampled", "one_hot"])
def test_emitted_tokens_follow_the_target_distribution_chi2(draft):
    """Given n ≥ i, the token emitted at position i (x_i if accepted, else the residual draw / the bonus)
    is distributed as p_i; also the first token is p_0 unconditionally."""
    N, gamma = 40_000, 2
    p, q, x, g = _trials(draft, N, gamma, seed=1)
    n_acc, nxt = accept_draft_batched(p.expand(N, gamma + 1, V), q, x, generator=g)
    assert 0 < (n_acc == 0).sum() < N and (n_acc == gamma).sum() > 1000           # every branch is exercised
    emitted = torch.cat([x, torch.zeros(N, 1, dtype=torch.long)], dim=1)           # (N, γ+1)
    emitted[torch.arange(N), n_acc] = nxt                                           # position n is the next token
    for i in range(gamma + 1):
        rows = n_acc >= i
        stat = chi2(emitted[rows, i], p[i])
        assert stat < CHI2_CRIT_5DF, (i, stat)


def test_chi2_rejects_wrong_acceptance_rules():
    """The same statistic on plausible bugs: always accepting the draft (gives q_0), and resampling
    from p instead of the residual after a rejection."""
    N, gamma = 40_000, 2
    p, q, x, g = _trials("sampled", N, gamma, seed=1)
    assert chi2(x[:, 0], p[0]) > 20 * CHI2_CRIT_5DF                                 # always accept
    u = torch.rand(N, generator=g)
    accepted = u * q[:, 0].gather(1, x[:, :1]).squeeze(1) < p[0][x[:, 0]]
    from_p = torch.multinomial(p[0].expand(N, V), 1, generator=g).squeeze(1)
    assert chi2(torch.where(accepted, x[:, 0], from_p), p[0]) > 10 * CHI2_CRIT_5DF  # resample from p


def test_equal_distributions_accept_every_draft():
    g = torch.Generator().manual_seed(2)
    N, gamma = 2000, 4
    torch.manual_seed(2)
    p = torch.distributions.Dirichlet(torch.full((V,), 0.5)).sample((N, gamma + 1))   # (N, γ+1, V)
    x = torch.multinomial(p[:, :gamma].reshape(-1, V), 1, generator=g).view(N, gamma)
    n_acc, _ = accept_draft_batched(p, p[:, :gamma], x, generator=g)
    assert bool((n_acc == gamma).all())
    for b in range(5):
        assert accept_draft(p[b], p[b, :gamma], x[b], generator=g)[0] == gamma


def test_draft_token_without_target_mass_is_always_rejected():
    g = torch.Generator().manual_seed(3)
    N, gamma = 2000, 3
    torch.manual_seed(3)
    p = torch.distributions.Dirichlet(torch.ones(V)).sample((N, gamma + 1))         # (N, γ+1, V)
    q = torch.distributions.Dirichlet(torch.ones(V)).sample((N, gamma))             # (N, γ, V)
    x = torch.multinomial(q.reshape(-1, V), 1, generator=g).view(N, gamma)         # (N, γ)
    p[torch.arange(N), 0, x[:, 0]] = 0.0                                            # p_0(x_0) = 0
    p = p / p.sum(-1, keepdim=True)
    n_acc, nxt = accept_draft_batched(p, q, x, generator=g)
    assert bool((n_acc == 0).all()) and bool((nxt != x[:, 0]).all())
    p2 = p.clone()
    p2[:, 0] = q[:, 0]                                                              # position 0 passes...
    p2[torch.arange(N), 2, x[:, 2]] = 0.0                                           # ...position 2 never does
    n_acc, _ = accept_draft_batched(p2, q, x, generator=g)
    assert bool((n_acc <= 2).all()) and bool((n_acc >= 1).all()) and bool((n_acc == 2).any())


def test_resampled_token_only_where_target_exceeds_draft():
    g = torch.Generator().manual_seed(4)
    N, gamma = 20_000, 2
    torch.manual_seed(4)
    p = torch.distributions.Dirichlet(torch.full((V,), 0.5)).sample((N, gamma + 1))   # (N, γ+1, V)
    q = torch.distributions.Dirichlet(torch.full((V,), 0.5)).sample((N, gamma))       # (N, γ, V)
    # half the rows: q = p_i with two entries swapped, so p = q exactly on the other V − 2 tokens
    half = N // 2
    a = torch.randint(0, V, (half, gamma, 1))
    b = (a + torch.randint(1, V, (half, gamma, 1))) % V
    swapped = p[:half, :gamma].clone()
    swapped.scatter_(-1, a, p[:half, :gamma].gather(-1, b))
    swapped.scatter_(-1, b, p[:half, :gamma].gather(-1, a))
    q[:half] = swapped
    x = torch.multinomial(q.reshape(-1, V), 1, generator=g).view(N, gamma)
    n_acc, nxt = accept_draft_batched(p, q, x, generator=g)
    rej = n_acc < gamma
    assert rej.sum() > N // 4
    b = torch.arange(N)[rej]
    i, t = n_acc[rej], nxt[rej]
    assert bool((p[b, i, t] > q[b, i, t]).all())


def test_zero_residual_falls_back_to_target_and_bonus_is_drawn_from_last_row():
    # p = q, the draft token outside both supports: rejected, residual all zero -> draw from p.
    p = F.one_hot(torch.tensor([2, 1]), V).float()                                  # (γ+1 = 2, V)
    assert accept_draft(p, p[:1].clone(), torch.tensor([4]), generator=torch.Generator().manual_seed(0)) == (0, 2)
    # all accepted: the bonus comes from p_γ
    p = F.one_hot(torch.tensor([3, 5, 0]), V).float()
    assert accept_draft(p, p[:2].clone(), torch.tensor([3, 5])) == (2, 0)
    # γ = 0: just one draw from p_0
    assert accept_draft(p[:1], torch.zeros(0, V), torch.zeros(0, dtype=torch.long)) == (0, 3)


def test_one_sequence_equals_batch_of_one_and_is_reproducible():
    torch.manual_seed(5)
    gamma = 3
    p = torch.softmax(torch.randn(gamma + 1, V), -1)
    q = torch.softmax(torch.randn(gamma, V), -1)
    x = torch.multinomial(q, 1).squeeze(1)
    outs = []
    for seed in range(40):
        one = accept_draft(p, q, x, generator=torch.Generator().manual_seed(seed))
        n, t = accept_draft_batched(p[None], q[None], x[None], generator=torch.Generator().manual_seed(seed))
        assert one == (int(n[0]), int(t[0]))
        assert one == accept_draft(p, q, x, generator=torch.Generator().manual_seed(seed))
        outs.append(one)
    assert len(set(outs)) > 1                                                       # the generator drives it


def test_bad_shapes_name_the_argument():
    p, q, x = torch.rand(4, V), torch.rand(3, V), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="target_probs"):
        accept_draft(p[:3], q, x)
    with pytest.raises(ValueError, match="draft_probs"):
        accept_draft(p, q[:, :4], x)
    with pytest.raises(ValueError, match="draft_tokens"):
        accept_draft(p, q, x.float())
    with pytest.raises(ValueError, match="target_probs"):
        accept_greedy(p[None], x)


def test_greedy_accepts_until_first_argmax_mismatch():
    logits = torch.tensor([[0.1, 0.2, 3.0, 0.0, 0.0],     # argmax 2
                           [5.0, 0.2, 0.3, 0.0, 0.0],     # argmax 0
                           [0.0, 0.0, 0.0, 1.0, 2.0],     # argmax 4
                           [0.0, 9.0, 0.0, 0.0, 0.0]])    # argmax 1 (bonus position)
    assert accept_greedy(logits, torch.tensor([2, 0, 3])) == (2, 4)
    assert accept_greedy(logits, torch.tensor([2, 0, 4])) == (3, 1)
    assert accept_greedy(logits, torch.tensor([1, 0, 4])) == (0, 2)
    assert accept_greedy(torch.softmax(logits, -1), torch.tensor([2, 1, 4])) == (1, 0)
    n, t = accept_greedy_batched(logits.expand(3, 4, 5), torch.tensor([[2, 0, 3], [2, 0, 4], [1, 0, 4]]))
    assert n.tolist() == [2, 3, 0] and t.tolist() == [4, 1, 2]


def test_greedy_speculation_with_ngram_drafts_equals_target_greedy():
    """A toy target (logits from the last two tokens) decoded greedily, and decoded speculatively with
    prompt-lookup drafts verified by accept_greedy: the same tokens."""
    torch.manual_seed(6)
    Vt = 8
    table = torch.randn(Vt, Vt, Vt)                                                 # (prev2, prev1) -> (V,) logits

    def logits_after(seq):                                                          # (V,)
        return table[seq[-2], seq[-1]]

    prompt, steps = [1, 2, 3, 1, 2], 60
    greedy = list(prompt)
    while len(greedy) < len(prompt) + steps:
        greedy.append(int(logits_after(greedy).argmax()))

    spec, accepted, rejected = list(prompt), 0, 0
    while len(spec) < len(prompt) + steps:
        draft = ngram_propose(spec, k=4)
        scores = torch.stack([logits_after(spec + draft[:i]) for i in range(len(draft) + 1)])   # (γ+1, V)
        n, nxt = accept_greedy(scores, torch.tensor(draft, dtype=torch.long))
        accepted, rejected = accepted + n, rejected + (n < len(draft))
        spec += draft[:n] + [nxt]
    n_total = len(prompt) + steps
    assert spec[:n_total] == greedy
    assert accepted > 0 and rejected > 0


def test_ngram_propose_prefers_the_longest_match_then_the_latest():
    seq = [1, 2, 3, 4, 5, 3, 7, 1, 2, 3]
    assert ngram_propose(seq, k=2) == [4, 5]                                        # n = 3 at j = 0
    assert ngram_propose(seq, k=2, n_max=1) == [7, 1]                               # n = 1: latest earlier "3"
    assert ngram_propose([1, 2, 1, 3, 1], k=1) == [3]                               # latest of two matches
    assert ngram_propose(torch.tensor(seq), k=2) == [4, 5]


def test_ngram_propose_falls_back_truncates_and_stops_at_the_end():
    seq = [5, 6, 7, 8, 6]                                                           # no 3- or 2-gram match
    assert ngram_propose(seq, k=3) == [7, 8, 6]                                     # n = 1 at j = 1
    assert ngram_propose(seq, k=2) == [7, 8]                                        # k truncates
    assert ngram_propose(seq, k=10) == [7, 8, 6]                                    # runs to the end
    assert ngram_propose(seq, k=3, n_min=2) == []
    assert ngram_propose([7, 7, 7, 7], k=5) == [7]                                  # overlapping match at j = 0
    assert ngram_propose([1, 2, 3, 4], k=3) == []
    assert ngram_propose([1], k=3) == [] and ngram_propose([], k=3) == []


@pytest.mark.parametrize("kwargs, name", [
    (dict(k=0), "k=0"), (dict(k=1.5), "k=1.5"), (dict(k=True), "k=True"),
    (dict(k=2, n_min=0), "n_min=0"), (dict(k=2, n_max=1, n_min=2), "n_max=1"),
])
def test_ngram_propose_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}: expected"):
        ngram_propose([1, 2, 3], **kwargs)
