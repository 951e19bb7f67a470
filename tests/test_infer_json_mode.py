"""JSON mode (infer/json_mode.py): the automaton accepts every prefix of valid JSON objects and
rejects invalid text where it goes wrong; any text it lets finish parses as a JSON object; on the
engine and through the server (response_format json_object), every finished sample is an object."""
from __future__ import annotations

import json
import random

import openai
import pytest
import torch

import llmkit
from llmkit.infer import Engine, SamplingParams
from llmkit.infer.json_mode import START, JsonObject, run, step
from llmkit.tokenizer import train_char
from serve_util import make_checkpoint, running_server

VALID = [
    {}, {"a": 1}, {"key": [1, -2.5, 3e10, -0.0, 1E-7, True, False, None, "x"]},
    {"nested": {"deep": {"deeper": [[], [{}], {"k": "v"}]}}, "é": "ünïcödé ✓", "q": "quote \" slash \\ \n\t"},
    {"n": 0, "m": 10.25, "u": "\u0001"},
]
INVALID = [                                   # (text, index of the first character that cannot be)
    ("[1]", 0), ('{"a" 1}', 5), ('{"a":01}', 6), ('{"a":tru}', 8), ('{"a":"\x01"}', 6), ("{,}", 1),
    ('{"a":1,}', 7), ("{} x", 3), ('{"a":-}', 6), ('{"a":1.}', 7), ('{"a":"\\x"}', 7), ("{'a':1}", 1),
    ('{"a":[1,]}', 8), ('{"a":1]', 6),
]
JSON_CHARS = '{}[]":, -.0123456789eEabcdefnlrstu\\'


@pytest.mark.parametrize("obj", VALID)
@pytest.mark.parametrize("indent", [None, 2])
def test_every_prefix_of_a_valid_object_is_accepted(obj, indent):
    text = json.dumps(obj, indent=indent, ensure_ascii=indent is None)
    state = START
    for i, c in enumerate(text):
        state = step(state, c)
        assert state is not None, f"rejected {text[:i + 1]!r}"
    assert state[1] == "done"


@pytest.mark.parametrize("text, bad_at", INVALID)
def test_invalid_text_is_rejected_where_it_goes_wrong(text, bad_at):
    assert run(text[:bad_at]) is not None
    assert run(text[:bad_at + 1]) is None


def test_whatever_the_automaton_lets_finish_parses_as_an_object():
    rng = random.Random(0)
    finished = 0
    for _ in range(300):
        state, text = START, ""
        for _ in range(400):
            options = [(c, s) for c in JSON_CHARS for s in [step(state, c)] if s is not None]
            if not options:
                break
            closing = [o for o in options if o[0] in '}]"']
            c, state = rng.choice(closing if closing and rng.random() < 0.3 else options)
            text += c
            if state[1] == "done":
                break
        assert options, f"a dead end at {text!r}: no character can follow"
        if state[1] == "done":
            finished += 1
            assert isinstance(json.loads(text), dict), text
    assert finished > 100


def _json_model(seed=0):
    tok = train_char(texts=[JSON_CHARS + " xyz"], special_tokens=("<pad>", "<|endoftext|>"), pad_token="<pad>")
    torch.manual_seed(seed)
    config = llmkit.get_preset("llama-tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id)
    return llmkit.build_model(config).eval(), tok


def test_engine_samples_are_json_objects():
    model, tok = _json_model()
    grammar = JsonObject(tok, [tok.eos_token_id], model.config.vocab_size)
    engine = Engine(model, tokenizer=tok)
    prompt = tok.encode("x", add_special_tokens=False)
    params = [SamplingParams(max_tokens=240, temperature=1.0, seed=s, allowed_tokens=grammar.constraint())
              for s in range(12)] + [SamplingParams(max_tokens=240, temperature=0, allowed_tokens=grammar.constraint())]
    outs = engine.generate([prompt] * len(params), params, return_outputs=True)
    stops = 0
    for out in outs:
        c = out.outputs[0]
        assert run(c.text) is not None                     # always a prefix of an object
        if c.finish_reason == "stop":
            stops += 1
            assert isinstance(json.loads(c.text), dict) and c.token_ids[-1] == tok.eos_token_id
    assert stops >= 3
    unconstrained = engine.generate([prompt] * 4, SamplingParams(max_tokens=40, temperature=1.0, seed=1))
    assert not all(run(tok.decode(ids)) is not None for ids in unconstrained)   # the mask is what does it


def test_server_response_format_json_object(tmp_path):
    folder = make_checkpoint(tmp_path / "model", text=JSON_CHARS)
    with running_server(folder, served_model_name="tiny") as (url, state):
        api = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        r = api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "json"}], n=8, seed=3,
                                        max_tokens=200, response_format={"type": "json_object"})
        done = [c for c in r.choices if c.finish_reason == "stop"]
        assert done and all(isinstance(json.loads(c.message.content), dict) for c in done)
        assert all(run(c.message.content) is not None for c in r.choices)
        with pytest.raises(openai.BadRequestError) as e:
            api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                        response_format={"type": "json_schema", "json_schema": {"name": "x"}})
        assert e.value.param == "response_format"
