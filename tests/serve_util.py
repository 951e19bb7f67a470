"""Helpers for the server tests: a tiny checkpoint with a chat template, an in-process server on a
free port (uvicorn in a thread), SSE reading and the engine's own answer to compare with."""
from __future__ import annotations

import contextlib
import json
import threading
import time

import httpx

import llmkit
from llmkit.infer import Engine
from llmkit.jobs.artifacts import load_artifacts
from llmkit.serve.job import ServeRecipe, build_state, make_server
from llmkit.tokenizer import train_char

TEXT = "the cat sat on a mat. a dog ran far. xyz tac 0123456789"
TEMPLATE = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}|{% endfor %}"
            "{% if add_generation_prompt %}a:{% endif %}")
KEY = "sk-test"


def make_checkpoint(folder, seed: int = 0, text: str = TEXT):
    """A random llama-tiny (256 tokens of context) with a character tokenizer (over `text`) and a chat
    template."""
    import torch
    tokenizer = train_char(texts=[text + ":|"], special_tokens=("<pad>", "<|endoftext|>"), pad_token="<pad>")
    tokenizer.chat_template = TEMPLATE
    torch.manual_seed(seed)
    config = llmkit.get_preset("llama-tiny", vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_token_id)
    llmkit.save_hf(llmkit.build_model(config), folder)
    tokenizer.save(folder)
    return folder


@contextlib.contextmanager
def running_server(folder, **recipe):
    """(base url, ServerState) of a server in this process; stopped (drained) on exit."""
    job = ServeRecipe(model=str(folder), port=0, **recipe)
    state = build_state(job)
    server = make_server(state, "127.0.0.1", 0, job.grace)
    state.bridge.start()                       # the engine on a background thread (`llmkit serve`: the main one)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", state
    finally:
        server.should_exit = True
        thread.join(30)


def engine_answer(folder, prompt_ids, **params):
    """The engine's own text for the prompt, on a fresh load of the same checkpoint."""
    from llmkit.infer import SamplingParams
    artifacts = load_artifacts(folder)
    engine = Engine(artifacts.model, tokenizer=artifacts.tokenizer)
    out = engine.generate([prompt_ids], SamplingParams(**params), return_outputs=True)[0]
    return out.outputs[0]


def sse_events(response) -> list:
    """The `data:` payloads of an SSE response (dicts, and the string "[DONE]")."""
    return [p for p in map(sse_payload, response.iter_lines()) if p is not None]


def sse_payload(line: str):
    """The payload of one SSE line (a dict, or "[DONE]"), None for other lines."""
    if not line.startswith("data: "):
        return None
    data = line[len("data: "):]
    return data if data == "[DONE]" else json.loads(data)


async def astream_events(client, path: str, body: dict, on_event=None) -> list:
    """POST `body` with an httpx.AsyncClient and collect the stream's payloads (200 asserted);
    `on_event()` runs after each."""
    events = []
    async with client.stream("POST", path, json=body) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            payload = sse_payload(line)
            if payload is not None:
                events.append(payload)
                if on_event is not None:
                    on_event()
    return events


def wait_until(condition, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def auth() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


def client(url: str, **kw) -> httpx.Client:
    return httpx.Client(base_url=url, headers=auth(), timeout=60, **kw)
