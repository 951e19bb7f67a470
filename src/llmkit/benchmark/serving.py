"""`llmkit bench serve`: load-test any OpenAI-compatible server over HTTP, in the manner of vLLM's
benchmark_serving.

    llmkit bench serve url=http://127.0.0.1:8000 num_requests=64 concurrency=8 max_tokens=64

A pure client: it speaks HTTP only (httpx, asyncio) and imports nothing of llmkit's engine or server,
so it measures llmkit serve, transformers serve, vLLM or llama.cpp's server alike. Every request
streams (`"stream": true`, `"stream_options": {"include_usage": true}`); the SSE `data:` lines are
read until `data: [DONE]`. Requests arrive on a schedule (all at once, or a seeded Poisson process at
`request_rate`) and at most `concurrency` are in flight; a request that arrives while all slots are
taken waits, and its clock starts when it is sent.

Per request:
    TTFT  send -> the first chunk with text (a chunk carrying only the role does not count)
    ITL   the gaps between consecutive chunks with text
    E2E   send -> `data: [DONE]`
    TPOT  (E2E - TTFT) / (output tokens - 1), for requests of 2 tokens or more
    output tokens: the final usage chunk's completion_tokens; without one, max_tokens when the
          finish_reason is "length" (the request ran to its limit), else the number of chunks with
          text (a server may send two tokens in one chunk, or hold one back; usage is the exact count)
A request fails, with its message kept, on an HTTP status other than 200, an `error` object in the
stream (or a choice finishing with "error"), a stream that ends before `[DONE]` (with
require_done=false: before a finish_reason; transformers serve 5.x never sends `[DONE]`), a transport
error, or running past `timeout`; failures are counted, never raised. Over the run: completed, failed,
duration (the first arrival to the last answer), requests/s, output tokens/s, total (prompt +
output) tokens/s, and mean / median / p90 / p99 of TTFT, TPOT, ITL and E2E in milliseconds.

A bad recipe value is a ValueError (RecipeError) naming the field; a server that cannot be reached,
or whose warm-up request fails, is a BenchServeError naming the URL. Proxies from the environment are
not used (a proxy in the path would be measured too).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..recipes import RecipeError
from .prompts import Prompt, as_messages, as_text, load_prompts
from .stats import arrival_offsets, summarize

ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
ARRIVALS = ("poisson", "burst")


class BenchServeError(RuntimeError):
    """The server cannot be benchmarked: unreachable, no model to name, or its warm-up request failed.
    The message names the URL."""


@dataclass
class BenchServeRecipe:
    url: str = "http://127.0.0.1:8000"    # the server's base URL ("/v1" at the end is dropped)
    model: Optional[str] = None           # the served model's name; None: the first id of GET {url}/v1/models
    endpoint: str = "chat"                # "chat": /v1/chat/completions; "completions": /v1/completions
    num_requests: int = 64                # requests timed (after the warm-up)
    concurrency: int = 8                  # the most requests in flight at once
    request_rate: float = float("inf")    # arrivals per second; inf: all at once, paced by concurrency alone
    arrival: str = "poisson"              # "poisson": exponential gaps at request_rate (seeded); "burst": all at 0
    prompts: Optional[str] = None         # a JSONL file ("prompt" / "messages" / "turns"); None: MT-Bench questions
    max_tokens: int = 64                  # new tokens asked of every request
    temperature: float = 0.0              # 0: greedy
    ignore_eos: bool = True               # send "ignore_eos": true (run to max_tokens); false: leave the field out
    extra_body: Optional[dict] = None     # more fields merged into every request body (a server's own options)
    require_done: bool = True             # a stream must end on `data: [DONE]`; false: a finish_reason will do
    warmup: int = 1                       # untimed requests sent one at a time first; a failed one stops the run
    seed: int = 0                         # the Poisson schedule's seed; with temperature > 0 request i sends seed + i
    api_key: Optional[str] = None         # "Authorization: Bearer KEY"; None: $OPENAI_API_KEY when set
    timeout: float = 600.0                # seconds a request may take, end to end, before it counts as failed
    output: Optional[str] = None          # a JSON file for the summary and every request's record
    label: Optional[str] = None           # the run's name in the table and the JSON; None: "MODEL @ URL"

    def __post_init__(self):
        def bad(name: str, expected: str):
            raise RecipeError(f"{name}={getattr(self, name)!r}: expected {expected}")

        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)

        if not isinstance(self.url, str) or not self.url.startswith(("http://", "https://")):
            bad("url", "an http:// or https:// URL, e.g. http://127.0.0.1:8000")
        self.url = self.url.rstrip("/")
        if self.url.endswith("/v1"):               # the OpenAI client's base_url convention
            self.url = self.url[:-3]
        if self.model is not None and (not isinstance(self.model, str) or not self.model):
            bad("model", "a served model's name, or null to ask GET /v1/models")
        if self.endpoint not in ENDPOINTS:
            bad("endpoint", f"one of {list(ENDPOINTS)}")
        for name in ("num_requests", "concurrency", "max_tokens"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                bad(name, "an integer >= 1")
        if not is_int(self.warmup) or self.warmup < 0:
            bad("warmup", "an integer >= 0")
        if not is_int(self.seed):
            bad("seed", "an integer")
        if not is_number(self.request_rate) or self.request_rate <= 0:
            bad("request_rate", "requests per second > 0, or inf (all at once)")
        self.request_rate = float(self.request_rate)
        if self.arrival not in ARRIVALS:
            bad("arrival", f"one of {list(ARRIVALS)}")
        if not is_number(self.temperature) or not 0 <= self.temperature < math.inf:
            bad("temperature", "a number >= 0")
        self.temperature = float(self.temperature)
        for name in ("ignore_eos", "require_done"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "true or false")
        if self.extra_body is not None and not (isinstance(self.extra_body, dict)
                                                and all(isinstance(k, str) for k in self.extra_body)):
            bad("extra_body", "a mapping of request fields, e.g. {top_p: 0.9}")
        if not is_number(self.timeout) or not 0 < self.timeout < math.inf:
            bad("timeout", "seconds > 0")
        self.timeout = float(self.timeout)
        if self.prompts is not None and (not isinstance(self.prompts, (str, os.PathLike))
                                         or not Path(self.prompts).is_file()):
            bad("prompts", "an existing JSONL file, or null for the built-in prompts")
        for name in ("api_key", "output", "label"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                bad(name, "a string or null")


@dataclass
class RequestRecord:
    """One request's measurements; times in seconds (converted to ms in the JSON)."""
    index: int = -1
    success: bool = False
    error: Optional[str] = None
    start: float = 0.0                    # when it was sent, after the run's start
    ttft: Optional[float] = None
    e2e: Optional[float] = None
    itl: list = field(default_factory=list)
    chunks: int = 0                       # chunks with text
    usage_tokens: Optional[int] = None    # completion_tokens of the usage chunk
    prompt_tokens: Optional[int] = None   # prompt_tokens of the usage chunk
    finish_reason: Optional[str] = None
    max_tokens: Optional[int] = None      # what the request asked for

    @property
    def output_tokens(self) -> int:
        if self.usage_tokens is not None:
            return self.usage_tokens
        if self.finish_reason == "length" and self.max_tokens is not None:
            return self.max_tokens
        return self.chunks

    @property
    def tpot(self) -> Optional[float]:
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def as_json(self) -> dict:
        ms = lambda s: None if s is None else 1000.0 * s                         # noqa: E731
        return {"index": self.index, "success": self.success, "error": self.error,
                "start_ms": ms(self.start), "ttft_ms": ms(self.ttft), "tpot_ms": ms(self.tpot),
                "e2e_ms": ms(self.e2e), "output_tokens": self.output_tokens, "prompt_tokens": self.prompt_tokens,
                "chunks": self.chunks, "finish_reason": self.finish_reason, "itl_ms": [ms(g) for g in self.itl]}


