"""Serving benchmark: `llmkit bench serve` against `llmkit serve`, `transformers serve` and (with
--llama-cpp-python) llama.cpp's server, on the same weights, at 1, 8 and 32 concurrent clients.
Goals: output throughput at 32 clients >= 3x transformers'; median TTFT lower at every level.

Model: a random-init Llama made by transformers (`LlamaForCausalLM`, seed 0; d=384, 6 layers, 6 heads,
2 KV heads, d_ff 1024; --quick: d=192, 2 layers) with a byte-level BPE tokenizer (vocab 8192, trained
by `llmkit.tokenizer.train_bpe` on tinyshakespeare, ChatML chat template), saved as one Hugging Face
folder (`save_pretrained` + `Tokenizer.save`) that both llmkit and transformers load; fp32. The
script checks `llmkit.load_hf` gives transformers' logits. llama.cpp gets the same weights as an f32
GGUF carrying the same vocabulary, merges and chat template (benchmarks/gguf_llama.py; its tokens
were checked to match llmkit's). No EOS in the model's config, so a server that ignores
`ignore_eos` still runs every request to max_tokens; the tables give the output tokens actually
received per request, and throughput counts those.

Servers, each a subprocess on 127.0.0.1 started fresh for each repeat, torch (or llama.cpp) on
--threads threads (OMP_NUM_THREADS / MKL_NUM_THREADS, --n_threads), stopped with SIGTERM:
    llmkit            .venv/bin/llmkit serve model=DIR host=127.0.0.1 port=P max_num_seqs=32
    transformers-cb   .venv/bin/transformers serve DIR --continuous-batching --device cpu --dtype float32
    transformers      .venv/bin/transformers serve DIR --device cpu --dtype float32   (its default: one
                      `generate` at a time)
    llama.cpp         PYTHON -m llama_cpp.server --model X.gguf --n_threads T --interrupt_requests False
                      (llama-cpp-python's server: one request at a time; its default
                      interrupt_requests=True would cut a running stream short whenever another waits)
Load, per server and level (llmkit.benchmark.run_bench_serve, HTTP only): the 80 MT-Bench first turns
in order on /v1/chat/completions, streaming with usage, greedy, max_tokens fixed, all requests
arriving at once with at most C in flight, one untimed warm-up request first. transformers serve
rejects unknown fields (422), so it is sent no `ignore_eos`, and it ends its streams without
`data: [DONE]`, so its streams count as complete on a finish_reason (require_done=false).
Servers run in ABAB order over --repeats (the order reversed every other repeat); each cell is the
median over the repeats.

Run:  .venv/bin/python benchmarks/bench_serve.py --llama-cpp-python /work/venv-llama/bin/python
                                                     (writes benchmarks/results/serve.md)
      .venv/bin/python benchmarks/bench_serve.py --quick   (small model, few requests, 1 repeat;
                                                     writes /tmp/bench_serve_quick.md)
      --servers llmkit,transformers-cb   picks servers; --repeats N; --max-tokens N; --threads N
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine_info import machine_line  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RESULTS = ROOT / "benchmarks" / "results" / "serve.md"
QUICK_OUT = Path(tempfile.gettempdir()) / "bench_serve_quick.md"
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
LEVELS = (1, 8, 32)
BASELINES = ("transformers-cb", "transformers")


@dataclass
class Server:
    name: str
    command: list
    ready: str                                   # the GET path that answers 200 once it serves
    bench: dict = field(default_factory=dict)    # BenchServeRecipe fields this server needs
    env: dict = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model(out: Path, quick: bool) -> dict:
    """The HF folder all servers load (transformers' random Llama + an llmkit BPE with a chat template)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    import llmkit
    from llmkit.tokenizer import DEFAULT_CHAT_TEMPLATE, train_bpe
    tokenizer = train_bpe(SHAKESPEARE, vocab_size=8192, special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    torch.manual_seed(0)
    size = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=2) if quick else \
        dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.vocab_size, num_attention_heads=6, num_key_value_heads=2,
                                      max_position_embeddings=1024, bos_token_id=None, eos_token_id=None,
                                      pad_token_id=None, tie_word_embeddings=False, **size)).eval()
    hf.save_pretrained(out)
    tokenizer.save(out)
    ours = llmkit.load_hf(out).eval()
    ids = torch.randint(0, tokenizer.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids).logits).abs().max().item()
    assert diff < 1e-4, diff
    return {"ours": ours, "tokenizer": tokenizer, "diff": diff, "size": size,
            "params": sum(p.numel() for p in hf.parameters())}


