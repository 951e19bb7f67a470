"""`llmkit bench serve` (llmkit.benchmark): the client against a fake OpenAI-compatible SSE server whose
chunks come at known times, the percentile and arrival arithmetic by hand, and the recipe's checks.

The fake server is a plain asyncio HTTP/1.1 server (chunked responses, keep-alive) on a thread of its
own. What it answers depends on the prompt's text:
    "ok"            a role chunk at once, then CHUNKS content chunks, the first after FIRST s and the
                    others GAP s apart, a finish chunk, a usage chunk (TOKENS completion tokens), [DONE]
    "nousage"       the same without the usage chunk ("nousage-stop": and finish_reason "stop")
    "http500"       a 500
    "errorchunk"    one content chunk, then an error object
    "nodone"        all of "ok" but the [DONE]; "cut": the content chunks alone
    "slow"          waits 5 s before anything
"""
from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time

import numpy as np
import pytest

from llmkit.benchmark import (BenchServeError, BenchServeRecipe, arrival_offsets, percentile, run_bench_serve,
                              summarize)
from llmkit.benchmark.prompts import load_prompts
from llmkit.recipes import RecipeError, apply_overrides, build

FIRST, GAP, CHUNKS = 0.05, 0.02, 5
TOKENS = 2 * CHUNKS - 1   # the usage chunk's count: a chunk may carry several tokens (a server that fell behind)


class FakeServer:
    def __init__(self):
        self.bodies, self.in_flight, self.max_in_flight = [], 0, 0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(10)
        self.url = f"http://127.0.0.1:{self.port}"

    def _serve(self, ready):
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._connection, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()
        server.close()
        tasks = asyncio.all_tasks(self.loop)
        for task in tasks:
            task.cancel()
        self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self.loop.close()

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    async def _connection(self, reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, v in (l.split(":", 1) for l in lines[1:] if ":" in l)}
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                await self._answer(method, path, json.loads(body) if body else None, writer)
        except (asyncio.IncompleteReadError, asyncio.CancelledError, ConnectionError):
            pass
        finally:
            writer.close()

    @staticmethod
    def _head(status: int, kind: str) -> bytes:
        return (f"HTTP/1.1 {status} X\r\ncontent-type: {kind}\r\ntransfer-encoding: chunked\r\n\r\n").encode()

    @staticmethod
    def _chunk(data: bytes) -> bytes:
        return f"{len(data):x}\r\n".encode() + data + b"\r\n"

    async def _answer(self, method, path, body, writer):
        if method == "GET" and path == "/v1/models":
            writer.write(self._head(200, "application/json") +
                         self._chunk(json.dumps({"object": "list", "data": [{"id": "fake-model"}]}).encode()) +
                         b"0\r\n\r\n")
            return await writer.drain()
        self.bodies.append(body)
        chat = path == "/v1/chat/completions"
        mode = body["messages"][-1]["content"] if chat else body["prompt"]
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await self._stream(mode, chat, writer)
        finally:
            self.in_flight -= 1

    async def _stream(self, mode, chat, writer):
        def event(obj) -> bytes:
            return self._chunk(b"data: " + json.dumps(obj).encode() + b"\n\n")

        def choice(text=None, role=None, finish=None):
            if chat:
                delta = {k: v for k, v in (("role", role), ("content", text)) if v is not None}
                return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta,
                                                                        "finish_reason": finish}]}
            return {"object": "text_completion", "choices": [{"index": 0, "text": text or "",
                                                              "finish_reason": finish}]}

        if mode == "http500":
            writer.write(self._head(500, "application/json") + self._chunk(b'{"error": "kaput"}') + b"0\r\n\r\n")
            return await writer.drain()
        if mode == "slow":
            await asyncio.sleep(5)
        writer.write(self._head(200, "text/event-stream") + (event(choice(role="assistant")) if chat else b""))
        await writer.drain()
        for i in range(CHUNKS):
            await asyncio.sleep(FIRST if i == 0 else GAP)
            writer.write(event(choice(text=f" tok{i}")))
            await writer.drain()
            if mode == "errorchunk":
                writer.write(event({"error": {"message": "boom", "type": "server_error"}}) + b"0\r\n\r\n")
                return await writer.drain()
        if mode == "cut":
            writer.write(b"0\r\n\r\n")
            return await writer.drain()
        writer.write(event(choice(finish="stop" if mode == "nousage-stop" else "length")))
        if not mode.startswith("nousage"):
            writer.write(event({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": TOKENS,
                                                         "total_tokens": 7 + TOKENS}}))
        if mode != "nodone":
            writer.write(self._chunk(b"data: [DONE]\n\n"))
        writer.write(b"0\r\n\r\n")
        await writer.drain()


@pytest.fixture(scope="module")
def server():
    fake = FakeServer()
    yield fake
    fake.stop()


