"""Tests for llmkit.generate: KV-cache decoding equals full forwards, greedy parity with Hugging Face
transformers, left padding, logit processors, stop tokens, SamplingParams validation, seq2seq."""
from __future__ import annotations

import re

import pytest
import torch

import llmkit
from llmkit.generation import (SamplingParams, apply_repetition_penalty, apply_temperature, apply_top_k,
                             apply_top_p, generate, pick_tokens, process_logits, stream_generate)

CAUSAL = ["llama-tiny", "gpt2-tiny", "mistral-tiny"]


def build(name: str, seed: int = 0, **overrides):
    if name == "mistral-tiny":
        overrides.setdefault("sliding_window", 8)
    torch.manual_seed(seed)
    return llmkit.build_model(llmkit.get_preset(name, **overrides)).eval()


def prompt(batch: int, length: int, vocab: int = 512, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---- 1. KV-cache decoding == full forward ------------------------------------------------------

@pytest.mark.parametrize("name", CAUSAL)
def test_cached_logits_equal_full_forward(name):
    model = build(name)
    ids = prompt(2, 5)
    seqs, step_logits = generate(model, ids, max_new_tokens=20, return_logits=True)
    assert seqs.shape == (2, 25) and step_logits.shape == (2, 20, 512)
    assert torch.equal(seqs[:, :5], ids)
    with torch.no_grad():
        full = model(seqs).logits                                                   # (B, 25, V)
    torch.testing.assert_close(step_logits, full[:, 4:-1], atol=1e-5, rtol=0)
    assert torch.equal(seqs[:, 5:], step_logits.argmax(-1))
    if name == "mistral-tiny":  # decoding went past the window, and the window mattered
        no_window = build(name, sliding_window=None)
        with torch.no_grad():
            assert (no_window(seqs).logits[:, 4:-1] - step_logits).abs().max() > 1e-4


def test_one_prefill_then_one_token_per_forward():
    model = build("llama-tiny")
    lengths = []
    handle = model.register_forward_pre_hook(
        lambda mod, args, kwargs: lengths.append((args[0].shape[1], kwargs.get("cache") is not None)),
        with_kwargs=True)
    try:
        generate(model, prompt(2, 6), max_new_tokens=7)
    finally:
        handle.remove()
    # The last new token needs no forward.
    assert lengths == [(6, True)] + [(1, True)] * 6


def test_outputs_are_normal_tensors_and_mode_restored():
    model = build("llama-tiny")
    model.train()
    seqs, logits = generate(model, prompt(1, 4), max_new_tokens=3, return_logits=True)
    assert not seqs.is_inference() and not logits.is_inference()
    assert model.training and not torch.is_inference_mode_enabled()
    streamed = stream_generate(model, prompt(1, 4), max_new_tokens=3)
    first = next(streamed)
    assert not torch.is_inference_mode_enabled() and not first.is_inference()
    streamed.close()
    assert model.training


def test_max_new_tokens_zero_returns_prompt():
    model = build("gpt2-tiny")
    ids = prompt(2, 4)
    seqs, logits = generate(model, ids, max_new_tokens=0, return_logits=True)
    assert torch.equal(seqs, ids) and logits.shape == (2, 0, 512)


# ---- 2. greedy parity with transformers --------------------------------------------------------

def _llama_like(family: str, sliding_window=None):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
              max_position_embeddings=256, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
              bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    if family == "mistral":
        hf = MistralForCausalLM(MistralConfig(**kw, sliding_window=sliding_window))
    else:
        hf = LlamaForCausalLM(LlamaConfig(**kw))
    c = hf.config
    config = llmkit.get_preset(
        f"{family}-tiny", vocab_size=c.vocab_size, d_model=c.hidden_size, n_layers=c.num_hidden_layers,
        n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads, d_ff=c.intermediate_size,
        norm_eps=c.rms_norm_eps, rope_theta=c.rope_parameters["rope_theta"],
        max_seq_len=c.max_position_embeddings, sliding_window=sliding_window)
    ours = llmkit.build_model(config)
    sd = {}
    for k, v in hf.state_dict().items():  # local copy, independent of llmkit.load_hf
        k = (k.replace("model.embed_tokens", "transformer.embed_tokens")
             .replace("model.norm", "transformer.final_norm").replace("model.layers", "transformer.layers")
             .replace("input_layernorm", "attn_norm").replace("post_attention_layernorm", "mlp_norm"))
        sd[k] = v
    ours.load_state_dict(sd, strict=True)
    return hf.eval(), ours.eval()


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                    n_inner=256, activation_function="gelu_new", layer_norm_epsilon=1e-5,
                                    bos_token_id=None, eos_token_id=None, tie_word_embeddings=True))
    c = hf.config
    ours = llmkit.build_model(llmkit.get_preset("gpt2-tiny", vocab_size=c.vocab_size, d_model=c.n_embd,
                                                n_layers=c.n_layer, n_heads=c.n_head, d_ff=c.n_inner,
                                                max_seq_len=c.n_positions, norm_eps=c.layer_norm_epsilon))
    src, d = hf.state_dict(), c.n_embd
    sd = {"transformer.embed_tokens.weight": src["transformer.wte.weight"],
          "transformer.embed_positions.weight": src["transformer.wpe.weight"],
          "transformer.final_norm.weight": src["transformer.ln_f.weight"],
          "transformer.final_norm.bias": src["transformer.ln_f.bias"],
          "lm_head.weight": src["transformer.wte.weight"]}
    for i in range(c.n_layer):
        h, o = f"transformer.h.{i}.", f"transformer.layers.{i}."
        for a, b in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
            sd[o + b + ".weight"], sd[o + b + ".bias"] = src[h + a + ".weight"], src[h + a + ".bias"]
        # GPT-2's Conv1D stores (in, out): transpose into nn.Linear's (out, in).
        for a, b in (("attn.c_proj", "self_attn.o_proj"), ("mlp.c_fc", "mlp.up_proj"),
                     ("mlp.c_proj", "mlp.down_proj")):
            sd[o + b + ".weight"], sd[o + b + ".bias"] = src[h + a + ".weight"].t(), src[h + a + ".bias"]
        w, bias = src[h + "attn.c_attn.weight"].t(), src[h + "attn.c_attn.bias"]          # (3d, d), (3d,)
        for j, p in enumerate("qkv"):
            sd[o + f"self_attn.{p}_proj.weight"] = w[j * d:(j + 1) * d]
            sd[o + f"self_attn.{p}_proj.bias"] = bias[j * d:(j + 1) * d]
    ours.load_state_dict(sd, strict=True)
    return hf.eval(), ours.eval()