def request_body(job: BenchServeRecipe, model: str, prompt: Prompt, index: int) -> dict:
    body: dict[str, Any] = {"model": model}
    if job.endpoint == "chat":
        body["messages"] = as_messages(prompt)
    else:
        body["prompt"] = as_text(prompt)
    body.update({"max_tokens": job.max_tokens, "temperature": job.temperature, "stream": True,
                 "stream_options": {"include_usage": True}})
    if job.temperature > 0:
        body["seed"] = job.seed + max(index, 0)
    if job.ignore_eos:
        body["ignore_eos"] = True
    body.update(job.extra_body or {})
    return body


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _error_text(error: Any) -> str:
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    return error if isinstance(error, str) else json.dumps(error)


async def send_request(client, url: str, body: dict, chat: bool, timeout: float,
                       require_done: bool = True) -> RequestRecord:
    """POST one streaming request and read its SSE stream; never raises for the server's faults."""
    import httpx
    record = RequestRecord(max_tokens=body.get("max_tokens"))
    sent = time.perf_counter()

    async def stream() -> None:
        last, done, finished = sent, False, False
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode("utf-8", errors="replace")
                record.error = f"HTTP {response.status_code}: {text.strip()[:500]}"
                return
            async for line in response.aiter_lines():
                now = time.perf_counter()
                line = line.strip()
                if not line.startswith("data:"):           # blank separators, ": comments", event: / id:
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                try:
                    chunk = json.loads(data)
                except json.JSONDecodeError:
                    record.error = f"not JSON in the stream: {data[:200]!r}"
                    return
                if not isinstance(chunk, dict):
                    record.error = f"expected a JSON object in the stream, found {data[:200]!r}"
                    return
                if chunk.get("error") is not None:
                    record.error = f"error in the stream: {_error_text(chunk['error'])}"
                    return
                usage = chunk.get("usage")
                if isinstance(usage, dict):
                    if _is_count(usage.get("completion_tokens")):
                        record.usage_tokens = usage["completion_tokens"]
                    if _is_count(usage.get("prompt_tokens")):
                        record.prompt_tokens = usage["prompt_tokens"]
                choices = chunk.get("choices")
                for choice in choices if isinstance(choices, list) else ():
                    if not isinstance(choice, dict):
                        continue
                    if choice.get("finish_reason") == "error":
                        record.error = f"finish_reason 'error': {json.dumps(choice)[:300]}"
                        return
                    if choice.get("finish_reason") is not None:
                        finished, record.finish_reason = True, choice["finish_reason"]
                    if chat:
                        delta = choice.get("delta")
                        delta = delta if isinstance(delta, dict) else {}
                        text = delta.get("content") or delta.get("reasoning_content")
                    else:
                        text = choice.get("text")
                    if text and isinstance(text, str):
                        if record.ttft is None:
                            record.ttft = now - sent
                        else:
                            record.itl.append(now - last)
                        last = now
                        record.chunks += 1
            record.e2e = time.perf_counter() - sent
            if require_done and not done:
                record.error = ("the stream ended without 'data: [DONE]' (for a server that never sends it: "
                                "require_done=false)")
                return
            if not done and not finished:
                record.error = "the stream ended before a finish_reason (and without 'data: [DONE]')"
                return
            record.success = True

    try:
        await asyncio.wait_for(stream(), timeout)
    except asyncio.TimeoutError:
        record.error = f"timed out after {timeout:g} s"
    except (httpx.HTTPError, httpx.StreamError, OSError, ValueError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
        record.success = False
    if not record.success:
        record.e2e = None
    return record


async def served_model(client, job: BenchServeRecipe) -> str:
    """job.model, or the first model GET {url}/v1/models lists; checks the server is there either way."""
    import httpx
    url = f"{job.url}/v1/models"
    try:
        response = await client.get(url, timeout=min(job.timeout, 30.0))
    except httpx.HTTPError as exc:
        raise BenchServeError(f"cannot reach the server at url={job.url!r} (GET {url}: {type(exc).__name__}: "
                              f"{exc}); is it running?") from exc
    if job.model is not None:
        return job.model
    try:
        models = response.json()["data"] if response.status_code == 200 else None
        first = models[0]["id"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise BenchServeError(f"GET {url} answered HTTP {response.status_code} "
                              f"{response.text.strip()[:300]!r}, not a list of models; set model= to the "
                              "served model's name") from None
    return str(first)


def summarize_run(records: list[RequestRecord], duration: float) -> dict:
    done = [r for r in records if r.success]
    out_tokens = sum(r.output_tokens for r in done)
    prompt_known = all(r.prompt_tokens is not None for r in done)
    prompt_tokens = sum(r.prompt_tokens for r in done) if done and prompt_known else None
    per_second = lambda x: None if x is None or duration <= 0 else x / duration     # noqa: E731
    return {"completed": len(done), "failed": len(records) - len(done), "duration_s": duration,
            "request_throughput": per_second(len(done)), "output_throughput": per_second(out_tokens),
            "total_token_throughput": per_second(None if prompt_tokens is None else prompt_tokens + out_tokens),
            "total_output_tokens": out_tokens, "total_prompt_tokens": prompt_tokens,
            "mean_output_tokens": out_tokens / len(done) if done else None,
            "ttft_ms": summarize([r.ttft for r in done if r.ttft is not None]),
            "tpot_ms": summarize([r.tpot for r in done if r.tpot is not None]),
            "itl_ms": summarize([g for r in done for g in r.itl]),
            "e2e_ms": summarize([r.e2e for r in done]),
            "errors": sorted({r.error for r in records if r.error})[:5]}


def markdown_table(result: dict) -> str:
    num = lambda v, f=".2f": "-" if v is None else format(v, f)                      # noqa: E731
    rate, arrival = result["request_rate"], result["arrival"]
    arrivals = "all at once" if arrival == "burst" or math.isinf(rate) else f"{arrival} at {rate:g}/s"
    lines = [f"## bench serve: {result['label']}", "",
             f"{result['num_requests']} requests to {result['url']}{ENDPOINTS[result['endpoint']]}, "
             f"concurrency {result['concurrency']}, arrivals {arrivals}, max_tokens {result['max_tokens']}.", "",
             "| | value |", "|---|---|",
             f"| completed / failed | {result['completed']} / {result['failed']} |",
             f"| duration (s) | {num(result['duration_s'])} |",
             f"| request throughput (req/s) | {num(result['request_throughput'])} |",
             f"| output token throughput (tok/s) | {num(result['output_throughput'], '.1f')} |",
             f"| total token throughput (tok/s) | {num(result['total_token_throughput'], '.1f')} |",
             f"| output tokens per request (mean) | {num(result['mean_output_tokens'], '.1f')} |", "",
             "| latency (ms) | mean | median | p90 | p99 |", "|---|---|---|---|---|"]
    for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E")):
        s = result[key]
        lines.append(f"| {name} | " + " | ".join(num(s[k]) for k in ("mean", "median", "p90", "p99")) + " |")
    if result["errors"]:
        lines += ["", "Errors (first distinct ones): " + "; ".join(f"`{e[:200]}`" for e in result["errors"])]
    return "\n".join(lines) + "\n"


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)                      # request_rate=inf -> "inf" (JSON has no infinity)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


async def run_bench_serve_async(job: BenchServeRecipe) -> dict:
    """`run_bench_serve` for a caller already inside an event loop."""
    import httpx
    from tqdm import tqdm

    prompts = load_prompts(job.prompts)
    api_key = job.api_key if job.api_key is not None else os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url, chat = job.url + ENDPOINTS[job.endpoint], job.endpoint == "chat"
    limits = httpx.Limits(max_connections=job.concurrency + 1, max_keepalive_connections=job.concurrency + 1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(job.timeout), limits=limits, headers=headers,
                                 trust_env=False) as client:
        model = await served_model(client, job)
        for _ in range(job.warmup):
            record = await send_request(client, url, request_body(job, model, prompts[0], -1), chat, job.timeout,
                                        job.require_done)
            if not record.success:
                raise BenchServeError(f"the warm-up request to {url} (model {model!r}) failed: {record.error}")

        offsets = arrival_offsets(job.num_requests, job.request_rate, job.arrival, job.seed)
        slots = asyncio.Semaphore(job.concurrency)
        quiet = os.environ.get("LLMKIT_NO_PROGRESS", "0") not in ("", "0")
        bar = tqdm(total=job.num_requests, desc="bench serve", unit="req", file=sys.stderr, disable=quiet)
        start = time.perf_counter()

        async def one(index: int) -> RequestRecord:
            async with slots:
                sent = time.perf_counter() - start
                body = request_body(job, model, prompts[index % len(prompts)], index)
                record = await send_request(client, url, body, chat, job.timeout, job.require_done)
            record.index, record.start = index, sent
            bar.update(1)
            return record

        tasks = []
        for index, offset in enumerate(offsets):
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(index)))
        try:
            records = list(await asyncio.gather(*tasks))
        finally:
            bar.close()
        duration = time.perf_counter() - start

    settings = {k: v for k, v in dataclasses.asdict(job).items() if k != "api_key"}
    result = {**settings, "label": job.label or f"{model} @ {job.url}", "model": model,
              **summarize_run(records, duration)}
    print(markdown_table(result), flush=True)
    result["requests"] = [r.as_json() for r in records]
    if job.output:
        path = Path(job.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_json_safe(result), indent=1) + "\n", encoding="utf-8")
    return result


def run_bench_serve(job: BenchServeRecipe) -> dict:
    """Run the benchmark `job` describes; print its markdown table, write `job.output`, return the results:
    the recipe's settings (no api_key), the run's summary (see the module doc) and "requests", one record
    per request (times in ms)."""
    return asyncio.run(run_bench_serve_async(job))
