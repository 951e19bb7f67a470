"""`llmkit serve model=DIR [adapters=name=DIR,...] [host=127.0.0.1 port=8000 api_key=...]`.

Loads the checkpoint (any folder `llmkit generate` reads: HF or llmkit weights with their tokenizer),
builds the engine (one served name per LoRA adapter, batched with the base model by `LoraBank`), and
runs uvicorn. It binds 127.0.0.1 unless told otherwise: a model server on every interface, with no
key, is an open door. `port=0` takes a free port; the line "llmkit serve: listening on URL" says which.

Shutdown: the first SIGTERM or Ctrl-C stops accepting connections and new requests (503); requests
in flight finish, and those still running after `grace` seconds end with an error (their streams get
an error chunk and `data: [DONE]`); then the process exits with status 0. A second Ctrl-C quits at once.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..recipes import RecipeError

log = logging.getLogger("llmkit.serve")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ServeRecipe:
    model: str = "runs/demo/align/model"   # a checkpoint folder with its tokenizer
    adapters: Optional[str] = None       # LoRA adapters served as their own model names: name=DIR,name=DIR
    served_model_name: Optional[str] = None  # the base model's name in the API (default: model as given)
    host: str = "127.0.0.1"
    port: int = 8000                     # 0: any free port (printed)
    api_key: Optional[str] = None        # require 'Authorization: Bearer KEY' on /v1 (or env LLMKIT_API_KEY)
    chat_template: Optional[str] = None  # a Jinja file used instead of the tokenizer's chat template
    max_num_seqs: int = 32               # engine: sequences decoded together
    max_num_batched_tokens: int = 512    # engine: tokens per step (prefill chunks + decodes)
    max_model_len: Optional[int] = None  # context length (default: the model's)
    kv_tokens: Optional[int] = None      # KV cache size in tokens (default: the engine's)
    max_pending: int = 128               # requests in flight before new ones get 429
    grace: float = 30.0                  # seconds in-flight requests get to finish after SIGTERM
    dtype: str = "float32"               # float32 | bfloat16 | float16 (weights and KV cache)
    seed: int = 0
    log_level: str = "warning"           # uvicorn's: critical | error | warning | info | debug

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_pending"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: expected an integer >= 1")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port!r}: expected an integer in [0, 65535]")
        if not isinstance(self.grace, (int, float)) or isinstance(self.grace, bool) or self.grace < 0:
            raise ValueError(f"grace={self.grace!r}: expected seconds >= 0")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: expected one of {list(DTYPES)}")
        if self.chat_template is not None and not Path(self.chat_template).is_file():
            raise ValueError(f"chat_template={self.chat_template!r}: file not found (expected a Jinja template)")
        if self.log_level not in ("critical", "error", "warning", "info", "debug"):
            raise ValueError(f"log_level={self.log_level!r}: expected critical | error | warning | info | debug")
        self.adapter_dirs()                      # raises on a malformed list

    def adapter_dirs(self) -> dict[str, str]:
        if not self.adapters:
            return {}
        out = {}
        for item in str(self.adapters).split(","):
            name, sep, folder = item.strip().partition("=")
            if not sep or not name or not folder:
                raise ValueError(f"adapters={self.adapters!r}: item {item!r}: expected name=DIR")
            if name in out or name == self.name:
                raise ValueError(f"adapters={self.adapters!r}: name {name!r} is used twice: expected unique names")
            if not (Path(folder) / "adapter_config.json").is_file():
                raise ValueError(f"adapters={self.adapters!r}: {folder!r} has no adapter_config.json (expected a "
                                 "LoRA adapter folder: what handle.save or peft's save_pretrained writes)")
            out[name] = folder
        return out

    @property
    def name(self) -> str:
        return self.served_model_name or self.model


def build_state(job: ServeRecipe):
    """The model, engine, bridge and ServerState of a recipe (the bridge not started)."""
    import torch

    from ..infer import Engine
    from ..jobs.artifacts import load_artifacts
    from .app import ServerState
    from .bridge import EngineBridge
    artifacts = load_artifacts(job.model)
    model = artifacts.model.to(getattr(torch, job.dtype)).eval()
    adapters = job.adapter_dirs()
    kw = {}
    if job.kv_tokens is not None:
        kw["num_blocks"] = -(-job.kv_tokens // 16)
    try:
        engine = Engine(model, tokenizer=artifacts.tokenizer, max_num_seqs=job.max_num_seqs,
                        max_num_batched_tokens=job.max_num_batched_tokens, max_model_len=job.max_model_len,
                        seed=job.seed, adapters=adapters or None, **kw)
    except ValueError as exc:               # an encoder, a prefix-tuning adapter, a non-LoRA adapter
        raise RecipeError(f"model={job.model!r}: {exc}") from exc
    template = Path(job.chat_template).read_text(encoding="utf-8") if job.chat_template else None
    api_key = job.api_key or os.environ.get("LLMKIT_API_KEY") or None
    return ServerState(EngineBridge(engine, max_pending=job.max_pending), artifacts.tokenizer, job.name,
                       list(adapters), api_key=api_key, chat_template=template)


def _server_class():
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn's Server with llmkit's shutdown: the first signal drains the engine (bridge.drain)
        as well as stopping new connections; uvicorn then waits for the open responses, which end
        within `grace`. Signals are not re-raised afterwards, so the exit status is 0."""

        def __init__(self, config, bridge, grace: float):
            super().__init__(config)
            self.bridge, self.grace = bridge, grace

        def handle_exit(self, sig, frame) -> None:
            if self.should_exit:
                if sig == signal.SIGINT:
                    self.force_exit = True
                return
            print(f"llmkit serve: {signal.Signals(sig).name}: finishing {self.bridge.pending} requests "
                  f"(grace {self.grace:g}s)", file=sys.stderr, flush=True)
            self.bridge.drain(self.grace)
            self.should_exit = True

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                print(f"llmkit serve: listening on http://{host}:{port}", flush=True)

    return GracefulServer


def make_server(state, host: str, port: int, grace: float, log_level: str = "warning"):
    import uvicorn

    from .app import create_app
    config = uvicorn.Config(create_app(state), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=grace + 5, lifespan="on")
    return _server_class()(config, state.bridge, grace)


def run_serve(job: ServeRecipe) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    start = time.perf_counter()
    state = build_state(job)
    print(f"llmkit serve: {state.model_name} ({state.max_model_len} tokens of context"
          f"{', adapters ' + ', '.join(state.adapters) if state.adapters else ''}) loaded in "
          f"{time.perf_counter() - start:.1f}s", flush=True)
    server = make_server(state, job.host, job.port, job.grace, job.log_level)
    # uvicorn on a second thread, the engine on this one (bridge.py says why); signals reach the
    # main thread only, so the handlers are installed here and hand the signal to uvicorn
    http = threading.Thread(target=server.run, name="llmkit-http", daemon=True)
    previous = {sig: signal.signal(sig, server.handle_exit) for sig in (signal.SIGTERM, signal.SIGINT)}
    state.bridge.keep_going = http.is_alive
    http.start()
    try:
        state.bridge.run()                 # until the server's shutdown stops it (or the server thread died)
    finally:
        server.should_exit = True
        http.join(job.grace + 30)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise RecipeError(f"host={job.host!r} port={job.port}: the server could not start (the line above says "
                          "why, e.g. the port is in use)")
    print("llmkit serve: stopped", flush=True)
