"""Inference engine benchmark (issue 16): llmkit's Engine against transformers' `generate` on the same
weights, in one process, fp32, torch on --threads threads.

Model: a random-init Llama (d=384, 6 layers, 6 heads, 2 KV heads, d_ff 1024, vocab 8192, ~17M
parameters) made by transformers (`LlamaForCausalLM`, seed 0), saved with `save_pretrained` and read
by `llmkit.load_hf` (the real converter); the script checks both give the same logits. No EOS, so
every request makes exactly its max_tokens.

Sections (each repeated --repeats times in ABAB order; the median is reported):
1. batch-1 decode: one 32-token prompt, 128 new greedy tokens. transformers `generate`
   (use_cache), llmkit `generate()` (the padded-batch path), the Engine. Goal: Engine >= 1.5x
   transformers.
2. continuous vs static batching: 16 requests, prompt lengths and max_tokens drawn (seeded) from
   16..256, all arriving at once. Static = one left-padded `generate` of all 16 rows running to the
   longest max_tokens (transformers; llmkit's generate for reference); continuous = the Engine.
   Output tokens/s counts the requested tokens only. Goal: >= 3x transformers.
3. prefix caching: 8 requests in turn, each a shared 512-token system prompt + its own 16 tokens,
   8 new tokens each; time to first token (TTFT) with prefix caching on and off (requests 2-8).
4. speculative decoding: a target (GPT-2 layout, d=256, 6 layers) trained by `llmkit.pretrain` for
   --spec-steps steps on tinyshakespeare (characters), and a draft ~10x smaller (d=128, 2 layers)
   trained as long on the target's own samples (sequence-level distillation, generated on the
   engine); 4 prompts decoded one at a time, 256 greedy tokens each: plain, draft model (gamma 4),
   prompt lookup (gamma 4), and plain decoding with compile=True; the outputs must be identical;
   wall-clock speed-up, acceptance, tokens per target call against the geometric formula.
5. where the step time goes (engine.stats): scheduling, forward, sampling, for sections 1 and 2;
   and torch.compile of the token-wise sublayers (Engine(compile=True)), its compile time apart.
6. llama.cpp: with --llama-cpp-python PYTHON (an environment where llama-cpp-python is installed:
   it builds from source in ~17 min, so it lives in its own venv), the same weights as an f32 GGUF
   (benchmarks/gguf_llama.py, needs the `gguf` package here), batch-1 greedy against the Engine.

Run:  .venv/bin/python benchmarks/bench_engine.py            (writes benchmarks/results/engine.md)
      .venv/bin/python benchmarks/bench_engine.py --quick    (smaller, 1 repeat; /tmp/bench_engine_quick.md)
"""
from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llmkit  # noqa: E402
from llmkit.generation import generate  # noqa: E402
from llmkit.infer import Engine, SamplingParams  # noqa: E402
from machine_info import machine_line  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "engine.md"
QUICK_OUT = Path(tempfile.gettempdir()) / "bench_engine_quick.md"
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_abab(fns: dict, repeats: int) -> dict:
    """Median wall time of each callable, run in ABAB... order after one warm-up each."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for r in range(repeats):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))
        for k in order:
            times[k].append(timed(fns[k]))
    return {k: statistics.median(v) for k, v in times.items()}


def make_models(tmp: Path, quick: bool):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    size = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=2) if quick else \
        dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=8192, num_attention_heads=6, num_key_value_heads=2,
                                      max_position_embeddings=1024, bos_token_id=None, eos_token_id=None,
                                      pad_token_id=None, tie_word_embeddings=False, **size)).eval()
    hf.save_pretrained(tmp / "hf")
    ours = llmkit.load_hf(tmp / "hf").eval()
    ids = torch.randint(0, 8192, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids).logits).abs().max().item()
    assert diff < 1e-4, diff
    return hf, ours, diff


def hf_generate(hf, prompts: list[list[int]], max_new: int) -> None:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        hf.generate(ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                    pad_token_id=0)


def ours_generate(model, prompts: list[list[int]], max_new: int) -> None:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    generate(model, ids, attention_mask=None if len(prompts) == 1 else mask, max_new_tokens=max_new,
             stop_token_ids=[])


def stats_split(engine: Engine) -> str:
    s = engine.stats
    parts = {k: s[k] for k in ("schedule_s", "forward_s", "sample_s")}
    total = sum(parts.values())
    return ", ".join(f"{k[:-2]} {100 * v / total:.0f}%" for k, v in parts.items())


CATEGORIES = {"matmuls (linear)": ("aten::linear", "aten::addmm", "aten::mm", "aten::matmul"),
              "attention (SDPA)": ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product"),
              "paged KV gather / write": ("aten::index_select", "aten::index_copy_", "aten::index_copy"),
              "norms, RoPE, activations": ("aten::mean", "aten::pow", "aten::rsqrt", "aten::mul", "aten::add",
                                           "aten::cat", "aten::silu", "aten::neg", "aten::cos", "aten::sin")}


def profile_steps(engine: Engine, prompts, params, steps: int) -> dict:
    """Where a decode step's wall time goes: torch.profiler's self CPU time of the top-level op
    families, the rest being Python (module calls, batch layout, scheduling, sampling)."""
    from torch.profiler import ProfilerActivity, profile
    ids = [engine.add_request(p, params) for p in prompts]
    while any(not s.output for i in ids for s in engine.requests[i].seqs):       # past every prefill
        engine.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall = time.perf_counter() - start
    for i in ids:
        engine.release(i)
    own = {k: 0.0 for k in CATEGORIES}
    for event in prof.key_averages():
        for k, names in CATEGORIES.items():
            if event.key in names or any(event.key.startswith(n) for n in names if n.endswith("product")):
                own[k] += event.self_cpu_time_total / 1e6
    # self times of nested ops (linear -> addmm) are disjoint, so the families add up
    out = {k: v / wall for k, v in own.items()}
    out["Python and everything else"] = max(0.0, 1 - sum(out.values()))
    return {"ms_per_step": 1000 * wall / steps, "share": out}


def section_batch1(hf, ours, repeats: int, quick: bool) -> dict:
    prompt = torch.randint(0, 8192, (32,), generator=torch.Generator().manual_seed(2)).tolist()
    n = 32 if quick else 128
    engine = Engine(ours)
    compiled = Engine(copy.deepcopy(ours), compile=True)
    compile_s = timed(lambda: compiled.generate([prompt], SamplingParams(max_tokens=4, temperature=0)))
    params = SamplingParams(max_tokens=n, temperature=0)
    same = engine.generate([prompt], params)[0] == compiled.generate([prompt], params)[0]
    times = median_abab({"transformers": lambda: hf_generate(hf, [prompt], n),                 # repeats + 2: noisy
                         "llmkit generate": lambda: ours_generate(ours, [prompt], n),
                         "engine": lambda: engine.generate([prompt], params),
                         "engine compile": lambda: compiled.generate([prompt], params)}, repeats + 2)
    prof = profile_steps(Engine(ours), [prompt], SamplingParams(max_tokens=200, temperature=0), 32)
    return {"n": n, "times": times, "split": stats_split(engine), "compile_s": compile_s, "compile_same": same,
            "profile": prof}


def section_concurrent(hf, ours, repeats: int, quick: bool) -> dict:
    g = torch.Generator().manual_seed(3)
    k, hi = (8, 64) if quick else (16, 256)
    lengths = torch.randint(16, hi + 1, (k,), generator=g).tolist()
    news = torch.randint(16, hi + 1, (k,), generator=g).tolist()
    prompts = [torch.randint(0, 8192, (n,), generator=g).tolist() for n in lengths]
    params = [SamplingParams(max_tokens=m, temperature=0) for m in news]
    engine = Engine(ours, max_num_seqs=32, max_num_batched_tokens=512)
    times = median_abab({"transformers static": lambda: hf_generate(hf, prompts, max(news)),
                         "llmkit generate static": lambda: ours_generate(ours, prompts, max(news)),
                         "engine continuous": lambda: engine.generate(prompts, params)}, repeats)
    prof = profile_steps(Engine(ours), prompts, SamplingParams(max_tokens=200, temperature=0), 16)
    budget = 2 * ours.config.max_seq_len                  # KV for two contiguous caches at full length
    tight = Engine(ours, num_blocks=budget // 16, max_num_seqs=32, max_num_batched_tokens=512)
    tight.generate(prompts, params)
    mem = {"budget": budget, "block": 16, "max_len": ours.config.max_seq_len,
           "contiguous": budget // ours.config.max_seq_len, "paged": tight.stats["max_running"],
           "preemptions": tight.scheduler.num_preemptions}
    return {"k": k, "lengths": lengths, "news": news, "useful": sum(news), "times": times,
            "split": stats_split(engine), "profile": prof, "mem": mem}


def section_prefix(ours, repeats: int, quick: bool) -> dict:
    g = torch.Generator().manual_seed(4)
    system = torch.randint(0, 8192, (128 if quick else 512,), generator=g).tolist()
    users = [torch.randint(0, 8192, (16,), generator=g).tolist() for _ in range(8)]
    params = SamplingParams(max_tokens=8, temperature=0)

    def ttfts(caching: bool) -> list[float]:
        engine = Engine(ours, prefix_caching=caching, max_num_batched_tokens=1024)
        out = []
        for u in users:
            start = time.perf_counter()
            rid = engine.add_request(system + u, params)
            next(engine.stream(rid))
            out.append(time.perf_counter() - start)
            for _ in engine.stream(rid):
                pass
        return out

    runs = {True: [], False: []}
    for r in range(repeats):
        for caching in ((True, False) if r % 2 == 0 else (False, True)):
            runs[caching].append(ttfts(caching))
    med = {c: statistics.median(statistics.median(t[1:]) for t in v) for c, v in runs.items()}
    first = {c: statistics.median(t[0] for t in v) for c, v in runs.items()}
    return {"system": len(system), "med": med, "first": first}


def train_char_model(out: Path, d: int, layers: int, heads: int, steps: int, source: Path = SHAKESPEARE,
                     tokenizer: str = "char") -> None:
    from llmkit.pretrain import parse_recipe, run_pretrain
    recipe = {"model": {"preset": "gpt2-tiny", "n_layers": layers, "n_heads": heads, "d_model": d, "d_ff": 4 * d,
                        "max_seq_len": 512, "dropout": 0.0},
              "data": {"source": str(source), "tokenizer": tokenizer, "block_size": 128, "batch_size": 16,
                       "val_fraction": 0.1, "sampling": "random"},
              "train": {"out_dir": str(out), "optimizer": "adamw", "lr": 2e-3, "min_lr": 2e-4, "schedule": "cosine",
                        "warmup_steps": 50, "max_steps": steps, "eval_every": steps, "eval_batches": 4,
                        "log_every": steps, "precision": "bf16", "seed": 0},
              "samples": 0}
    run_pretrain(parse_recipe(recipe))


def distillation_text(target, tok, out: Path, prompts: int, tokens: int) -> Path:
    """Sequence-level distillation data (Kim & Rush 2016; DistillSpec, Zhou et al. 2024): the target's
    own samples (temperature 1) from line starts of the real text, generated on the engine."""
    lines = [ln for ln in SHAKESPEARE.read_text().splitlines() if len(ln) > 20]
    g = torch.Generator().manual_seed(5)
    starts = [lines[int(i)][:16] for i in torch.randint(0, len(lines), (prompts,), generator=g)]
    engine = Engine(target, max_num_seqs=64, max_num_batched_tokens=1024, seed=5)
    outs = engine.generate([tok.encode(s, add_special_tokens=False) for s in starts],
                           SamplingParams(max_tokens=tokens, temperature=1.0, ignore_eos=True))
    out.write_text("\n".join(s + tok.decode(o) for s, o in zip(starts, outs)))
    return out


def section_speculative(tmp: Path, steps: int, quick: bool) -> dict:
    from llmkit.jobs.artifacts import load_artifacts
    train_char_model(tmp / "target", 128 if quick else 256, 2 if quick else 6, 4, steps)
    target_art = load_artifacts(tmp / "target" / "model")
    target, tok = target_art.model.eval(), target_art.tokenizer
    start = time.perf_counter()
    text = distillation_text(target, tok, tmp / "distill.txt", 32 if quick else 256, 64 if quick else 384)
    distill_s = time.perf_counter() - start
    train_char_model(tmp / "draft", 64 if quick else 128, 1 if quick else 2, 2, steps, source=text,
                     tokenizer=str(tmp / "target" / "model"))
    draft = load_artifacts(tmp / "draft" / "model").model.eval()
    count = lambda m: sum(p.numel() for p in m.parameters())                                     # noqa: E731
    starts = ["ROMEO:\nI will", "First Citizen:\nWe are", "KING RICHARD III:\nNow is the", "JULIET:\nO, "]
    prompts = [tok.encode(s, add_special_tokens=False) for s in starts]
    n = 64 if quick else 256
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    engines = {"plain": Engine(target), "draft (gamma 2)": Engine(target, speculative=draft, num_speculative_tokens=2),
               "draft (gamma 4)": Engine(target, speculative=draft, num_speculative_tokens=4),
               "prompt lookup (gamma 4)": Engine(target, speculative="ngram", num_speculative_tokens=4),
               "plain, compile": Engine(target, compile=True)}
    outs, times, accept, warm = {}, {}, {}, {}
    for name, engine in engines.items():
        start = time.perf_counter()
        engine.generate(prompts[:1], SamplingParams(max_tokens=8, temperature=0))               # warm-up / compile
        warm[name] = time.perf_counter() - start
        engine.stats["spec_calls"].clear()
        start = time.perf_counter()
        outs[name] = [engine.generate([p], params)[0] for p in prompts]                           # one at a time
        times[name] = time.perf_counter() - start
        accept[name] = engine.speculation_summary()
    identical = all(o == outs["plain"] for o in outs.values())
    sample = tok.decode(outs["plain"][0][:80])
    return {"params": (count(target), count(draft)), "n": n, "times": times, "accept": accept, "warm": warm,
            "identical": identical, "sample": sample, "steps": steps, "distill_s": distill_s,
            "distill_chars": len(text.read_text())}


def section_llama_cpp(ours, python: str, tmp: Path, repeats: int, quick: bool) -> dict:
    """The same weights as f32 GGUF in llama.cpp (its own process, `python` = an environment with
    llama-cpp-python), batch-1 greedy; the llmkit Engine timed right after on the same prompt."""
    import json
    import subprocess
    from gguf_llama import write_llama_gguf
    prompt = torch.randint(0, 8192, (32,), generator=torch.Generator().manual_seed(2)).tolist()
    n = 32 if quick else 128
    path = write_llama_gguf(ours, tmp / "model-f32.gguf")
    spec = json.dumps({"prompt": prompt, "n": n, "threads": torch.get_num_threads(), "repeats": repeats})
    proc = subprocess.run([python, str(Path(__file__).with_name("llama_cpp_worker.py")), str(path), spec],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    engine, compiled = Engine(ours), Engine(ours, compile=True)
    params = SamplingParams(max_tokens=n, temperature=0)
    ours_tokens = engine.generate([prompt], params)[0]
    times = median_abab({"engine": lambda: engine.generate([prompt], params),
                         "compiled": lambda: compiled.generate([prompt], params)}, repeats)
    agree = next((i for i, (a, b) in enumerate(zip(got["tokens"], ours_tokens)) if a != b), len(ours_tokens))
    return {"n": n, "llama_s": statistics.median(got["times"]), "engine_s": times["engine"],
            "compiled_s": times["compiled"], "agree": agree}


def render(args, model_diff, b1, cc, pc, sp, lc) -> str:
    mem = cc["mem"]
    tps = lambda tokens, s: tokens / s                                                          # noqa: E731
    lines = [f"# Inference engine vs transformers `generate`\n",
             f"Machine: {machine_line()}, {args.threads} threads. Date: {datetime.date.today()}. "
             f"transformers {__import__('transformers').__version__}. "
             f"Command: `.venv/bin/python benchmarks/bench_engine.py{' --quick' if args.quick else ''}`. "
             f"Median of {args.repeats} runs (ABAB order) per row ({args.repeats + 2} in section 1).\n",
             f"Model: random-init Llama from transformers, loaded by `llmkit.load_hf` (max |logit diff| "
             f"{model_diff:.1e}); fp32; no EOS (every request makes its max_tokens).\n",
             f"## 1. Batch-1 decode (32-token prompt, {b1['n']} greedy tokens)\n",
             "| path | tokens/s | vs transformers |", "|---|---|---|"]
    base = tps(b1["n"], b1["times"]["transformers"])
    for k, t in b1["times"].items():
        lines.append(f"| {k} | {tps(b1['n'], t):.1f} | {tps(b1['n'], t) / base:.2f}x |")
    lines += ["", f"Engine step time split (batch 1): {b1['split']}. `Engine(compile=True)` "
                  f"(a lone sequence's decode steps through torch.compile): compile + first 4 tokens "
                  f"{b1['compile_s']:.1f} s, outputs identical to eager: {b1['compile_same']}. Goal "
                  f"engine >= 1.5x transformers: eager **{'met' if tps(b1['n'], b1['times']['engine']) / base >= 1.5 else 'missed'}**, "
                  f"compiled **{'met' if tps(b1['n'], b1['times']['engine compile']) / base >= 1.5 else 'missed'}**.\n",
              f"## 2. {cc['k']} concurrent requests: continuous vs static batching\n",
              f"Prompt lengths {cc['lengths']}; max_tokens {cc['news']} ({cc['useful']} tokens requested). "
              "Static batches run every row to the longest max_tokens; tokens/s counts requested tokens only.\n",
              "| path | wall s | output tokens/s | vs transformers static |", "|---|---|---|---|"]
    base = tps(cc["useful"], cc["times"]["transformers static"])
    for k, t in cc["times"].items():
        lines.append(f"| {k} | {t:.2f} | {tps(cc['useful'], t):.1f} | {tps(cc['useful'], t) / base:.2f}x |")
    ratio = tps(cc["useful"], cc["times"]["engine continuous"]) / base
    lines += ["", f"Engine step time split: {cc['split']}. Goal >= 3x: **{'met' if ratio >= 3 else 'missed'}** "
                  f"({ratio:.2f}x).\n",
              "## Where a decode step's time goes\n",
              "torch.profiler self CPU time per op family over decode steps (every sequence past its prefill), "
              "the rest is Python: module calls, the step's batch layout, scheduling and sampling.\n",
              "| | " + " | ".join(b1["profile"]["share"]) + " | ms per step |",
              "|---|" + "---|" * (len(b1["profile"]["share"]) + 1),
              f"| batch 1 | " + " | ".join(f"{100 * v:.0f}%" for v in b1["profile"]["share"].values())
              + f" | {b1['profile']['ms_per_step']:.2f} |",
              f"| batch {cc['k']} | " + " | ".join(f"{100 * v:.0f}%" for v in cc["profile"]["share"].values())
              + f" | {cc['profile']['ms_per_step']:.2f} |", "",
              f"## 3. Prefix caching: TTFT with a shared {pc['system']}-token system prompt\n",
              "| prefix caching | first request TTFT ms | median TTFT ms, requests 2-8 |", "|---|---|---|",
              f"| on | {1000 * pc['first'][True]:.1f} | {1000 * pc['med'][True]:.1f} |",
              f"| off | {1000 * pc['first'][False]:.1f} | {1000 * pc['med'][False]:.1f} |", "",
              f"TTFT speed-up from prefix caching: {pc['med'][False] / pc['med'][True]:.2f}x.\n",
              f"## 4. Speculative decoding (target {sp['params'][0] / 1e6:.2f}M, draft {sp['params'][1] / 1e6:.2f}M "
              f"parameters = {sp['params'][0] / sp['params'][1]:.1f}x smaller; both trained {sp['steps']} steps on "
              f"tinyshakespeare characters; the draft on {sp['distill_chars']:,} characters of the target's own "
              f"samples, generated on the engine in {sp['distill_s']:.0f} s: sequence-level distillation)\n",
              f"4 prompts one at a time, {sp['n']} greedy tokens each. Outputs identical to plain decoding: "
              f"{sp['identical']}. Sample: `{sp['sample']!r}`\n",
              "| proposer | wall s | speed-up | acceptance | warm-up s (compile) |", "|---|---|---|---|---|"]
    for k, t in sp["times"].items():
        a = sp["accept"][k]
        acc = "-" if not a.get("calls") else f"{100 * a['acceptance']:.0f}%"
        lines.append(f"| {k} | {t:.2f} | {sp['times']['plain'] / t:.2f}x | {acc} | {sp['warm'][k]:.1f} |")
    lines += ["", "Acceptance = drafts kept / drafts proposed; α = kept / (kept + rejections), the per-token rate "
                  "of the geometric model; tokens per target call measured against (1 − α^{γ+1}) / (1 − α) summed "
                  "over the calls' own γ (cut near max_tokens).\n",
              "| proposer | verification calls | α | tokens per target call, measured | predicted |", "|---|---|---|---|---|"]
    for k, a in sp["accept"].items():
        if a and a.get("calls"):
            lines.append(f"| {k} | {a['calls']} | {a['alpha']:.3f} | {a['measured']:.2f} | {a['predicted']:.2f} |")
    lines += ["", f"## Memory: sequences a fixed KV budget holds\n",
              f"{mem['budget']} KV slots (blocks of {mem['block']}), context {mem['max_len']}: contiguous per-request "
              f"caches at the maximum length hold {mem['contiguous']} sequences; the paged engine ran "
              f"{mem['paged']} at once on section 2's requests ({mem['paged'] / mem['contiguous']:.1f}x), "
              f"preempting {mem['preemptions']} times.\n"]
    lines += ["", "## llama.cpp (batch-1 CPU reference)\n"]
    if lc is None:
        lines.append("Not run: no environment with llama-cpp-python was given (`--llama-cpp-python PYTHON`).")
    elif "error" in lc:
        lines.append(f"llama.cpp failed: `{lc['error'][-300:]}`")
    else:
        ratio = (lc["n"] / lc["engine_s"]) / (lc["n"] / lc["llama_s"])
        lines += ["Same weights written as an f32 GGUF (`benchmarks/gguf_llama.py`), llama-cpp-python in its own "
                  f"process on the same {args.threads} threads; {lc['n']} greedy tokens after a 32-token prompt.\n",
                  "| path | tokens/s | llmkit Engine / llama.cpp |", "|---|---|---|",
                  f"| llama.cpp f32 | {lc['n'] / lc['llama_s']:.1f} | |",
                  f"| llmkit Engine | {lc['n'] / lc['engine_s']:.1f} | {ratio:.2f}x |",
                  f"| llmkit Engine, compile | {lc['n'] / lc['compiled_s']:.1f} | {lc['llama_s'] / lc['compiled_s']:.2f}x |", "",
                  f"Greedy tokens agree for the first {lc['agree']} of {lc['n']} (fp32 on both sides; a "
                  "divergence after many tokens is a near-tie in the random model's logits)."]
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--spec-steps", type=int, default=None)
    parser.add_argument("--llama-cpp-python", default=None,
                        help="a python with llama-cpp-python installed (its own venv), for the llama.cpp row")
    args = parser.parse_args()
    args.repeats = args.repeats or (1 if args.quick else 3)
    steps = args.spec_steps or (40 if args.quick else 600)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hf, ours, diff = make_models(tmp, args.quick)
        b1 = section_batch1(hf, ours, args.repeats, args.quick)
        print("batch-1", b1, flush=True)
        cc = section_concurrent(hf, ours, args.repeats, args.quick)
        print("concurrent", cc, flush=True)
        pc = section_prefix(ours, args.repeats, args.quick)
        print("prefix", pc, flush=True)
        sp = section_speculative(tmp, steps, args.quick)
        print("speculative", sp, flush=True)
        lc = None
        if args.llama_cpp_python:
            lc = section_llama_cpp(ours, args.llama_cpp_python, tmp, args.repeats, args.quick)
            print("llama.cpp", lc, flush=True)
    text = render(args, diff, b1, cc, pc, sp, lc)
    out = QUICK_OUT if args.quick else RESULTS
    out.write_text(text)
    print(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
