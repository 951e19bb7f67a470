"""Slow engine checks: Engine(compile=True) (a lone sequence's decode steps through torch.compile)
gives the eager engine's greedy tokens, alone and beside other requests."""
from __future__ import annotations

import copy

import pytest

from llmkit.infer import Engine, SamplingParams
from test_infer_engine import build, prompts


@pytest.mark.slow
def test_compiled_engine_equals_eager():
    model = build("llama-tiny", vocab_size=128)
    ps = prompts([5, 23, 9])
    params = SamplingParams(max_tokens=10, temperature=0)
    eager = Engine(model, max_num_batched_tokens=16).generate(ps, params)
    compiled_model = copy.deepcopy(model)
    compiled = Engine(compiled_model, compile=True, max_num_batched_tokens=16)
    assert compiled.generate(ps, params) == eager
    alone = Engine(model).generate(ps[:1], SamplingParams(max_tokens=24, temperature=0))   # batch 1: compiled steps
    assert compiled.generate(ps[:1], SamplingParams(max_tokens=24, temperature=0)) == alone
    assert set(compiled_model.state_dict()) == set(model.state_dict())      # the model itself untouched
