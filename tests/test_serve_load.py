"""`llmkit serve` under load and faults, on loopback: 64 concurrent streaming clients all complete and
well-formed; disconnected clients leave KV usage at baseline; a full queue answers 429 at once; a
request that raises inside the engine fails alone; a whole failed step fails its requests only."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from llmkit.jobs.artifacts import load_artifacts
from serve_util import KEY, astream_events, auth, engine_answer, make_checkpoint, running_server, wait_until

PROMPTS = ["the cat ", "a dog ", "xyz ", "on a mat", "0123", "far. ", "tac tac", "sat on "]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = make_checkpoint(tmp_path_factory.mktemp("serve_load") / "model")
    with running_server(folder, api_key=KEY, served_model_name="tiny", max_num_seqs=16) as (url, state):
        yield folder, url, state


async def _stream_one(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> dict:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    return {"prompt": prompt, "events": await astream_events(client, "/v1/completions", body)}


def test_64_concurrent_streaming_clients_all_complete_and_well_formed(served):
    folder, url, state = served
    tok = load_artifacts(folder).tokenizer
    want = {p: engine_answer(folder, tok.encode(p, add_special_tokens=False), max_tokens=24, temperature=0).text
            for p in PROMPTS}

    async def main():
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=url, headers=auth(), timeout=60, limits=limits) as client:
            return await asyncio.wait_for(asyncio.gather(
                *[_stream_one(client, PROMPTS[i % len(PROMPTS)], 24) for i in range(64)]), timeout=120)

    start = time.perf_counter()
    results = asyncio.run(main())
    assert len(results) == 64                                          # no request lost
    for r in results:
        events = r["events"]
        assert events[-1] == "[DONE]", "a stream ended without [DONE]"
        chunks = events[:-1]
        assert len({c["id"] for c in chunks}) == 1
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
        text = "".join(c["choices"][0]["text"] for c in chunks[:-1])
        assert text == want[r["prompt"]]                               # batching does not change greedy text
        assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert time.perf_counter() - start < 120
    wait_until(lambda: state.bridge.engine.kv_blocks_in_use == 0 and state.bridge.pending == 0, what="idle")
    assert state.bridge.engine.metrics()["running"] == 0


def test_disconnected_clients_free_their_kv_blocks(served, monkeypatch):
    folder, url, state = served
    engine = state.bridge.engine
    assert engine.kv_blocks_in_use == 0
    original = engine._run

    def slow_run(*args, **kw):                 # >= 4 s for 200 tokens: only a cancel frees the blocks in time
        time.sleep(0.02)
        return original(*args, **kw)

    monkeypatch.setattr(engine, "_run", slow_run)

    async def leave_early(client, i):
        body = {"model": "tiny", "prompt": PROMPTS[i % 8], "max_tokens": 200, "stream": True, "ignore_eos": True}
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            seen = 0
            async for line in resp.aiter_lines():
                seen += line.startswith("data: ")
                if seen >= 3:
                    return True                                        # closes the connection mid-stream
        return False

    async def main():
        async with httpx.AsyncClient(base_url=url, headers=auth(), timeout=60) as client:
            return await asyncio.gather(*[leave_early(client, i) for i in range(12)])

    assert all(asyncio.run(main()))
    wait_until(lambda: engine.kv_blocks_in_use == 0 and state.bridge.pending == 0, timeout=2,
               what="the disconnected streams' KV blocks to be freed")
    assert state.bridge.finished["abort"] >= 12
    # a non-streamed request whose client gives up (read timeout) is cancelled too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", headers=auth(), timeout=httpx.Timeout(60, read=0.3),
                   json={"model": "tiny", "prompt": "a", "max_tokens": 250 - 1, "ignore_eos": True})
    wait_until(lambda: engine.kv_blocks_in_use == 0 and state.bridge.pending == 0, timeout=2,
               what="the abandoned request to be cancelled")


def test_a_full_queue_answers_429_at_once(served):
    folder, url, state = served
    bridge = state.bridge
    bridge.max_pending = 2
    try:
        async def main():
            async with httpx.AsyncClient(base_url=url, headers=auth(), timeout=60) as client:
                body = {"model": "tiny", "prompt": "a", "max_tokens": 200, "stream": True, "ignore_eos": True}
                long = [client.stream("POST", "/v1/completions", json=body) for _ in range(2)]
                responses = [await cm.__aenter__() for cm in long]
                assert all(r.status_code == 200 for r in responses)
                start = time.perf_counter()
                third = await client.post("/v1/completions", json={"model": "tiny", "prompt": "b", "max_tokens": 2})
                waited = time.perf_counter() - start
                for cm in long:
                    await cm.__aexit__(None, None, None)
                return third, waited

        third, waited = asyncio.run(main())
        assert third.status_code == 429 and third.headers["x-should-retry"] == "true"
        assert third.json()["error"]["type"] == "rate_limit_error" and "max_pending=2" in third.json()["error"]["message"]
        assert waited < 5                                                # refused, not queued behind the others
        wait_until(lambda: bridge.pending == 0, timeout=20, what="the long requests to be cancelled")
        api = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        assert api.completions.create(model="tiny", prompt="b", max_tokens=2).choices  # capacity is back
    finally:
        bridge.max_pending = 128


def test_a_request_that_raises_in_the_engine_fails_alone(served, monkeypatch):
    folder, url, state = served
    engine = state.bridge.engine
    original = engine._append

    def faulty(seq, token, entry):                  # seed 666 marks the request whose post-processing breaks
        if seq.params.seed == 666 and len(seq.output) >= 2:
            raise RuntimeError("detokenizer exploded")
        return original(seq, token, entry)

    monkeypatch.setattr(engine, "_append", faulty)
    api = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)

    async def main():
        aapi = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)

        async def good(i):
            r = await aapi.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=12, temperature=0, seed=i)
            return r.choices[0].finish_reason

        async def bad():
            try:
                await aapi.completions.create(model="tiny", prompt="a", max_tokens=12, temperature=0, seed=666)
            except openai.InternalServerError as exc:
                return exc
            return None

        return await asyncio.gather(bad(), *[good(i) for i in range(4)])

    failure, *reasons = asyncio.run(main())
    assert isinstance(failure, openai.InternalServerError) and "detokenizer exploded" in failure.message
    assert "Traceback" not in failure.message
    assert all(r in ("stop", "length") for r in reasons)
    # streamed, the failure is an error chunk after the text so far
    with pytest.raises(openai.APIError, match="detokenizer exploded"):
        for _ in api.completions.create(model="tiny", prompt="a", max_tokens=12, temperature=0, seed=666, stream=True):
            pass
    assert api.completions.create(model="tiny", prompt="a", max_tokens=4).choices     # still serving
    wait_until(lambda: engine.kv_blocks_in_use == 0, what="blocks freed")


def test_a_failed_step_fails_its_requests_and_the_server_goes_on(served, monkeypatch):
    folder, url, state = served
    engine = state.bridge.engine
    original, calls = engine._run, {"n": 0}

    def run_once_broken(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated device fault")
        return original(*args, **kw)

    monkeypatch.setattr(engine, "_run", run_once_broken)
    r = httpx.post(url + "/v1/completions", headers=auth(), timeout=60, json={"model": "tiny", "prompt": "a",
                                                                               "max_tokens": 4})
    assert r.status_code == 500 and "simulated device fault" in r.json()["error"]["message"]
    assert "Traceback" not in r.text
    assert state.bridge.step_failures >= 1
    ok = httpx.post(url + "/v1/completions", headers=auth(), timeout=60, json={"model": "tiny", "prompt": "a",
                                                                                "max_tokens": 4})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] is not None
    wait_until(lambda: engine.kv_blocks_in_use == 0, what="blocks freed")
    metrics = httpx.get(url + "/metrics").text
    assert "llmkit_engine_step_failures_total 1" in metrics


def test_llmkit_bench_serve_against_llmkit_serve(served, tmp_path, monkeypatch, capsys):
    from llmkit.cli import main
    folder, url, state = served
    monkeypatch.setenv("LLMKIT_NO_PROGRESS", "1")
    out, prompts = tmp_path / "bench.json", tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))   # short: the context is 256
    assert main(["bench", "serve", f"url={url}", "num_requests=16", "concurrency=8", "max_tokens=8",
                 f"api_key={KEY}", f"output={out}", "warmup=1", f"prompts={prompts}"]) == 0
    printed = capsys.readouterr().out
    assert "TTFT" in printed
    result = json.loads(out.read_text())
    summary = result["summary"] if "summary" in result else result
    assert summary["completed"] == 16 and summary["failed"] == 0
    assert all(r["output_tokens"] == 8 for r in result["requests"])     # ignore_eos honoured: exactly max_tokens
    assert main(["bench", "serve", "url=http://127.0.0.1:9", "num_requests=1"]) == 2
    assert "127.0.0.1:9" in capsys.readouterr().err
