"""Slow engine checks: Engine(compile=True) (torch.compile of the token-wise sublayers) gives the
eager engine's greedy tokens, with prefill chunks and decodes mixed."""
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
    assert set(compiled_model.state_dict()) == set(model.state_dict())      # in place: keys unchanged
