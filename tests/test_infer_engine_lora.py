"""Multi-LoRA in the engine (issue 16): requests naming different LoRA adapters, or none, share each
forward and each gets exactly its own adapter's greedy tokens; the adapter is part of the prefix-cache
hash, so equal prompts under different adapters never share blocks."""
from __future__ import annotations

import copy

import pytest

import llmkit.peft as lpeft
from llmkit.infer import Engine, SamplingParams
from test_infer_engine import build, prompts, reference
from test_infer_multi_lora import _perturb


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine_lora")
    base = build("llama-tiny", vocab_size=128)
    refs, dirs = {}, {}
    for seed, (name, targets) in enumerate({"a": ["q_proj", "v_proj"], "b": ["o_proj", "up_proj", "lm_head"]}.items()):
        model = copy.deepcopy(base)
        handle = lpeft.apply(model, "lora", r=4, alpha=8, targets=targets)
        _perturb(handle, seed)                           # non-zero B, so each adapter matters
        dirs[name] = handle.save(root / name)
        refs[name] = handle.merge_and_unload().eval()
    return base, refs, dirs


def test_rows_with_different_adapters_equal_each_adapter_alone(adapters):
    base, refs, dirs = adapters
    engine = Engine(copy.deepcopy(base), adapters=dirs, block_size=4, max_num_batched_tokens=16)
    ps = prompts([6, 11, 4, 9])
    names = ["a", None, "b", "a"]
    ids = [engine.add_request(p, SamplingParams(max_tokens=10, temperature=0), adapter=n) for p, n in zip(ps, names)]
    while engine.has_unfinished():
        engine.step()
    outs = [engine.output(i).outputs[0].token_ids for i in ids]
    for p, n, out in zip(ps, names, outs):
        assert out == reference(refs[n] if n else base, p, 10)
    assert len({tuple(reference(m, ps[0], 10)) for m in (base, refs["a"], refs["b"])}) == 3   # adapters matter


def test_adapter_is_in_the_prefix_cache_hash(adapters):
    base, refs, dirs = adapters
    engine = Engine(copy.deepcopy(base), adapters=dirs, block_size=4)
    p = prompts([13])[0]
    params = SamplingParams(max_tokens=5, temperature=0)
    first = engine.generate([p], params, adapters=["a"], return_outputs=True)[0]
    other = engine.generate([p], params, adapters=["b"], return_outputs=True)[0]
    same = engine.generate([p], params, adapters=["a"], return_outputs=True)[0]
    assert first.num_cached_tokens == 0 and other.num_cached_tokens == 0 and same.num_cached_tokens == 12
    assert other.outputs[0].token_ids == reference(refs["b"], p, 5)
    assert same.outputs[0].token_ids == first.outputs[0].token_ids == reference(refs["a"], p, 5)
    with pytest.raises(ValueError, match=r"adapter='c': expected None .* \['a', 'b'\]"):
        engine.add_request(p, params, adapter="c")
