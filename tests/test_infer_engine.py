"""The engine (issue 16): greedy output equal to generate() and to transformers for mixed-length
requests arriving at different steps; chunked prefill beside decodes; prefix-cache hits with equal
logits; preemption by recompute with the same tokens; cancellation freeing blocks; streaming;
per-request sampling (seeds, n, stop strings and ids, logprobs, penalties); bad input refused while
the other requests keep going."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import llmkit
from llmkit.generation import generate
from llmkit.infer import Engine, KVBudgetError, SamplingParams
from llmkit.infer.sampler import apply_presence_frequency
from test_generate import PARITY, build

GREEDY = SamplingParams(max_tokens=12, temperature=0)


def prompts(lengths, vocab=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def reference(model, prompt, n):
    return generate(model, torch.tensor([prompt]), max_new_tokens=n, stop_token_ids=[])[0, len(prompt):].tolist()


def run_with_arrivals(engine, arrivals, params):
    """arrivals: {step: [prompts]}; returns {request_id: tokens} and the prompts by id."""
    ids, step = {}, 0
    while step <= max(arrivals) or engine.has_unfinished():
        for p in arrivals.get(step, []):
            ids[engine.add_request(p, params)] = p
        engine.step()
        step += 1
    return {rid: engine.output(rid).outputs[0].token_ids for rid in ids}, ids


@pytest.mark.parametrize("family", sorted(PARITY))
def test_greedy_equals_generate_and_transformers_with_staggered_arrivals(family):
    hf, ours = PARITY[family]()
    engine = Engine(ours, block_size=4, max_num_batched_tokens=16)
    ps = prompts([5, 19, 2, 11, 7])
    arrivals = {0: ps[:2], 1: [ps[2]], 4: ps[3:]}              # requests join a running batch
    got, by_id = run_with_arrivals(engine, arrivals, GREEDY)
    for rid, p in by_id.items():
        with torch.no_grad():
            expected = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                   max_new_tokens=12, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
        assert got[rid] == reference(ours, p, 12) == expected
    assert engine.kv_blocks_in_use == 0


def test_prefill_is_chunked_beside_decodes():
    model = build("llama-tiny", vocab_size=128)
    engine = Engine(model, block_size=4, max_num_batched_tokens=8)
    short, long = prompts([3, 30])
    a = engine.add_request(short, GREEDY)
    engine.step()                                             # a prefilled; it decodes from now on
    b = engine.add_request(long, GREEDY)
    plans, schedule = [], engine.scheduler.schedule

    def recording():
        plan = schedule()
        plans.append({item.seq.request_id: item.num_new for item in plan})
        return plan
    engine.scheduler.schedule = recording
    while engine.has_unfinished():
        engine.step()
    # one forward holds a's decode token and a 7-token chunk of b's prompt, until b's prompt is done
    assert plans[:4] == [{a: 1, b: 7}] * 4 and plans[4] == {a: 1, b: 2}
    assert all(sum(p.values()) <= 8 for p in plans)
    assert engine.output(a).outputs[0].token_ids == reference(model, short, 12)
    assert engine.output(b).outputs[0].token_ids == reference(model, long, 12)


def test_prefix_cache_hit_gives_equal_logits_and_counts_cached_tokens():
    model = build("llama-tiny", vocab_size=128)
    system = prompts([24])[0]
    users = prompts([3, 5], seed=2)
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=5)
    outs = {}
    for caching in (True, False):
        engine = Engine(model, block_size=8, prefix_caching=caching)
        first = engine.generate([system + users[0]], params, return_outputs=True)[0]
        second = engine.generate([system + users[1]], params, return_outputs=True)[0]
        outs[caching] = (first, second)
    hit, miss = outs[True][1], outs[False][1]
    assert hit.num_cached_tokens == 24 and miss.num_cached_tokens == 0 and outs[True][0].num_cached_tokens == 0
    assert hit.outputs[0].token_ids == miss.outputs[0].token_ids
    for a, b in zip(hit.outputs[0].logprobs, miss.outputs[0].logprobs):
        assert [t for t, _ in a["top"]] == [t for t, _ in b["top"]]
        torch.testing.assert_close(torch.tensor([v for _, v in a["top"]]), torch.tensor([v for _, v in b["top"]]),
                                   atol=1e-5, rtol=0)


def test_preemption_by_recompute_gives_the_same_tokens():
    model = build("gpt2-tiny", vocab_size=128)
    ps = prompts([6, 9, 4, 7])
    params = SamplingParams(max_tokens=20, temperature=0.8, seed=3)
    roomy = Engine(model, block_size=4).generate(ps, params)
    tight = Engine(model, block_size=4, num_blocks=14)      # 4 x (prompt + 20) tokens need ~28 blocks
    got = tight.generate(ps, params)
    assert tight.scheduler.num_preemptions > 0
    assert got == roomy
    assert tight.kv_blocks_in_use == 0


def test_cancel_frees_blocks_at_once_and_others_continue():
    model = build("llama-tiny", vocab_size=128)
    engine = Engine(model, block_size=4)
    a, b = prompts([10, 6])
    ra, rb = engine.add_request(a, SamplingParams(max_tokens=30, temperature=0)), engine.add_request(b, GREEDY)
    engine.step()
    engine.step()
    held = engine.kv_blocks_in_use
    engine.cancel(ra)
    assert engine.kv_blocks_in_use == held - engine.pool.blocks_for(len(a) + 1) and engine.output(ra).finished
    assert engine.output(ra).outputs[0].finish_reason == "abort"
    tokens = list(engine.stream(rb))
    assert tokens == reference(model, b, 12) and engine.kv_blocks_in_use == 0
    assert not engine.has_unfinished()


def test_stream_yields_new_tokens_and_can_be_read_after_finishing():
    model = build("llama-tiny", vocab_size=128)
    engine = Engine(model)
    a, b = prompts([4, 8])
    ra, rb = engine.add_request(a, GREEDY), engine.add_request(b, GREEDY)
    first = []
    for token in engine.stream(ra):                          # steps the engine: b advances too
        first.append(token)
    assert first == reference(model, a, 12)
    assert engine.output(rb).finished                        # same length: b ended in the same steps
    assert list(engine.stream(rb)) == reference(model, b, 12)  # read after it finished
    with pytest.raises(KeyError, match="no such request"):
        engine.output(rb)                                    # a stream read to the end releases it


def test_seeded_sampling_does_not_depend_on_the_batch_and_n_samples_differ():
    model = build("llama-tiny", vocab_size=128)
    p, others = prompts([5])[0], prompts([7, 3, 12], seed=9)
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=40, seed=11)
    alone = Engine(model).generate([p], params)[0]
    crowded = Engine(model, seed=5).generate([p] + others, [params] + [SamplingParams(max_tokens=10)] * 3)[0]
    assert alone == crowded
    two = Engine(model).generate([p], dataclasses.replace(params, n=2))[0]
    assert len(two) == 2 and two[0] == alone and two[0] != two[1]


def test_stop_strings_stop_ids_eos_and_ignore_eos():
    tok = llmkit.tokenizer.train_char(texts=["abcdefgh xyz"])
    torch.manual_seed(0)
    model = llmkit.build_model(llmkit.get_preset("llama-tiny", vocab_size=tok.vocab_size)).eval()
    engine = Engine(model, tokenizer=tok)
    p = tok.encode("abc")
    free = engine.generate([p], SamplingParams(max_tokens=20, temperature=0), return_outputs=True)[0].outputs[0]
    text = free.text
    assert text == tok.decode(free.token_ids) and len(text) >= 4
    stop = text[2:4]
    cut = engine.generate([p], SamplingParams(max_tokens=20, temperature=0, stop=stop), return_outputs=True)[0]
    out = cut.outputs[0]
    assert out.finish_reason == "stop" and out.text == text[:text.find(stop)] and stop not in out.text
    assert tok.decode(out.token_ids).endswith(stop)          # the ids keep the token that completed it
    stop_id = free.token_ids[3]
    by_id = engine.generate([p], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop_id]))[0]
    assert by_id == free.token_ids[:free.token_ids.index(stop_id) + 1]
    model.config.eos_token_id = stop_id                      # eos ends a request unless ignore_eos
    assert Engine(model).generate([p], SamplingParams(max_tokens=20, temperature=0))[0] == by_id
    assert Engine(model).generate([p], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0] == \
        free.token_ids


def test_logprobs_are_the_raw_log_softmax():
    model = build("gpt2-tiny", vocab_size=128)
    p = prompts([6])[0]
    out = Engine(model).generate([p], SamplingParams(max_tokens=5, temperature=0, logprobs=3),
                                 return_outputs=True)[0].outputs[0]
    _, logits = generate(model, torch.tensor([p]), max_new_tokens=5, stop_token_ids=[], return_logits=True)
    expected = torch.log_softmax(logits[0], -1)                                    # (5, V)
    for t, entry in enumerate(out.logprobs):
        assert entry["token"] == out.token_ids[t] and len(entry["top"]) == 3
        assert entry["top"][0][0] == entry["token"]                                # greedy: the top token
        torch.testing.assert_close(torch.tensor(entry["logprob"]), expected[t, entry["token"]], atol=1e-5, rtol=0)


def test_presence_and_frequency_penalties_formula():
    logits = torch.tensor([1.0, 2.0, 3.0, 4.0])
    got = apply_presence_frequency(logits, [1, 3, 3], presence=0.5, frequency=0.25)
    # token 1 seen once: 2 - 0.5 - 0.25; token 3 twice: 4 - 0.5 - 0.5
    assert torch.equal(got, torch.tensor([1.0, 1.25, 3.0, 3.0]))
    model = build("llama-tiny", vocab_size=128)
    p = prompts([4])[0]
    plain = Engine(model).generate([p], SamplingParams(max_tokens=12, temperature=0))[0]
    penalised = Engine(model).generate([p], SamplingParams(max_tokens=12, temperature=0, frequency_penalty=2.0,
                                                           presence_penalty=2.0))[0]
    assert len(set(penalised)) > len(set(plain))             # repeats are pushed away


@pytest.mark.parametrize("field, value", [("max_tokens", 0), ("max_tokens", -1), ("temperature", -0.5),
                                          ("top_p", 0.0), ("top_p", 1.5), ("n", 0), ("logprobs", 21),
                                          ("presence_penalty", 3.0), ("stop", [""])])
def test_bad_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}="):
        SamplingParams(**{field: value})


def test_bad_requests_are_refused_and_the_others_keep_going():
    model = build("llama-tiny", vocab_size=128, max_seq_len=64)
    engine = Engine(model, block_size=4, num_blocks=24)
    good = prompts([5])[0]
    rid = engine.add_request(good, GREEDY)
    engine.step()
    held = engine.kv_blocks_in_use
    with pytest.raises(ValueError, match="context is 64"):
        engine.add_request(list(range(64)), GREEDY)
    with pytest.raises(ValueError, match=r"adapter='nope'"):
        engine.add_request(good, GREEDY, adapter="nope")
    with pytest.raises(KVBudgetError, match=r"SamplingParams\.n=9"):
        engine.add_request(good, SamplingParams(max_tokens=30, n=9))
    with pytest.raises(ValueError, match="token id 500"):
        engine.add_request([1, 500], GREEDY)
    with pytest.raises(ValueError, match="stop strings need"):
        engine.add_request(good, SamplingParams(stop="x"))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request(good, GREEDY, request_id=rid)
    assert engine.kv_blocks_in_use == held and len(engine.requests) == 1
    assert list(engine.stream(rid)) == reference(model, good, 12)


def test_engine_refuses_models_it_cannot_run():
    with pytest.raises(ValueError, match="decoder-only causal LM"):
        Engine(llmkit.build_model(llmkit.get_preset("bert-tiny"), task="masked_lm"))
    with pytest.raises(ValueError, match="max_num_seqs=0"):
        Engine(build("llama-tiny"), max_num_seqs=0)


def test_a_fixed_kv_budget_holds_more_sequences_than_contiguous_caches():
    """128 KV slots: contiguous per-request caches at the 64-token maximum would hold 2 sequences;
    paged blocks of 4 hold every request's real tokens (5 + 8), so 8 run at once."""
    model = build("llama-tiny", vocab_size=128, max_seq_len=64)
    engine = Engine(model, block_size=4, num_blocks=32)
    contiguous = engine.pool.num_blocks * engine.pool.block_size // engine.max_model_len
    out = engine.generate(prompts([5] * 8, seed=3), SamplingParams(max_tokens=8, temperature=0))
    assert contiguous == 2 and engine.stats["max_running"] == 8 and all(len(o) == 8 for o in out)
    assert engine.kv_blocks_in_use == 0