PARITY = {"llama": lambda: _llama_like("llama"), "gpt2": _gpt2,
          "mistral": lambda: _llama_like("mistral", sliding_window=8)}


@pytest.mark.parametrize("via", ["local_copy", "load_hf"])
@pytest.mark.parametrize("family", sorted(PARITY))
def test_greedy_tokens_match_transformers(family, via, tmp_path):
    hf, ours = PARITY[family]()
    if via == "load_hf":  # the real converter (llmkit.io.hf) on the same checkpoint
        hf.save_pretrained(tmp_path)
        ours = llmkit.load_hf(tmp_path).eval()
    ids = prompt(2, 5, vocab=128)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20,
                               do_sample=False, pad_token_id=0)
    got = generate(ours, ids, max_new_tokens=20)
    assert expected.shape == (2, 25)
    assert torch.equal(got, expected)


def test_left_padded_greedy_matches_transformers():
    hf, ours = PARITY["llama"]()
    ids = prompt(2, 7, vocab=128)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ids = ids.masked_fill(mask == 0, 0)
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(generate(ours, ids, attention_mask=mask, max_new_tokens=12), expected)


# ---- 3. left-padded batch == each prompt alone --------------------------------------------------

@pytest.mark.parametrize("name", CAUSAL)
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_left_padded_batch_matches_single_prompts(name, penalty):
    model = build(name)
    short, long = prompt(1, 4, seed=2), prompt(1, 9, seed=3)
    alone_short = generate(model, short, max_new_tokens=12, repetition_penalty=penalty)[0, 4:]
    alone_long = generate(model, long, max_new_tokens=12, repetition_penalty=penalty)[0, 9:]
    # Pad with the token the short prompt picks first: penalizing pads would change that pick.
    pad = int(alone_short[0])
    ids = torch.cat([torch.cat([torch.full((1, 5), pad), short], 1), long])         # (2, 9)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    batch = generate(model, ids, attention_mask=mask, max_new_tokens=12, repetition_penalty=penalty)
    assert torch.equal(batch[0, 9:], alone_short)
    assert torch.equal(batch[1, 9:], alone_long)
    # An all-ones mask takes the unpadded path and changes nothing.
    assert torch.equal(generate(model, long, attention_mask=torch.ones_like(long), max_new_tokens=12,
                                repetition_penalty=penalty)[0, 9:], alone_long)


# ---- 4. logit processors ------------------------------------------------------------------------

def test_repetition_penalty_formula():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1, 1]]), 2.0)
    torch.testing.assert_close(out, torch.tensor([[1.0, -2.0, 0.5, 3.0]]))
    # Masked (padding) positions do not count as seen.
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1]]), 2.0, mask=torch.tensor([[0, 1]]))
    torch.testing.assert_close(out, torch.tensor([[2.0, -2.0, 0.5, 3.0]]))
    assert torch.equal(apply_repetition_penalty(logits, torch.tensor([[0]]), 1.0), logits)