def servers(names: list, model_dir: Path, gguf: Path | None, llama_python: str | None, threads: int,
            special_ids: list) -> list:
    transformers = [str(VENV_BIN / "transformers"), "serve", str(model_dir), "--host", "127.0.0.1",
                    "--device", "cpu", "--dtype", "float32", "--log-level", "warning"]
    # transformers serve: 422 on unknown fields (no ignore_eos), and no `data: [DONE]` at the end of a stream
    tf_bench = {"ignore_eos": False, "require_done": False}
    table = {
        "llmkit": Server("llmkit", [str(VENV_BIN / "llmkit"), "serve", f"model={model_dir}", "host=127.0.0.1",
                                    "port={port}", "max_num_seqs=32"], "/health"),
        "transformers-cb": Server("transformers-cb", transformers + ["--port", "{port}", "--continuous-batching"],
                                  "/v1/models", tf_bench),
        "transformers": Server("transformers", transformers + ["--port", "{port}"], "/v1/models", tf_bench),
    }
    if llama_python and gguf:
        table["llama.cpp"] = Server("llama.cpp", [llama_python, "-m", "llama_cpp.server", "--model", str(gguf),
                                                  "--host", "127.0.0.1", "--port", "{port}", "--n_ctx", "2048",
                                                  "--n_threads", str(threads), "--n_threads_batch", str(threads),
                                                  "--interrupt_requests", "False", "--verbose", "False"],
                                    "/v1/models",
                                    # no ignore_eos there (an unknown field is dropped): it would stop on the
                                    # special tokens it takes for end-of-generation; banned, it runs to max_tokens
                                    {"extra_body": {"logit_bias": {str(i): -100.0 for i in special_ids}}})
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"--servers: unknown or unavailable {unknown}; expected some of {list(table)} "
                         "(llama.cpp needs --llama-cpp-python)")
    return [table[n] for n in names]


def start(server: Server, log: Path, threads: int, timeout: float = 240.0):
    """Start `server` on a free port; (process, url) once its ready path answers 200, else an error text."""
    import httpx
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error", "LLMKIT_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false",
           **server.env}
    command = [part.replace("{port}", str(port)) for part in server.command]
    handle = open(log, "w")
    proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                            start_new_session=True)            # its own group: its workers go with it
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            handle.close()
            return None, f"exited with status {proc.returncode} before serving: {log.read_text()[-1500:]}"
        try:
            if httpx.get(url + server.ready, timeout=2.0, trust_env=False).status_code == 200:
                return (proc, handle), url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop((proc, handle))
    return None, f"not serving after {timeout:.0f} s: {log.read_text()[-1500:]}"


def stop(running, grace: float = 30.0) -> None:
    proc, handle = running
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)                     # what is left of the group it leads
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    handle.close()


def cell(result: dict) -> dict:
    """The numbers a table cell needs from one run_bench_serve result."""
    done = max(result["completed"], 1)
    return {"req_s": result["request_throughput"], "tok_s": result["output_throughput"],
            "ttft_p50": result["ttft_ms"]["median"], "ttft_p99": result["ttft_ms"]["p99"],
            "tpot_p50": result["tpot_ms"]["median"], "e2e_p50": result["e2e_ms"]["median"],
            "out_tokens": result["mean_output_tokens"],
            "prompt_tokens": None if result["total_prompt_tokens"] is None else result["total_prompt_tokens"] / done,
            "failed": result["failed"], "errors": result["errors"]}


def run_server(server: Server, levels: dict, max_tokens: int, threads: int, tmp: Path, tag: str) -> dict:
    from llmkit.benchmark import BenchServeRecipe, run_bench_serve
    running, url = start(server, tmp / f"{server.name}-{tag}.log", threads)
    if running is None:
        return {"error": url}
    try:
        out = {}
        for clients, n in levels.items():
            job = BenchServeRecipe(url=url, num_requests=n, concurrency=clients, max_tokens=max_tokens, warmup=1,
                                   timeout=300.0, label=f"{server.name}, {clients} clients", **server.bench)
            try:
                out[clients] = cell(run_bench_serve(job))
            except Exception as exc:                           # noqa: BLE001  (a failed warm-up: report it)
                out[clients] = {"error": f"{type(exc).__name__}: {exc}"}
        return out
    finally:
        stop(running)


def median_cells(runs: list) -> dict:
    """Each level's numbers: the median over the repeats that ran (failures summed, errors kept)."""
    if all("error" in r for r in runs):
        return {"error": runs[0]["error"]}
    runs = [r for r in runs if "error" not in r]
    out = {}
    for clients in runs[0]:
        cells = [r[clients] for r in runs if "error" not in r[clients]]
        if not cells:
            out[clients] = {"error": runs[0][clients]["error"]}
            continue
        merged = {}
        for key in cells[0]:
            values = [c[key] for c in cells if c[key] is not None]
            if key == "failed":
                merged[key] = sum(values)
            elif key == "errors":
                merged[key] = sorted({e for c in cells for e in c[key]})[:3]
            else:
                merged[key] = statistics.median(values) if values else None
        merged["runs"] = len(cells)
        out[clients] = merged
    return out