@pytest.fixture(autouse=True)
def _no_bar(monkeypatch):
    monkeypatch.setenv("LLMKIT_NO_PROGRESS", "1")


def prompts_file(tmp_path, modes) -> str:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": m}) + "\n" for m in modes))
    return str(path)


def near(value_ms, expected_s, slack_ms=40.0):
    """At least the server's delay (less a millisecond of timer granularity), and not much more (a loaded
    machine adds to it, never takes away)."""
    return expected_s * 1000 - 2.0 <= value_ms <= expected_s * 1000 + slack_ms


# ---- measurements against known delays ----------------------------------------------------------

@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_latencies_and_tokens_match_the_servers_delays(server, tmp_path, endpoint, capsys):
    out = tmp_path / "result.json"
    result = run_bench_serve(BenchServeRecipe(url=server.url, endpoint=endpoint, num_requests=4, concurrency=2,
                                              prompts=prompts_file(tmp_path, ["ok"]), output=out, label="fake"))
    assert (result["completed"], result["failed"]) == (4, 0)
    assert result["model"] == "fake-model"                                  # from GET /v1/models
    e2e = FIRST + (CHUNKS - 1) * GAP
    for r in result["requests"]:
        assert r["success"] and r["output_tokens"] == TOKENS and r["prompt_tokens"] == 7 and r["chunks"] == CHUNKS
        assert near(r["ttft_ms"], FIRST), r                                 # the role chunk does not count
        # a gap alone can come out short (its first chunk read late), but the last chunk never arrives
        # before the server sent it
        assert len(r["itl_ms"]) == CHUNKS - 1 and all(g >= 0 for g in r["itl_ms"]), r
        assert near(r["ttft_ms"] + sum(r["itl_ms"]), e2e, 60) and r["e2e_ms"] >= r["ttft_ms"] + sum(r["itl_ms"])
        assert near(r["e2e_ms"], e2e, 60), r
        assert r["tpot_ms"] == pytest.approx((r["e2e_ms"] - r["ttft_ms"]) / (TOKENS - 1))
    assert near(result["ttft_ms"]["median"], FIRST) and near(result["itl_ms"]["median"], GAP, 20)
    assert near(result["tpot_ms"]["median"], (CHUNKS - 1) * GAP / (TOKENS - 1), 10)   # 80 ms over 8 tokens
    assert result["total_output_tokens"] == 4 * TOKENS and result["total_prompt_tokens"] == 4 * 7
    # 4 requests, 2 at a time: two rounds of one request's e2e each
    assert 2 * e2e <= result["duration_s"] <= 2 * e2e + 0.5
    assert result["request_throughput"] == pytest.approx(4 / result["duration_s"])
    assert result["output_throughput"] == pytest.approx(4 * TOKENS / result["duration_s"])
    assert result["total_token_throughput"] == pytest.approx(4 * (TOKENS + 7) / result["duration_s"])
    saved = json.loads(out.read_text())
    assert saved["completed"] == 4 and len(saved["requests"]) == 4 and saved["request_rate"] == "inf"
    assert "api_key" not in saved
    table = capsys.readouterr().out
    assert "## bench serve: fake" in table and "| TTFT |" in table and "| completed / failed | 4 / 0 |" in table


def test_output_tokens_without_usage(server, tmp_path):
    """No usage chunk: finish_reason "length" means max_tokens were made; otherwise the chunks are counted."""
    result = run_bench_serve(BenchServeRecipe(url=server.url, num_requests=2, warmup=0, max_tokens=TOKENS,
                                              prompts=prompts_file(tmp_path, ["nousage", "nousage-stop"])))
    assert result["completed"] == 2
    length, stop = sorted(result["requests"], key=lambda r: r["index"])
    assert (length["finish_reason"], length["output_tokens"], length["chunks"]) == ("length", TOKENS, CHUNKS)
    assert (stop["finish_reason"], stop["output_tokens"], stop["chunks"]) == ("stop", CHUNKS, CHUNKS)
    assert length["prompt_tokens"] is None and result["total_token_throughput"] is None
    assert result["total_output_tokens"] == TOKENS + CHUNKS


def test_the_request_body(server, tmp_path):
    server.bodies.clear()
    run_bench_serve(BenchServeRecipe(url=server.url + "/v1/", model="m", num_requests=2, max_tokens=5, warmup=0,
                                     temperature=0.5, seed=10, extra_body={"top_p": 0.9},
                                     prompts=prompts_file(tmp_path, ["ok"])))
    assert [b["seed"] for b in server.bodies] == [10, 11]
    body = server.bodies[0]
    assert body["model"] == "m" and body["messages"] == [{"role": "user", "content": "ok"}]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 5 and body["ignore_eos"] is True and body["top_p"] == 0.9
    server.bodies.clear()
    run_bench_serve(BenchServeRecipe(url=server.url, num_requests=1, ignore_eos=False, warmup=0,
                                     prompts=prompts_file(tmp_path, ["ok"])))
    assert "ignore_eos" not in server.bodies[0] and "seed" not in server.bodies[0]


