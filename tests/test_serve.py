"""`llmkit serve` through the official `openai` client: models, completions and chat, streamed and
not, n, stop, logprobs, max_tokens=1, include_usage, the errors the client maps to its exception
classes, and greedy text equal to the engine's own output for the same prompt."""
from __future__ import annotations

import httpx
import openai
import pytest

from llmkit.jobs.artifacts import load_artifacts
from serve_util import KEY, auth, engine_answer, make_checkpoint, running_server, sse_events

PROMPT = "the cat "
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a dog"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = make_checkpoint(tmp_path_factory.mktemp("serve") / "model")
    with running_server(folder, api_key=KEY, served_model_name="tiny") as (url, state):
        yield folder, url, state


@pytest.fixture(scope="module")
def tok(served):
    return load_artifacts(served[0]).tokenizer


@pytest.fixture
def api(served):
    return openai.OpenAI(base_url=served[1] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_models_list_and_retrieve(api):
    assert [m.id for m in api.models.list().data] == ["tiny"]
    assert api.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError, match="served models"):
        api.models.retrieve("gpt-9")


def test_completion_greedy_equals_engine_streamed_and_not(api, served, tok):
    ids = tok.encode(PROMPT, add_special_tokens=False)
    want = engine_answer(served[0], ids, max_tokens=20, temperature=0)
    r = api.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0)
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(want.token_ids)
    chunks = list(api.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].choices[0].finish_reason == want.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    # the same prompt as token ids gives the same text
    r = api.completions.create(model="tiny", prompt=ids, max_tokens=20, temperature=0)
    assert r.choices[0].text == want.text


def test_chat_greedy_equals_engine_on_the_template(api, served, tok):
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    want = engine_answer(served[0], ids, max_tokens=24, temperature=0)
    r = api.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == len(ids)
    chunks = list(api.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=24,
                                              temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert chunks[-1].usage.total_tokens == len(ids) + len(want.token_ids)
    assert chunks[-2].choices[0].finish_reason == want.finish_reason
    assert len({c.id for c in chunks}) == 1
    # content as text parts and the developer role read as the string / system forms
    parts = [{"role": "developer", "content": [{"type": "text", "text": "be"}, {"type": "text", "text": "brief"}]},
             {"role": "user", "content": "a dog"}]
    r2 = api.chat.completions.create(model="tiny", messages=parts, max_tokens=24, temperature=0)
    joined = [{"role": "system", "content": "be\nbrief"}, {"role": "user", "content": "a dog"}]
    assert r2.usage.prompt_tokens == len(tok.apply_chat_template(joined, add_generation_prompt=True, tokenize=True))


def test_sse_ends_with_done_and_one_id(served):
    url = served[1]
    with httpx.stream("POST", url + "/v1/chat/completions", headers=auth(), timeout=60,
                      json={"model": "tiny", "messages": MESSAGES, "max_tokens": 5, "stream": True}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp)
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    assert len({e["id"] for e in events[:-1]}) == 1


def test_n_seed_and_max_tokens_1(api):
    a = api.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, n=2, seed=5, temperature=1.0)
    b = api.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, n=2, seed=5, temperature=1.0)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]          # seeded: reproducible
    chat = api.chat.completions.create(model="tiny", messages=MESSAGES, n=2, max_tokens=6, seed=1)
    assert [c.index for c in chat.choices] == [0, 1]
    one = api.completions.create(model="tiny", prompt=PROMPT, max_tokens=1, extra_body={"ignore_eos": True})
    assert one.usage.completion_tokens == 1 and one.choices[0].finish_reason == "length"
    # a list of prompts: n choices each, indexed prompt-major
    many = api.completions.create(model="tiny", prompt=["a", "b c"], max_tokens=3, n=2, temperature=0)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text                        # greedy: the same twice


def test_stop_sequence_cut_the_same_streamed_and_not(api, served, tok):
    ids = tok.encode(PROMPT, add_special_tokens=False)
    full = engine_answer(served[0], ids, max_tokens=40, temperature=0, ignore_eos=True).text
    stop = full[6:8]
    assert len(stop) == 2
    want = full[:full.find(stop)]
    r = api.completions.create(model="tiny", prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop, "qq"],
                               extra_body={"ignore_eos": True})
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    chunks = list(api.completions.create(model="tiny", prompt=PROMPT, max_tokens=40, temperature=0, stop=stop,
                                         stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == want       # no piece of the stop string leaked


def test_logprobs_completions_and_chat(api, served, tok):
    ids = tok.encode(PROMPT, add_special_tokens=False)
    want = engine_answer(served[0], ids, max_tokens=6, temperature=0, logprobs=2, ignore_eos=True)
    r = api.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2,
                               extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([e["logprob"] for e in want.logprobs], abs=1e-5)
    assert len(lp.tokens) == 6 and all(len(t) == 2 for t in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and "".join(lp.tokens) == r.choices[0].text
    chat = api.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, logprobs=True, top_logprobs=3,
                                       extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(len(c.top_logprobs) == 3 for c in content)
    assert all(c.logprob <= 0 and c.top_logprobs[0].logprob >= c.top_logprobs[-1].logprob for c in content)
    chunks = list(api.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, logprobs=True,
                                              stream=True, extra_body={"ignore_eos": True}))
    assert sum(len(c.choices[0].logprobs.content) for c in chunks[1:]) == 5


def test_echo_prepends_the_prompt(api):
    plain = api.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0)
    echoed = api.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text


def test_errors_map_to_the_client_exceptions(api, served):
    with pytest.raises(openai.NotFoundError) as e:
        api.chat.completions.create(model="gpt-9", messages=MESSAGES)
    assert e.value.param == "model" and "tiny" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="tiny", messages=MESSAGES, temperature=7)
    assert e.value.param == "temperature" and "[0, 2]" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        api.completions.create(model="tiny", prompt=PROMPT, max_tokens=1000)
    assert e.value.param == "max_tokens" and "maximum context length is 256" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="tiny", messages=MESSAGES, response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    assert e.value.param == "response_format"
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "x"}])
    assert e.value.param == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as e:
        api.completions.create(model="tiny", prompt=[[1, 2, 99999]])
    assert e.value.param == "prompt"
    bad = openai.OpenAI(base_url=served[1] + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()                     # (a missing key: test_raw_error_bodies, the client insists on one)
    with pytest.raises(openai.UnprocessableEntityError):
        api.chat.completions.create(model="tiny", messages="not a list")


def test_raw_error_bodies(served):
    url = served[1]
    r = httpx.post(url + "/v1/chat/completions", headers=auth(), content=b"{not json")
    assert r.status_code == 422 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(url + "/v1/chat/completions", headers=auth(), json={"model": "tiny"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "messages"
    r = httpx.get(url + "/v1/nothing-here", headers=auth())
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.post(url + "/v1/completions", json={"prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert "Traceback" not in r.text


def test_health_and_metrics(api, served):
    api.completions.create(model="tiny", prompt=PROMPT, max_tokens=3)
    url = served[1]
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    text = httpx.get(url + "/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if not line.startswith("#")}
    assert values["llmkit_generation_tokens_total"] >= 3
    assert values["llmkit_num_requests_running"] == 0 and values["llmkit_kv_cache_usage_ratio"] == 0
    assert 'llmkit_request_success_total{finish_reason="length"}' in values or \
        'llmkit_request_success_total{finish_reason="stop"}' in values