def clean(text: str, limit: int = 300) -> str:
    """An error message fit for a markdown table cell: one line, no pipes or backticks."""
    return " ".join(str(text).split()).replace("|", "/").replace("`", "'")[-limit:]


def fmt(value, spec=".1f") -> str:
    return "-" if value is None else format(value, spec)


def render(args, info: dict, order: list, results: dict, levels: dict, commands: dict, versions: dict) -> str:
    size = info["size"]
    lines = ["# Serving: `llmkit serve` vs `transformers serve` (and llama.cpp's server)\n",
             f"Machine: {machine_line()}, {args.threads} threads per server. Date: {datetime.date.today()}. "
             + ", ".join(f"{k} {v}" for k, v in versions.items()) + ". "
             f"Command: `.venv/bin/python benchmarks/bench_serve.py{' ' + ' '.join(args.argv) if args.argv else ''}`. "
             f"Median of {args.repeats} run(s) per cell; servers started fresh for each repeat, in ABAB order "
             f"({', '.join(order)}, then reversed). Load average (1 min) at the start {args.load[0]:.2f}, at the end "
             f"{args.load[1]:.2f}: other work on the machine slows torch's and llama.cpp's threads a lot, and "
             "unevenly (run on an idle machine).\n",
             f"Model: random-init Llama from transformers (d={size['hidden_size']}, "
             f"{size['num_hidden_layers']} layers, 6 heads, 2 KV heads, d_ff {size['intermediate_size']}, vocab 8192, "
             f"{info['params'] / 1e6:.1f}M parameters), "
             "byte-level BPE trained on tinyshakespeare with a ChatML template, one Hugging Face folder for llmkit "
             f"and transformers (llmkit.load_hf max |logit diff| {info['diff']:.1e}), an f32 GGUF with the same "
             "vocabulary for llama.cpp; fp32; no EOS in the config.\n",
             f"Load (`llmkit bench serve`, over HTTP): MT-Bench's 80 first turns in order, /v1/chat/completions, "
             f"streaming with usage, greedy, max_tokens {args.max_tokens}; all requests at once, at most C in flight; "
             + ", ".join(f"{n} requests at C={c}" for c, n in levels.items())
             + "; one untimed warm-up request per level. Output tokens/s counts the tokens received "
             "(usage, else chunks). TTFT: send to the first chunk with text; TPOT: (E2E − TTFT) / (tokens − 1).\n",
             "| server | command |", "|---|---|"]
    for name in results:
        lines.append(f"| {name} | `{commands[name]}` |")
    lines += ["", "transformers serve answers 422 to a request with a field it does not know, so it gets no "
              "`ignore_eos` (the model has no EOS: it runs to max_tokens anyway), and it ends its streams "
              "without `data: [DONE]` (its streams count as complete on a finish_reason). llama-cpp-python's "
              "server drops `ignore_eos` and stops on the tokens it takes for end-of-generation (`<|endoftext|>`, "
              "`<|im_end|>`), so its requests carry `logit_bias` -100 on the special tokens instead; it sends no "
              "usage chunk, so its output tokens are its chunks with text, and its prompt tokens are not known. "
              "Every server's output tokens per request are in the tables.\n"]
    for clients in levels:
        lines += [f"## {clients} concurrent client{'s' if clients > 1 else ''} ({levels[clients]} requests)\n",
                  "| server | req/s | output tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | E2E p50 ms "
                  "| output tokens / request | prompt tokens / request | failed |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, res in results.items():
            c = res.get(clients) if "error" not in res else res
            if c is None or "error" in c:
                lines.append(f"| {name} | not run: `{clean((c or res)['error'])}` |" + " |" * 8)
                continue
            lines.append(f"| {name} | {fmt(c['req_s'], '.2f')} | {fmt(c['tok_s'])} | {fmt(c['ttft_p50'])} | "
                         f"{fmt(c['ttft_p99'])} | {fmt(c['tpot_p50'], '.2f')} | {fmt(c['e2e_p50'])} | "
                         f"{fmt(c['out_tokens'])} | {fmt(c['prompt_tokens'])} | {c['failed']} |")
        errors = [f"{name}: `{clean(e, 200)}`" for name, res in results.items()
                  if "error" not in res and "error" not in res.get(clients, {}) for e in res[clients]["errors"]]
        if errors:
            lines.append("\nFailed requests' errors: " + "; ".join(errors[:4]))
        lines.append("")

    ours = results.get("llmkit", {})
    lines += ["## llmkit / each other server\n",
              "Throughput ratio: llmkit's output tok/s over the other's (> 1: llmkit faster). TTFT ratio: llmkit's "
              "p50 TTFT over the other's (< 1: llmkit answers first).\n",
              "| other server | " + " | ".join(f"throughput, {c} | TTFT, {c}" for c in levels) + " |",
              "|---|" + "---|---|" * len(levels)]
    ratios = {}
    for name, res in results.items():
        if name == "llmkit":
            continue
        row = []
        for clients in levels:
            a, b = ours.get(clients, {}), res.get(clients, {}) if "error" not in res else {}
            ok = "error" not in ours and "error" not in a and "error" not in b and a and b
            tput = a["tok_s"] / b["tok_s"] if ok and a["tok_s"] and b["tok_s"] else None
            ttft = a["ttft_p50"] / b["ttft_p50"] if ok and a["ttft_p50"] and b["ttft_p50"] else None
            ratios[name, clients] = (tput, ttft)
            row += [f"{fmt(tput, '.2f')}x" if tput else "-", f"{fmt(ttft, '.2f')}" if ttft else "-"]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    lines += ["", "## Goals\n"]
    for name in BASELINES:
        if name not in results:
            continue
        tput = ratios.get((name, 32), (None, None))[0] if 32 in levels else None
        ttfts = [ratios.get((name, c), (None, None))[1] for c in levels]
        goal1 = "not measured" if tput is None else f"**{'met' if tput >= 3 else 'missed'}** ({tput:.2f}x)"
        goal2 = "not measured" if any(t is None for t in ttfts) else \
            f"**{'met' if all(t < 1 for t in ttfts) else 'missed'}** (ratios " + \
            ", ".join(f"{t:.2f} at {c}" for t, c in zip(ttfts, levels)) + ")"
        lines += [f"- against {name}: throughput at 32 clients >= 3x: {goal1}; p50 TTFT lower at every level: {goal2}."]
    if args.quick:
        lines += ["", "_--quick: a smoke run (small model, few requests, short answers); not a measurement._"]
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--servers", default=None,
                        help="comma-separated, in order: llmkit,transformers-cb,transformers,llama.cpp")
    parser.add_argument("--llama-cpp-python", default=None, help="a python with llama-cpp-python[server] installed")
    parser.add_argument("--out", default=None, help="the markdown file (default: results/serve.md; --quick: /tmp)")
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    load_start = os.getloadavg()[0]
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.max_tokens = args.max_tokens or (16 if args.quick else 64)
    levels = dict(zip(LEVELS, (2, 8, 32) if args.quick else (8, 32, 64)))
    names = args.servers.split(",") if args.servers else \
        ["llmkit", "transformers-cb", "transformers"] + (["llama.cpp"] if args.llama_cpp_python else [])
    os.environ.setdefault("LLMKIT_NO_PROGRESS", "1")
    import torch
    import transformers
    torch.set_num_threads(args.threads)
    versions = {"transformers": transformers.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = tmp / "model"
        info = make_model(model_dir, args.quick)
        gguf = None
        if "llama.cpp" in names and args.llama_cpp_python:
            from gguf_llama import write_llama_gguf
            gguf = write_llama_gguf(info["ours"], tmp / "model-f32.gguf", tokenizer=info["tokenizer"])
            got = subprocess.run([args.llama_cpp_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                                 capture_output=True, text=True)
            versions["llama-cpp-python"] = got.stdout.strip() or "?"
        chosen = servers(names, model_dir, gguf, args.llama_cpp_python, args.threads,
                         sorted(info["tokenizer"].special_ids))
        commands = {s.name: " ".join(s.command).replace(str(tmp), "TMP") for s in chosen}
        runs = {s.name: [] for s in chosen}
        for r in range(args.repeats):
            for server in (chosen if r % 2 == 0 else chosen[::-1]):
                print(f"repeat {r + 1}/{args.repeats}: {server.name}", flush=True)
                got = run_server(server, levels, args.max_tokens, args.threads, tmp, f"r{r}")
                print(json.dumps({server.name: got}, default=str)[:2000], flush=True)
                runs[server.name].append(got)
        results = {name: median_cells(rs) for name, rs in runs.items()}
    args.load = (load_start, os.getloadavg()[0])
    text = render(args, info, [s.name for s in chosen], results, levels, commands, versions)
    out = Path(args.out) if args.out else (QUICK_OUT if args.quick else RESULTS)
    out.write_text(text)
    print(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