def test_concurrency_bounds_requests_in_flight(server, tmp_path):
    server.max_in_flight = 0
    result = run_bench_serve(BenchServeRecipe(url=server.url, num_requests=6, concurrency=3, warmup=0,
                                              prompts=prompts_file(tmp_path, ["ok"])))
    assert server.max_in_flight == 3 and result["completed"] == 6
    starts = sorted(r["start_ms"] for r in result["requests"])
    e2e_ms = 1000 * (FIRST + (CHUNKS - 1) * GAP)
    assert max(starts[:3]) < 30 and min(starts[3:]) >= e2e_ms - 2        # the second three wait for slots


# ---- failures are counted, not raised ---------------------------------------------------------

def test_failed_requests_are_counted_with_their_messages(server, tmp_path):
    modes = ["ok", "http500", "errorchunk", "nodone"]
    result = run_bench_serve(BenchServeRecipe(url=server.url, num_requests=8, concurrency=4, warmup=0,
                                              prompts=prompts_file(tmp_path, modes)))
    assert (result["completed"], result["failed"]) == (2, 6)
    by_mode = {modes[r["index"] % 4]: r for r in result["requests"]}
    assert by_mode["ok"]["success"] and by_mode["ok"]["error"] is None
    assert by_mode["http500"]["error"].startswith("HTTP 500") and "kaput" in by_mode["http500"]["error"]
    assert by_mode["errorchunk"]["error"] == "error in the stream: boom"
    assert "[DONE]" in by_mode["nodone"]["error"]
    assert not any(by_mode[m]["success"] for m in ("http500", "errorchunk", "nodone"))
    assert result["total_output_tokens"] == 2 * TOKENS                    # successes only
    assert len(result["errors"]) == 3


def test_require_done_false_accepts_a_finish_reason_without_done(server, tmp_path):
    result = run_bench_serve(BenchServeRecipe(url=server.url, num_requests=2, warmup=0, require_done=False,
                                              prompts=prompts_file(tmp_path, ["nodone", "cut"])))
    first, second = sorted(result["requests"], key=lambda r: r["index"])
    assert first["success"] and first["output_tokens"] == TOKENS
    assert not second["success"] and "before a finish_reason" in second["error"]
    result = run_bench_serve(BenchServeRecipe(url=server.url, num_requests=1, warmup=0,
                                              prompts=prompts_file(tmp_path, ["cut"])))
    assert "without 'data: [DONE]'" in result["requests"][0]["error"]


def test_a_request_past_the_timeout_fails(server, tmp_path):
    result = run_bench_serve(BenchServeRecipe(url=server.url, num_requests=1, warmup=0, timeout=0.3,
                                              prompts=prompts_file(tmp_path, ["slow"])))
    assert result["failed"] == 1 and "timed out" in result["requests"][0]["error"]


def test_a_failing_warmup_stops_the_run_naming_the_url(server, tmp_path):
    with pytest.raises(BenchServeError, match=r"warm-up request to http://127\.0\.0\.1:\d+/v1/chat.*HTTP 500"):
        run_bench_serve(BenchServeRecipe(url=server.url, num_requests=1, prompts=prompts_file(tmp_path, ["http500"])))


def test_an_unreachable_server_is_an_error_naming_the_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]                                         # free: nothing listens there
    with pytest.raises(BenchServeError, match=rf"cannot reach the server at url='http://127.0.0.1:{port}'"):
        run_bench_serve(BenchServeRecipe(url=f"http://127.0.0.1:{port}", num_requests=1))


# ---- the arithmetic -----------------------------------------------------------------------------

def test_percentile_against_a_hand_computation():
    values = [10, 1, 9, 2, 8, 3, 7, 4, 6, 5]                # sorted: 1..10; rank (n-1) q/100 from 0
    assert percentile(values, 50) == pytest.approx(5.5)     # rank 4.5: between 5 and 6
    assert percentile(values, 90) == pytest.approx(9.1)     # rank 8.1: 9 + 0.1 * (10 - 9)
    assert percentile(values, 99) == pytest.approx(9.91)    # rank 8.91
    assert percentile(values, 0) == 1 and percentile(values, 100) == 10
    assert percentile([3.0], 99) == 3.0 and percentile([], 50) is None
    with pytest.raises(ValueError, match="q=101"):
        percentile(values, 101)
    s = summarize([0.001, 0.002, 0.003, 0.010])             # seconds in, ms out
    assert s["mean"] == pytest.approx(4.0) and s["median"] == pytest.approx(2.5)
    assert s["p90"] == pytest.approx(3 + 0.7 * 7) and s["p99"] == pytest.approx(3 + 0.97 * 7)
    assert summarize([]) == {"mean": None, "median": None, "p90": None, "p99": None}


