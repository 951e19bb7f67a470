"""The quality protocols: perplexity (every position of non-overlapping windows) and llama.cpp's
KL-divergence protocol (second half of each window, against a reference)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from llmkit.compress import CompressError
from llmkit.compress.quality import heldout_ids, kl_divergence, perplexity, token_kld, kld_summary, token_windows
from llmkit.config import ModelConfig
from llmkit.model.models import CausalLM


def tiny(seed=0):
    torch.manual_seed(seed)
    return CausalLM(ModelConfig(family="llama", vocab_size=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                d_ff=128, max_seq_len=64)).eval()


IDS = torch.randint(0, 96, (300,), generator=torch.Generator().manual_seed(1))


def test_perplexity_equals_hand_cross_entropy():
    model = tiny()
    out = perplexity(model, IDS, window=32, batch_size=3)
    windows = IDS[: 9 * 32].view(9, 32)                                # 300 // 32 = 9 windows
    with torch.no_grad():
        logits = model(windows).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, 96), windows[:, 1:].reshape(-1))
    assert out["windows"] == 9 and out["tokens"] == 9 * 31
    assert out["ppl"] == pytest.approx(math.exp(nll.item()), rel=1e-5)
    assert out["protocol"].startswith("ppl:") and "32 tokens" in out["protocol"]


def test_uniform_model_has_perplexity_vocab_size():
    model = tiny()
    torch.nn.init.zeros_(model.lm_head.weight)                         # logits 0 everywhere: uniform
    assert perplexity(model, IDS, window=16)["ppl"] == pytest.approx(96, rel=1e-6)


def test_kld_to_itself_is_zero_and_top1_agrees():
    model = tiny()
    out = kl_divergence(model, copy.deepcopy(model), IDS, window=32)
    assert out["kld_mean"] == pytest.approx(0, abs=1e-9) and out["kld_max"] == pytest.approx(0, abs=1e-9)
    assert out["same_top1"] == 1.0 and out["delta_ppl"] == pytest.approx(0, abs=1e-9)
    assert out["tokens"] == 9 * 16 and out["protocol"].startswith("kld:")


def test_kld_scores_the_second_half_of_each_window():
    ref, model = tiny(0), tiny(1)
    out = kl_divergence(model, ref, IDS, window=32, batch_size=4)
    windows = IDS[: 9 * 32].view(9, 32)
    with torch.no_grad():
        p = torch.log_softmax(ref(windows).logits.double(), -1)[:, 15:31]       # predictions of x_16..x_31
        q = torch.log_softmax(model(windows).logits.double(), -1)[:, 15:31]
    kld = (p.exp() * (p - q)).sum(-1)
    nll_ref = -p.gather(-1, windows[:, 16:, None]).mean()
    assert out["kld_mean"] == pytest.approx(kld.mean().item(), rel=1e-4)
    assert out["kld_max"] == pytest.approx(kld.max().item(), rel=1e-4)     # float32 log-softmax
    assert out["ppl_ref"] == pytest.approx(math.exp(nll_ref.item()), rel=1e-6)
    assert out["same_top1"] == pytest.approx((p.argmax(-1) == q.argmax(-1)).double().mean().item())


def test_token_kld_matches_a_hand_computation():
    P = torch.tensor([[0.5, 0.5], [0.9, 0.1]]).log()
    Q = torch.tensor([[0.25, 0.75], [0.9, 0.1]]).log()
    targets = torch.tensor([1, 0])
    stats = kld_summary([token_kld(P, Q, targets)])
    hand = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert stats["kld_max"] == pytest.approx(hand) and stats["kld_mean"] == pytest.approx(hand / 2)
    assert stats["same_top1"] == 0.5                                    # row 0: argmax 0 vs 1 (tie breaks low)
    assert stats["dp_mean"] == pytest.approx((0.75 - 0.5) / 2)         # the true token's probability moved
    assert stats["ppl_ref"] == pytest.approx(math.exp(-(math.log(0.5) + math.log(0.9)) / 2))


def test_heldout_is_the_tail_and_bad_inputs_name_the_field():
    class Chars:
        def encode(self, text, add_special_tokens=True):
            return [ord(c) for c in text]
    assert heldout_ids("abcdefghij", Chars(), 0.3).tolist() == [ord("h"), ord("i"), ord("j")]
    with pytest.raises(CompressError, match="heldout_fraction=1.5"):
        heldout_ids("abc", Chars(), 1.5)
    with pytest.raises(CompressError, match="window=1"):
        token_windows(IDS, 1)
    with pytest.raises(CompressError, match="shorter than one window"):
        token_windows(IDS[:10], 32)