def test_temperature_and_top_k():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [4.0, -1.0, 4.0, 1.0]])
    torch.testing.assert_close(apply_temperature(logits, 0.5), logits * 2)
    inf = float("-inf")
    expected = torch.tensor([[inf, 3.0, 2.0, inf], [4.0, inf, 4.0, inf]])
    assert torch.equal(apply_top_k(logits, 2), expected)
    assert torch.equal(apply_top_k(logits, 1)[0], torch.tensor([inf, 3.0, inf, inf]))
    assert torch.equal(apply_top_k(logits, 10), logits)


@pytest.mark.parametrize("p, kept", [(0.3, {3}), (0.75, {3, 0}), (0.85, {3, 0, 2}), (0.97, {0, 1, 2, 3}),
                                     (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_smallest_nucleus(p, kept):
    probs = torch.tensor([0.3, 0.05, 0.15, 0.5])
    logits = probs.log().unsqueeze(0) + 1.7                                          # (1, 4)
    out = apply_top_p(logits, p)
    assert set(torch.isfinite(out[0]).nonzero().flatten().tolist()) == kept
    assert torch.equal(out[0, sorted(kept)], logits[0, sorted(kept)])


def test_processors_order_and_greedy_skips_warpers():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    seen = torch.tensor([[0]])
    sampled = process_logits(logits, SamplingParams(do_sample=True, temperature=0.5, top_k=2,
                                                    repetition_penalty=4.0), seen)
    inf = float("-inf")
    assert torch.equal(sampled, torch.tensor([[1.0, 2.0, inf, inf]]))  # penalty, then /T, then top-k
    # Temperature before top-p: T = 2 flattens [.3, .05, .15, .5] to ~[.29, .12, .21, .38], so the
    # 0.75-nucleus grows from 2 tokens to 3.
    probs = torch.tensor([[0.3, 0.05, 0.15, 0.5]])
    warped = process_logits(probs.log(), SamplingParams(do_sample=True, temperature=2.0, top_p=0.75),
                            torch.tensor([[1]]))
    assert torch.isfinite(warped).tolist() == [[True, False, True, True]]
    greedy = process_logits(logits, SamplingParams(temperature=0.5, top_k=1, repetition_penalty=4.0), seen)
    assert torch.equal(greedy, torch.tensor([[0.5, 1.0, 0.0, -1.0]]))


def test_sampling_draws_only_from_the_nucleus_with_right_frequencies():
    probs = torch.tensor([0.3, 0.05, 0.15, 0.5])
    logits = apply_top_p(probs.log().expand(20000, 4), 0.75)
    draws = pick_tokens(logits, True, torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=4).float() / draws.numel()
    assert counts[1] == 0 and counts[2] == 0
    assert abs(counts[3] - 0.5 / 0.8) < 0.02 and abs(counts[0] - 0.3 / 0.8) < 0.02


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = build("llama-tiny")
    ids = prompt(2, 5)
    kw = dict(max_new_tokens=15, do_sample=True, temperature=1.5, top_p=0.95)
    a = generate(model, ids, generator=torch.Generator().manual_seed(7), **kw)
    b = generate(model, ids, generator=torch.Generator().manual_seed(7), **kw)
    c = generate(model, ids, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = generate(model, ids, max_new_tokens=15)
    assert not torch.equal(a, greedy)
    top1 = generate(model, ids, max_new_tokens=15, do_sample=True, top_k=1, temperature=3.0,
                    generator=torch.Generator().manual_seed(7))
    assert torch.equal(top1, greedy)


def test_stream_and_params_match_generate():
    model = build("gpt2-tiny")
    ids = prompt(2, 5)
    params = SamplingParams(max_new_tokens=8, do_sample=True, top_k=20)
    out = generate(model, ids, params=params, generator=torch.Generator().manual_seed(3))
    streamed = list(stream_generate(model, ids, params=params, generator=torch.Generator().manual_seed(3)))
    assert len(streamed) == 8 and all(t.shape == (2,) for t in streamed)
    assert torch.equal(out[:, 5:], torch.stack(streamed, 1))
    kw = generate(model, ids, max_new_tokens=8, do_sample=True, top_k=20,
                  generator=torch.Generator().manual_seed(3))
    assert torch.equal(out, kw)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, ids, params=params, top_k=5)


# ---- 5. stop tokens -----------------------------------------------------------------------------

def _first_hit(row: torch.Tensor, stops: set) -> int:
    return next(i for i, t in enumerate(row.tolist()) if t in stops)


@pytest.mark.parametrize("pad_token_id", [None, 0])
def test_stop_tokens_pad_finished_rows_and_end_early(pad_token_id):
    model = build("llama-tiny", pad_token_id=pad_token_id)
    ids = prompt(2, 5)
    free = generate(model, ids, max_new_tokens=20)[:, 5:]                           # (2, 20)
    s0 = int(free[0, 3])
    assert s0 not in free[0, :3].tolist(), "test setup: pick a prompt whose step-3 token is new"
    pad = s0 if pad_token_id is None else pad_token_id
    # One stop token: row 0 stops at step 3 and pads afterwards; row 1 runs on.
    assert s0 not in free[1].tolist(), "test setup: row 1 must never emit row 0's stop token"
    out = generate(model, ids, max_new_tokens=20, stop_token_ids=s0)[:, 5:]
    assert out.shape == (2, 20)
    assert torch.equal(out[0, :4], free[0, :4]) and (out[0, 4:] == pad).all()
    assert torch.equal(out[1], free[1])
    # Stop tokens hit by both rows: the loop ends after the later one.
    s1 = int(free[1, 5])
    stops = {s0, s1}
    hits = [_first_hit(free[0], stops), _first_hit(free[1], stops)]
    assert max(hits) < 19
    out = generate(model, ids, max_new_tokens=20, stop_token_ids=[s0, s1])[:, 5:]
    assert out.shape == (2, max(hits) + 1)
    for r, hit in enumerate(hits):
        assert torch.equal(out[r, :hit + 1], free[r, :hit + 1])
        assert (out[r, hit + 1:] == pad).all()


def test_default_stop_is_eos_and_empty_list_disables():
    model = build("llama-tiny")
    ids = prompt(1, 5)
    free = generate(model, ids, max_new_tokens=20)
    eos = int(free[0, 5 + 3])
    hit = _first_hit(free[0, 5:], {eos})
    model.config.eos_token_id = eos
    assert generate(model, ids, max_new_tokens=20).shape == (1, 5 + hit + 1)
    assert torch.equal(generate(model, ids, max_new_tokens=20, stop_token_ids=[]), free)
    assert len(list(stream_generate(model, ids, max_new_tokens=20))) == hit + 1


# ---- 6. SamplingParams validation ---------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("max_new_tokens", -1), ("max_new_tokens", 2.5), ("top_k", 0), ("top_k", 1.5), ("top_p", 0.0),
    ("top_p", 1.2), ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("temperature", -0.5),
    ("stop_token_ids", [1, -2]), ("stop_token_ids", "eos"), ("do_sample", "yes"),
])
def test_bad_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=re.escape(f"SamplingParams.{field}={value!r}: expected")):
        SamplingParams(**{field: value})