def test_batched_warping_equals_each_rows_own_warping():
    from llmkit.infer.sampler import warped_probs, warped_probs_rows
    z = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    ps = [SamplingParams(temperature=t, top_k=k, top_p=p)
          for t, k, p in [(1.0, None, 1.0), (0.7, 5, 1.0), (1.3, None, 0.8), (0.5, 3, 0.5), (1.0, 50, 0.999)]]
    rows = warped_probs_rows(z, torch.tensor([p.temperature for p in ps]), torch.tensor([p.top_k or 50 for p in ps]),
                             torch.tensor([p.top_p for p in ps]))
    for i, p in enumerate(ps):
        torch.testing.assert_close(rows[i], warped_probs(z[i], p), atol=1e-7, rtol=0)
    assert [int((r > 0).sum()) for r in rows] == [50, 5, 29, 2, 50]


def test_a_request_that_fails_in_the_engine_fails_alone_and_metrics_count_it():
    tok = llmkit.tokenizer.train_char(texts=["abcdefgh xyz"])
    torch.manual_seed(0)
    model = llmkit.build_model(llmkit.get_preset("llama-tiny", vocab_size=tok.vocab_size)).eval()

    class Fragile:                               # a detokenizer that breaks on one request's text
        def decode(self, ids):
            if ids and ids[0] == poison:
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad byte")
            return tok.decode(ids)
    good = tok.encode("abc")
    clean = Engine(model, tokenizer=tok).generate([good], GREEDY)[0]
    engine = Engine(model, tokenizer=Fragile())
    first = Engine(model).generate([tok.encode("xyz")], SamplingParams(max_tokens=1, temperature=0))[0][0]
    poison = first
    bad_id = engine.add_request(tok.encode("xyz"), GREEDY)
    good_id = engine.add_request(good, GREEDY)
    while engine.has_unfinished():
        engine.step()
    bad, ok = engine.output(bad_id).outputs[0], engine.output(good_id).outputs[0]
    assert bad.finish_reason == "error" and "UnicodeDecodeError" in bad.error and len(bad.token_ids) == 1
    assert ok.token_ids == clean and ok.finish_reason == "length"
    m = engine.metrics()
    assert m["errors"] == 1 and m["running"] == m["waiting"] == m["kv_blocks_in_use"] == 0
    assert m["generated_tokens"] == 1 + len(clean)
