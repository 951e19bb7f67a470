"""SIGTERM during load, on a real `llmkit serve` process: with a grace period the in-flight streams
finish; without one they end with an error chunk and `data: [DONE]`; either way the process exits
with status 0 and refuses new work meanwhile."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys

import httpx
import pytest

from serve_util import astream_events, make_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve_sigterm") / "model")


def _start(checkpoint, grace: float):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "llmkit.cli", "serve", f"model={checkpoint}", "port=0",
                             f"grace={grace}", "served_model_name=tiny"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:
        found = re.search(r"listening on (http://\S+)", line)
        if found:
            return proc, found.group(1)
    proc.kill()
    raise AssertionError(f"the server did not start: {proc.stderr.read()[-2000:]}")


async def _load_then_sigterm(url: str, proc, clients: int = 6) -> list[list]:
    started = [asyncio.Event() for _ in range(clients)]

    async def one(client, i):
        body = {"model": "tiny", "prompt": "the cat ", "max_tokens": 200, "stream": True, "ignore_eos": True,
                "seed": i}
        return await astream_events(client, "/v1/completions", body, on_event=started[i].set)

    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        tasks = [asyncio.create_task(one(client, i)) for i in range(clients)]
        await asyncio.wait_for(asyncio.gather(*[e.wait() for e in started]), 60)
        proc.send_signal(signal.SIGTERM)                  # every client is mid-stream
        return await asyncio.wait_for(asyncio.gather(*tasks), 60)


@pytest.mark.parametrize("grace", [30.0, 0.0])
def test_sigterm_during_load_finishes_or_errors_each_stream_and_exits_0(checkpoint, grace):
    proc, url = _start(checkpoint, grace)
    try:
        results = asyncio.run(_load_then_sigterm(url, proc))
        rc = proc.wait(timeout=grace + 30)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = proc.stderr.read()
    assert rc == 0, stderr[-2000:]
    assert "SIGTERM" in stderr
    for events in results:
        assert events[-1] == "[DONE]"
        last = events[-2]
        if grace:                                          # the grace period lets every stream finish
            assert last["choices"][0]["finish_reason"] == "length"
            assert sum(len(e["choices"][0]["text"]) > 0 for e in events[:-1]) >= 1
        else:                                              # none: each ends with an error chunk
            assert "shutting down" in last["error"]["message"]
    with pytest.raises(httpx.ConnectError):                # and nothing listens any more
        httpx.get(url + "/health", timeout=5)