def test_zero_temperature_only_rejected_when_sampling():
    SamplingParams(temperature=0.0)
    with pytest.raises(ValueError, match=r"temperature=0\.0: expected a number > 0"):
        SamplingParams(temperature=0.0, do_sample=True)
    with pytest.raises(ValueError, match="top_p"):
        generate(build("gpt2-tiny"), prompt(1, 3), top_p=1.5)


def test_bad_inputs_are_rejected():
    model = build("gpt2-tiny")
    with pytest.raises(ValueError, match="input_ids"):
        generate(model, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="attention_mask"):
        generate(model, prompt(2, 4), attention_mask=torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, prompt(1, 250), max_new_tokens=10)


# ---- 7. encoder-decoder -------------------------------------------------------------------------

def test_seq2seq_cached_logits_equal_teacher_forcing():
    model = build("bart-tiny")
    ids = prompt(2, 7)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    seqs, step_logits = generate(model, ids, attention_mask=mask, max_new_tokens=10, stop_token_ids=[],
                                 return_logits=True)
    assert seqs.shape == (2, 11) and (seqs[:, 0] == model.config.decoder_start_token_id).all()
    with torch.no_grad():
        full = model(ids, mask, decoder_input_ids=seqs[:, :-1]).logits               # (B, 10, V)
    torch.testing.assert_close(step_logits, full, atol=1e-5, rtol=0)
    assert torch.equal(seqs[:, 1:], full.argmax(-1))
    # The encoder mask matters: without it row 1 decodes differently.
    unmasked = generate(model, ids, max_new_tokens=10, stop_token_ids=[], return_logits=True)[1]
    assert (unmasked[1] - step_logits[1]).abs().max() > 1e-4
    assert torch.equal(unmasked[0], step_logits[0])


def test_package_level_generate_stays_the_function():
    """`llmkit.generate` must be the function on every access (not shadowed by a submodule)."""
    import llmkit
    import llmkit.generation  # noqa: F401  (importing the module must not rebind the name)
    assert callable(llmkit.generate) and callable(llmkit.generate)
    assert llmkit.generate is llmkit.generation.generate
