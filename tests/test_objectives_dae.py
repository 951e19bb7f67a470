"""Denoising autoencoder (BART) objective: noise functions, losses, collator, loader, errors, learning."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from conftest import REPO, SHARED_DATA

from llmkit.data import DataError
from llmkit.generation import generate
from llmkit.io import load_any
from llmkit.model import build_model
from llmkit.objectives.dae import (DenoisingBatches, DenoisingCollator, DenoisingObjective,
                                   continuous_reconstruction_loss, dae_loss, reconstruction_accuracy)
from llmkit.objectives.noise import (apply_noise, document_rotation, plan_spans, poisson_span_lengths,
                                     sentence_permutation, span_infilling, split_sentences, token_deletion,
                                     token_masking)
from llmkit.presets import get_preset
from llmkit.tokenizer import Tokenizer, load_tokenizer, train_char

MASK, EOS, PAD = 0, 1, 2


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def char_tokenizer(text: str, roles: dict | None = None) -> Tokenizer:
    roles = {"mask": "<mask>"} if roles is None else roles
    tok = train_char(texts=[text], special_tokens=("<pad>", "<|endoftext|>", *roles.values()), pad_token="<pad>")
    return Tokenizer(tok.backend, {**tok.special_tokens, **roles})


# ---- noise functions -------------------------------------------------------------------------------
def test_token_masking_replaces_exactly_the_fraction():
    x = torch.arange(10, 1010)                                                     # (1000,)
    y = token_masking(x, MASK, 0.15, gen(0))
    masked = y == MASK
    assert y.shape == x.shape and int(masked.sum()) == 150
    assert torch.equal(y[~masked], x[~masked])                                     # the rest untouched
    assert not torch.equal(token_masking(x, MASK, 0.15, gen(1)), y)                # seeded
    assert torch.equal(token_masking(x, MASK, 0.15, gen(0)), y)


def test_token_deletion_removes_exactly_the_counted_tokens():
    x = torch.arange(10, 210)                                                      # (200,) distinct ids
    y = token_deletion(x, 0.2, gen(0))
    assert len(y) == 160
    assert bool((y[1:] > y[:-1]).all())                                            # order kept: a subsequence
    assert len(set(x.tolist()) - set(y.tolist())) == 40


def test_span_infilling_one_mask_per_span_and_masked_length():
    n, ratio = 400, 0.3
    x = torch.arange(10, 10 + n)
    for seed in range(20):
        spans = plan_spans(n, ratio, gen(seed))
        y = span_infilling(x, MASK, ratio, gen(seed))
        k, covered = len(spans), sum(length for _, length in spans)
        assert int((y == MASK).sum()) == k                                         # ONE <mask> per span
        assert covered == round(ratio * n)                                          # masked length == ratio
        assert len(y) == n - covered + k
        kept = y[y != MASK]
        assert bool((kept[1:] > kept[:-1]).all()) and len(kept) == n - covered    # the rest in order
        starts = [s for s, _ in spans]
        assert starts == sorted(starts) and all(s + l <= n for s, l in spans)
        assert all(a + la <= b for (a, la), (b, _) in zip(spans, spans[1:]))      # no overlap


def test_span_infilling_rebuilds_from_the_plan_including_zero_length_spans():
    x = torch.arange(10, 70)
    seed = next(s for s in range(500) if any(length == 0 for _, length in plan_spans(60, 0.3, gen(s))))
    spans = plan_spans(60, 0.3, gen(seed))
    expected, cursor = [], 0
    for start, length in spans:                                                    # a 0-length span inserts <mask>
        expected += x[cursor:start].tolist() + [MASK]
        cursor = start + length
    expected += x[cursor:].tolist()
    assert span_infilling(x, MASK, 0.3, gen(seed)).tolist() == expected


def test_span_lengths_are_poisson_lambda_3():
    lengths = []
    for seed in range(300):
        draw = poisson_span_lengths(300, gen(seed), 3.0)
        assert sum(draw) == 300
        lengths += draw[:-1]                                                       # the last one is trimmed
    lengths = np.array(lengths)                                                    # ~30k draws
    assert abs(lengths.mean() - 3.0) < 0.06                                        # std err ~0.01
    assert abs(lengths.var() - 3.0) < 0.15                                         # Poisson: var = mean
    assert abs((lengths == 0).mean() - math.exp(-3)) < 0.006                        # P(0) = e^-3 = 0.0498


def test_sentence_permutation_permutes_sentences():
    end = 9
    x = torch.tensor([11, 12, end, 13, end, 14, 15, 16, end, 17, end, 18, 19])
    sentences = [tuple(s.tolist()) for s in split_sentences(x, [end])]
    assert sentences == [(11, 12, 9), (13, 9), (14, 15, 16, 9), (17, 9), (18, 19)]
    changed = 0
    for seed in range(10):
        y = sentence_permutation(x, [end], gen(seed))
        got = [tuple(s.tolist()) for s in split_sentences(y, [end])]
        # the last piece has no end token, so it may glue to the next sentence: compare tokens and pieces
        assert sorted(y.tolist()) == sorted(x.tolist())
        assert any(tuple(y[i:i + 3].tolist()) == (14, 15, 16) for i in range(len(y)))
        changed += got != sentences
    assert changed >= 8
    y = sentence_permutation(x[:-2], [end], gen(0))                                # all sentences end with 9
    assert sorted(tuple(s.tolist()) for s in split_sentences(y, [end])) == sorted(sentences[:-1])
    assert y.tolist() != x[:-2].tolist()


def test_document_rotation_is_a_rotation():
    x = torch.arange(10, 30)
    starts = set()
    for seed in range(20):
        y = document_rotation(x, gen(seed))
        k = int(y[0]) - 10
        assert torch.equal(y, torch.cat([x[k:], x[:k]]))
        starts.add(k)
    assert len(starts) > 5


def test_apply_noise_composes_in_a_fixed_order_and_checks_names():
    x = torch.arange(10, 60)
    a = apply_noise(x, ["span_infilling", "document_rotation"], gen(3), mask_id=MASK, mask_ratio=0.3)
    b = apply_noise(x, ["document_rotation", "span_infilling"], gen(3), mask_id=MASK, mask_ratio=0.3)
    assert torch.equal(a, b) and int((a == MASK).sum()) > 0
    with pytest.raises(ValueError, match=r"noise='shuffle': expected one of"):
        apply_noise(x, ["shuffle"], gen(0), mask_id=MASK)
    with pytest.raises(ValueError, match="needs a mask token"):
        apply_noise(x, ["token_masking"], gen(0))
    with pytest.raises(ValueError, match=r"mask_ratio=1.5"):
        token_masking(x, MASK, 1.5, gen(0))


# ---- losses -----------------------------------------------------------------------------------------
def test_cross_entropy_and_accuracy_equal_the_hand_formula():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [9.0, 9.0, 9.0]],
                           [[0.0, 0.0, 3.0], [1.0, -1.0, 0.0], [0.0, 4.0, 0.0]]])   # (2, 3, 3)
    labels = torch.tensor([[0, 2, -100], [2, 1, -100]])                            # (2, 3)
    scored = [(0, 0, 0), (0, 1, 2), (1, 0, 2), (1, 1, 1)]
    nll = [math.log(sum(math.exp(v) for v in logits[b, t].tolist())) - float(logits[b, t, y]) for b, t, y in scored]
    assert dae_loss(logits, labels).item() == pytest.approx(sum(nll) / 4, rel=1e-6)
    assert reconstruction_accuracy(logits, labels) == pytest.approx(2 / 4)         # hits at (0,0) and (1,0)


def test_continuous_loss_equals_the_hand_formula():
    pred = torch.tensor([[[1.0, 2.0], [0.0, 0.0], [5.0, 5.0]]])                    # (1, 3, 2)
    target = torch.tensor([[[0.0, 0.0], [1.0, -1.0], [0.0, 0.0]]])                 # (1, 3, 2)
    # ||x - x̂||² per position: 1+4 = 5, 1+1 = 2, 25+25 = 50
    assert continuous_reconstruction_loss(pred, target).item() == pytest.approx((5 + 2 + 50) / 3)
    mask = torch.tensor([[1, 1, 0]])
    assert continuous_reconstruction_loss(pred, target, mask).item() == pytest.approx((5 + 2) / 2)
    assert continuous_reconstruction_loss(pred[0], target[0]).item() == pytest.approx(57 / 3)   # (T, d)


# ---- collator ---------------------------------------------------------------------------------------
def collator(**kw) -> DenoisingCollator:
    return DenoisingCollator(eos_token_id=EOS, pad_token_id=PAD, mask_token_id=MASK, **kw)


def test_collate_builds_labels_and_shifted_decoder_inputs():
    batch = collator().collate([[5, 6, 7, 8], [9, 10]], [[MASK, 8], [9, MASK, 10]])
    assert batch["input_ids"].tolist() == [[MASK, 8, EOS, PAD], [9, MASK, 10, EOS]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[5, 6, 7, 8, EOS], [9, 10, EOS, -100, -100]]
    assert batch["decoder_input_ids"].tolist() == [[EOS, 5, 6, 7, 8], [EOS, 9, 10, EOS, PAD]]
    assert batch["decoder_attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    capped = collator(max_length=3).collate([[5, 6, 7, 8]], [[5, 6, 7, 8]])
    assert capped["labels"].tolist() == [[5, 6, EOS]] and capped["input_ids"].tolist() == [[5, 6, EOS]]


def test_collator_call_shapes_shift_and_seeding():
    c = collator(noise=["span_infilling", "sentence_permutation"], sentence_end_ids=[20])
    rows = [torch.arange(10, 40), torch.arange(40, 52)]
    batch = c(rows, seed=1, step=4)
    labels, dec = batch["labels"], batch["decoder_input_ids"]                      # (2, 31)
    assert labels.shape == dec.shape == (2, 31) and batch["input_ids"].shape[0] == 2
    assert (dec[:, 0] == EOS).all()
    real = labels[:, :-1] != -100
    assert torch.equal(dec[:, 1:][real], labels[:, :-1][real]) and (dec[:, 1:][~real] == PAD).all()
    assert labels[1, :13].tolist() == list(range(40, 52)) + [EOS] and (labels[1, 13:] == -100).all()
    assert torch.equal(batch["attention_mask"].sum(1), (batch["input_ids"] != PAD).sum(1))
    again = c(rows, seed=1, step=4)
    assert all(torch.equal(batch[k], again[k]) for k in batch)
    assert not torch.equal(c(rows, seed=1, step=5)["input_ids"], batch["input_ids"])


def tiny_model(vocab: int = 40, **kw):
    torch.manual_seed(0)
    config = get_preset("bart-tiny", vocab_size=vocab, pad_token_id=PAD, eos_token_id=EOS,
                        decoder_start_token_id=EOS, max_seq_len=64, **kw)
    return build_model(config, "seq2seq_lm").eval()


def test_pads_are_ignored_by_model_and_loss(one_thread):
    model, c = tiny_model(), collator(noise=["token_masking"])
    long_row, short_row = torch.arange(3, 33), torch.arange(10, 20)
    both = c([long_row, short_row], seed=0, step=0, rows=[0, 1])
    alone = c([short_row], seed=0, step=0, rows=[1])                               # same noise for the row
    out_both = model(both["input_ids"], both["attention_mask"], decoder_input_ids=both["decoder_input_ids"],
                     decoder_attention_mask=both["decoder_attention_mask"]).logits  # (2, 31, V)
    out_alone = model(alone["input_ids"], alone["attention_mask"], decoder_input_ids=alone["decoder_input_ids"],
                      decoder_attention_mask=alone["decoder_attention_mask"]).logits  # (1, 11, V)
    assert torch.allclose(out_both[1, :11], out_alone[0], atol=1e-5)
    garbage = out_both.clone()
    garbage[1, 11:] = torch.randn_like(garbage[1, 11:]) * 100                      # positions with label -100
    assert dae_loss(garbage, both["labels"]).item() == pytest.approx(dae_loss(out_both, both["labels"]).item())


def test_objective_loss_matches_formulas_on_a_model(one_thread):
    model, c = tiny_model(), collator()
    batch = c([torch.arange(3, 30), torch.arange(5, 17)], seed=0, step=0)
    loss, metrics = DenoisingObjective().loss(model, batch)
    logits = model(batch["input_ids"], batch["attention_mask"], decoder_input_ids=batch["decoder_input_ids"],
                   decoder_attention_mask=batch["decoder_attention_mask"]).logits
    assert loss.item() == pytest.approx(dae_loss(logits, batch["labels"]).item(), rel=1e-5)
    assert set(metrics) == {"loss", "dae_acc"} and 0.0 <= metrics["dae_acc"] <= 1.0
    # continuous: decoder states vs the detached embeddings of the original tokens
    loss_c, _ = DenoisingObjective(continuous=True).loss(model, batch)
    hidden = model(batch["input_ids"], batch["attention_mask"], decoder_input_ids=batch["decoder_input_ids"],
                   decoder_attention_mask=batch["decoder_attention_mask"]).last_hidden_state   # (2, T, d)
    labels = batch["labels"]
    target = model.transformer.embed_tokens(labels.clamp_min(0))                   # embed_scale = 1 here
    real = labels != -100
    hand = ((hidden - target) ** 2).sum(-1)[real].mean()
    assert loss_c.item() == pytest.approx(hand.item(), rel=1e-5)
    loss_c.backward()
    grads = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith("transformer.encoder.") for n in grads)               # flows through x̃ too



def test_feature_vector_denoising_learns(one_thread):
    """Continuous DAE on feature vectors through a `dae_projection`: x_t = (z + 0.3 ε_t) B with one latent
    z per sequence, 30 % of the input vectors zeroed. Seen: loss 25.6 -> 6.5 in 60 steps, against
    31 for predicting 0 (E‖x‖²)."""
    torch.manual_seed(0)
    d = 32
    model = tiny_model(vocab=8, d_model=d, n_heads=2, d_ff=64, n_layers=1).train()
    model.dae_projection = torch.nn.Linear(d, d)                                  # picked up by the loss
    objective = DenoisingObjective(continuous=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    basis = torch.randn(4, d) * 0.5                                                # features on a 4-d subspace

    def batch(seed):
        g = gen(seed)
        z = torch.randn(16, 1, 4, generator=g) + 0.3 * torch.randn(16, 8, 4, generator=g)
        x = z @ basis                                                              # (B, T, d)
        keep = (torch.rand(16, 8, 1, generator=g) > 0.3).float()                   # (B, T, 1)
        return {"input_features": x * keep, "target_features": x}
    losses = []
    for step in range(60):
        loss, metrics = objective.loss(model, batch(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(metrics["loss"])
    zero_baseline = float((batch(0)["target_features"] ** 2).sum(-1).mean())
    assert np.mean(losses[-5:]) < 0.35 * zero_baseline and np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


# ---- data ---------------------------------------------------------------------------------------------
def stream(n: int = 5000) -> np.ndarray:
    return np.random.default_rng(0).integers(3, 40, size=n)


def test_loader_resume_is_exact():
    for sampling in ("random", "packed"):
        a = DenoisingBatches(stream(), collator(), 4, 16, sampling=sampling, seed=3)
        for _ in range(3):
            next(a)
        state = a.state_dict()
        expected = [next(a) for _ in range(3)]
        b = DenoisingBatches(stream(), collator(), 4, 16, sampling=sampling, seed=3)
        b.load_state_dict(state)
        for want in expected:
            got = next(b)
            assert all(torch.equal(got[k], want[k]) for k in want)
        other = DenoisingBatches(stream(), collator(), 4, 16, sampling=sampling, seed=4)
        with pytest.raises(DataError, match="seed"):
            other.load_state_dict(state)


def rows_of(batch: dict) -> list[tuple]:
    return [tuple(r[r != -100].tolist()) for r in batch["labels"]]


def test_ranks_take_disjoint_rows_of_the_global_batch():
    single = DenoisingBatches(stream(), collator(), 4, 16, seed=0)
    ranks = [DenoisingBatches(stream(), collator(), 4, 16, seed=0, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(3):
        whole, r0, r1 = next(single), next(ranks[0]), next(ranks[1])
        assert r0["labels"].shape[0] == r1["labels"].shape[0] == 2
        assert rows_of(r0) == rows_of(whole)[0::2] and rows_of(r1) == rows_of(whole)[1::2]
        assert not set(rows_of(r0)) & set(rows_of(r1))
        inputs = [tuple(r[r != PAD].tolist()) for r in whole["input_ids"]]        # noise independent of rank
        assert [tuple(r[r != PAD].tolist()) for r in r1["input_ids"]] == inputs[1::2]
    with pytest.raises(DataError, match="divisible by world_size=3"):
        DenoisingBatches(stream(), collator(), 4, 16, world_size=3, rank=0)


# ---- bad input ------------------------------------------------------------------------------------------
def test_decoder_only_model_is_a_clear_error():
    objective = DenoisingObjective()
    gpt = build_model(get_preset("gpt2-tiny", vocab_size=40))
    batch = collator()([torch.arange(3, 10)])
    with pytest.raises(ValueError, match=r"needs an encoder-decoder model: ModelConfig.is_encoder_decoder=False"):
        objective.loss(gpt, batch)
    with pytest.raises(ValueError, match=r"is_encoder_decoder=False \(family 'gpt2'\).*bart-tiny"):
        objective.build_model(get_preset("gpt2-tiny"))


def test_tokenizer_without_mask_and_bad_options_are_clear_errors():
    tok = char_tokenizer("abc. def.", roles={})
    with pytest.raises(ValueError, match=r"has no mask_token"):
        DenoisingObjective().make_collator(tok)
    DenoisingObjective(noise=["token_deletion", "document_rotation"]).make_collator(tok)   # no mask needed
    with pytest.raises(ValueError, match=r"noise='infill'"):
        DenoisingObjective(noise=["infill"])
    with pytest.raises(ValueError, match=r"mask_ratio=2"):
        DenoisingObjective(mask_ratio=2)
    with pytest.raises(ValueError, match=r"length=1"):
        DenoisingBatches(stream(), collator(), 4, 1)


# ---- through `llmkit pretrain` ----------------------------------------------------------------------------
def test_recipe_runs_through_pretrain(tmp_path, monkeypatch, one_thread):
    from llmkit import objectives
    from llmkit.pretrain import parse_recipe, run_pretrain
    from llmkit.recipes import apply_overrides, load_yaml
    monkeypatch.setitem(objectives.OBJECTIVES, "dae", DenoisingObjective)   # registered in objectives/__init__
    source = tmp_path / "shakespeare_head.txt"
    source.write_text((SHARED_DATA / "tinyshakespeare.txt").read_text()[:60_000])
    data = apply_overrides(load_yaml(REPO / "recipes" / "dae_tiny.yaml"), [
        f"train.out_dir={tmp_path / 'run'}", "train.max_steps=3", "train.warmup_steps=1", "train.eval_every=3",
        "train.eval_batches=2", "train.progress=false", f"data.source={source}",
        "data.batch_size=4", "train.plot=false"])
    summary = run_pretrain(parse_recipe(data))
    assert summary["step"] == 3 and math.isfinite(summary["val_loss"])
    model = load_any(tmp_path / "run" / "model")
    tok = load_tokenizer(tmp_path / "run" / "model")
    assert model.config.is_encoder_decoder and tok.mask_token_id is not None
    assert model.config.decoder_start_token_id == tok.eos_token_id and model.config.pad_token_id == tok.pad_token_id


# ---- real learning ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_dae_learns_to_reconstruct_shakespeare(one_thread):
    """bart-tiny-sized (d_model 128, 2 + 2 layers, 0.95M parameters) on the first 300k chars of
    tinyshakespeare, char tokens, span infilling + sentence permutation at mask_ratio 0.3, windows of
    31 chars + </s>, batch 32, 250 AdamW steps. Seen (4 x 32 held-out windows): dae_acc 0.029 at init
    -> 0.348 after 250 steps, against 0.248 for the trained model with every encoder token replaced
    by <mask> (what its decoder guesses alone). Longer runs: 0.40 after 400 steps; 0.42 after 500
    steps on 64-char windows.
    30 s on 2 lightly shared CPU cores (about 2.5 min when they were heavily shared). Greedy
    decoding at this stage is still mostly a language model ("the the the ...")."""
    text = (SHARED_DATA / "tinyshakespeare.txt").read_text()[:300_000]
    tok = char_tokenizer(text)
    ids = np.array(tok.encode(text, add_special_tokens=False))
    split = int(0.9 * len(ids))
    objective = DenoisingObjective(noise=["span_infilling", "sentence_permutation"], mask_ratio=0.3)
    c = objective.make_collator(tok, max_length=32)
    train = DenoisingBatches(ids[:split], c, 32, 31, seed=0)
    val = DenoisingBatches(ids[split:], c, 32, 31, seed=123)
    val_batches = [val.batch_at(i) for i in range(4)]                              # 128 held-out windows
    torch.manual_seed(0)
    model = objective.build_model(get_preset("bart-tiny", vocab_size=tok.vocab_size, d_model=128, n_heads=4,
                                             d_ff=512, n_layers=2, max_seq_len=32))

    def accuracy(batches=val_batches):
        model.eval()
        with torch.no_grad():
            accs = [objective.loss(model, b)[1]["dae_acc"] for b in batches]
        model.train()
        return float(np.mean(accs))
    before, steps = accuracy(), 250
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    started = time.time()
    for _ in range(steps):
        loss, _ = objective.loss(model, next(train))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    after = accuracy()
    # the same targets with an uninformative encoder input (every real token -> <mask>): what the
    # decoder alone guesses as a language model; the gap is what it reads from x̃
    blind = accuracy([{**b, "input_ids": b["input_ids"].masked_fill(b["attention_mask"].bool(), tok.mask_token_id)}
                      for b in val_batches])
    model.eval()
    first = val_batches[0]
    rebuilt = generate(model, first["input_ids"][:1], attention_mask=first["attention_mask"][:1], max_new_tokens=31)
    print(f"\ndae_acc {before:.3f} -> {after:.3f} in {time.time() - started:.0f} s (blind encoder: {blind:.3f})\n"
          f"  corrupted {tok.decode(first['input_ids'][0], skip_special_tokens=False)!r}\n"
          f"  rebuilt   {tok.decode(rebuilt[0])!r}")
    assert before < 0.1 and after > 0.25 and after > before + 0.2
    assert after > blind + 0.05                                                    # it reads x̃