def test_poisson_arrivals_have_the_rate_and_the_seed():
    offsets = arrival_offsets(20001, 4.0, "poisson", seed=3)
    gaps = np.diff(offsets)
    assert offsets[0] == 0.0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)                  # mean gap 1 / rate
    assert gaps.std() == pytest.approx(0.25, rel=0.05)                   # exponential: std = mean
    assert arrival_offsets(50, 4.0, "poisson", seed=3) == offsets[:50]   # the same seed, the same schedule
    assert arrival_offsets(50, 4.0, "poisson", seed=4) != offsets[:50]
    assert arrival_offsets(5, math.inf, "poisson", 0) == [0.0] * 5
    assert arrival_offsets(5, 4.0, "burst", 0) == [0.0] * 5


def test_poisson_arrivals_pace_the_run(server, tmp_path):
    result = run_bench_serve(BenchServeRecipe(url=server.url, num_requests=5, concurrency=5, warmup=0,
                                              request_rate=20.0, seed=1, prompts=prompts_file(tmp_path, ["ok"])))
    offsets = arrival_offsets(5, 20.0, "poisson", seed=1)
    for r in result["requests"]:
        assert 1000 * offsets[r["index"]] - 2 <= r["start_ms"] <= 1000 * offsets[r["index"]] + 40


# ---- the recipe ---------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, expected", [
    ("url", "localhost:8000", "http://"), ("endpoint", "embeddings", "chat"), ("num_requests", 0, ">= 1"),
    ("concurrency", -2, ">= 1"), ("concurrency", 2.5, "integer"), ("max_tokens", True, "integer"),
    ("request_rate", 0, "> 0"), ("request_rate", float("nan"), "> 0"), ("arrival", "uniform", "poisson"),
    ("temperature", -1.0, ">= 0"), ("ignore_eos", "yes", "true or false"), ("require_done", 1, "true or false"),
    ("timeout", 0, "> 0"),
    ("warmup", -1, ">= 0"), ("prompts", "/no/such/file.jsonl", "JSONL"), ("model", "", "name"),
    ("extra_body", [1], "mapping"),
])
def test_bad_recipe_values_name_the_field(field, value, expected):
    with pytest.raises(ValueError, match=rf"^{field}=.*expected.*{expected}"):
        BenchServeRecipe(**{field: value})


def test_the_recipe_builds_from_cli_overrides():
    words = ["url=http://10.0.0.1:9000/v1", "request_rate=inf", "concurrency=32", "model=null",
             "extra_body={top_p: 0.5}", "label=run one", "temperature=0", "timeout=30"]
    job = build(BenchServeRecipe, apply_overrides({}, words, BenchServeRecipe))
    assert job.url == "http://10.0.0.1:9000" and math.isinf(job.request_rate) and job.concurrency == 32
    assert job.model is None and job.extra_body == {"top_p": 0.5} and job.label == "run one"
    assert isinstance(job.temperature, float) and job.timeout == 30.0
    job = build(BenchServeRecipe, apply_overrides({}, ["request_rate=2.5", "endpoint=completions"], BenchServeRecipe))
    assert job.request_rate == 2.5 and job.endpoint == "completions"
    with pytest.raises(RecipeError, match="concurrency=0"):
        build(BenchServeRecipe, apply_overrides({}, ["concurrency=0"], BenchServeRecipe))
    with pytest.raises(RecipeError, match="unknown recipe key 'concurrncy'; did you mean 'concurrency'"):
        build(BenchServeRecipe, {"concurrncy": 3})


def test_prompts(tmp_path, monkeypatch, shared_data):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"messages": [{"role": "user", "content": "b"}]}\n{"turns": ["c", "d"]}\n')
    assert load_prompts(str(path)) == ["a", [{"role": "user", "content": "b"}], "c"]
    path.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match=r"line 2: expected 'prompt'"):
        load_prompts(str(path))
    builtin = load_prompts(None)                                          # MT-Bench's first turns
    assert len(builtin) == 80 and builtin[0].startswith("Compose an engaging travel blog post")
    monkeypatch.setenv("LLMKIT_SHARED_DATA", str(tmp_path / "nothing"))
    assert len(load_prompts(None)) >= 1                                   # the synthetic fallback


def test_the_client_imports_no_engine_or_server():
    import ast
    from pathlib import Path
    import llmkit.benchmark
    for path in Path(llmkit.benchmark.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.startswith(("llmkit.infer", "llmkit.serve", "infer", "serve", "torch"))
                           for n in names), (path, names)
