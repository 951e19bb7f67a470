"""Online RL benchmark: one PPO iteration of llmkit against one RLOO iteration of TRL, same model and batch.

TRL 1.16 has no PPOTrainer; its online RL trainer for a scalar reward is `trl.RLOOTrainer`, so that
is the peer. An *iteration* is one rollout and one update on it: B completions sampled at
temperature 1.0 from the policy, scored (policy log-probs, reference log-probs, reward model),
then one AdamW step on all B of them (llmkit: ppo_epochs=1, minibatch_size=B; TRL:
num_iterations=1, steps_per_generation=1, per_device_train_batch_size=B).

Shared inputs, written once by this script (nothing is downloaded):
- the toy review task (`llmkit.align.toy_reviews`): character tokenizer, prompts
  "review of the <item>:" (all 19 tokens long), SFT reviews ending in the EOS token;
- per model size, a tiny Llama SFT policy trained with `toy.train_sft`, saved in Hugging Face
  format (`llmkit.io.hf.save_hf` + `Tokenizer.save`): TRL loads it with
  `AutoModelForCausalLM` / `AutoTokenizer`, llmkit with `llmkit.load_hf` / `load_tokenizer`;
  the script checks that both give the same logits and the same prompt token ids;
- one Bradley-Terry reward model (`toy.train_reward_model` on the d=64 SFT trunk, a llmkit
  `ValueModel`). llmkit's Llama family has no Hugging Face layout for a value / sequence-
  classification head (llmkit.io exports causal_lm only), so TRL gets it as a Python reward
  function that runs the very same ValueModel on the same token ids llmkit scores (prompt +
  completion up to and including its stop token); the script checks the two give equal scores.

Each side runs in its own fresh process (`--worker`), in ABBA order (llmkit, TRL, TRL, llmkit)
per model size, fp32, `torch.set_num_threads(--threads)`. Measured per iteration, after the first
--warmup ones are dropped: wall time from one iteration's end to the next (everything each loop
does), the rollout phase inside it (llmkit: `RolloutSource.make_rollout`; TRL:
`RLOOTrainer._generate_and_score_completions`), and the sampling inside that (llmkit:
`rollout.sample_rollout`; TRL: `RLOOTrainer._generate_single_turn`, i.e. HF `generate`), the
completion lengths, and the worker process's peak RSS (VmHWM; see `peak_rss_mib`).

Run:  .venv/bin/python benchmarks/bench_ppo.py            (writes benchmarks/results/ppo.md; est. 5-8 min on 2 idle cores)
      .venv/bin/python benchmarks/bench_ppo.py --quick    (smoke run: d=64 only, few iterations, AB order;
                                                          prints, writes /tmp/bench_ppo_quick.md only)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
RM_SIZE = (64, 2)                       # the reward model's trunk: the d=64, 2-layer SFT model
RESULT_MARK = "BENCH_PPO_RESULT "
QUICK_OUT = Path(tempfile.gettempdir()) / "bench_ppo_quick.md"    # a smoke run never overwrites results/ppo.md


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'64x2,256x4' -> [(64, 2), (256, 4)] (d_model x n_layers)."""
    out = []
    for part in text.split(","):
        d, _, n = part.strip().partition("x")
        out.append((int(d), int(n or 2)))
    return out


def tag(size) -> str:
    return f"d{size[0]}_l{size[1]}"


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """This process's peak RSS since its exec: VmHWM. (`getrusage(RUSAGE_SELF).ru_maxrss` is no good in a
    subprocess: Linux carries the parent's high-water mark across fork + exec, so the child reports at
    least the RSS the driver had when it forked.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024                           # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024          # not Linux: KiB (macOS: bytes)


def bench_prompts(n: int = 512) -> list[str]:
    from llmkit.align import toy_reviews as toy
    return toy.prompts(n, seed=0)


# ---- shared inputs ---------------------------------------------------------------------------

def build_tokenizer():
    from llmkit.align import toy_reviews as toy
    from llmkit.tokenizer import train_char
    return train_char(texts=toy.corpus(200), special_tokens=("<pad>", "<|endoftext|>"), pad_token="<pad>")


def reward_model_for(tok, size=RM_SIZE):
    """An untrained ValueModel of the reward model's shape (its trained weights are loaded after)."""
    from llmkit.align import toy_reviews as toy
    from llmkit.model.models import ValueModel
    return ValueModel(toy.tiny_policy(tok, d_model=size[0], n_layers=size[1]).config)


def load_reward_model(work: Path, tok):
    import torch
    rm = reward_model_for(tok)
    rm.load_state_dict(torch.load(work / "rm.pt", map_location="cpu", weights_only=True))
    return rm.eval().requires_grad_(False)


def rm_score_ids(rm, pad_id: int, prompt_ids, completion_ids):
    """The ValueModel's score of each left-padded prompt + right-padded completion (a list of floats):
    the same tensors llmkit's `ModelReward` builds from a rollout (positions count real tokens from 0)."""
    import torch
    Tq, Tr = max(map(len, prompt_ids)), max(1, max(map(len, completion_ids)))
    ids = torch.tensor([[pad_id] * (Tq - len(p)) + list(p) + list(c) + [pad_id] * (Tr - len(c))
                        for p, c in zip(prompt_ids, completion_ids)])
    mask = torch.tensor([[0] * (Tq - len(p)) + [1] * (len(p) + len(c)) + [0] * (Tr - len(c))
                         for p, c in zip(prompt_ids, completion_ids)])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return rm(ids, mask, position_ids=positions).logits.float().tolist()


def prepare(work: Path, sizes, args) -> dict:
    """Tokenizer, one SFT policy per size (HF format), the reward model; checks; returns facts for the report."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import llmkit
    from llmkit.align import toy_reviews as toy
    from llmkit.align.rewards import ModelReward
    from llmkit.align.rollout import Rollout, left_pad, stop_token_ids
    from llmkit.io.hf import save_hf

    torch.set_num_threads(args.threads)
    facts = {"sft_s": {}}
    tok = build_tokenizer()
    stops = stop_token_ids(tok)
    sft_models = {}
    for size in dict.fromkeys(sizes + [RM_SIZE]):
        torch.manual_seed(0)
        policy = toy.tiny_policy(tok, d_model=size[0], n_layers=size[1])
        started = time.perf_counter()
        toy.train_sft(policy, tok, toy.sft_rows(3000), steps=args.sft_steps, out_dir=str(work / "sft_runs" / tag(size)))
        facts["sft_s"][tag(size)] = time.perf_counter() - started
        policy.eval()
        sft_models[size] = policy
        out = work / tag(size)
        save_hf(policy, out)
        tok.save(out)
        # the same model and tokenizer on both sides
        hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        hf_tok = AutoTokenizer.from_pretrained(out)
        ours = llmkit.load_hf(out).eval()
        prompts = bench_prompts(16)
        ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
        if hf_tok(text=prompts)["input_ids"] != ids:
            raise SystemExit(f"{out}: AutoTokenizer encodes the prompts differently from llmkit's tokenizer")
        x = torch.tensor(ids)
        with torch.no_grad():
            diff = (hf(x).logits - ours(x).logits).abs().max().item()
        if diff > 1e-4:
            raise SystemExit(f"{out}: transformers and llmkit logits differ by {diff:.2e} (> 1e-4)")
        facts.setdefault("logit_diff", {})[tag(size)] = diff
        facts.setdefault("params", {})[tag(size)] = sum(p.numel() for p in ours.parameters())

    # the reward model: Bradley-Terry on pairs ranked by the true reward, on the d=64 SFT trunk
    torch.manual_seed(0)
    started = time.perf_counter()
    rm = toy.train_reward_model(sft_models[RM_SIZE], tok, toy.preference_rows(2000, seed=1), steps=args.rm_steps,
                                out_dir=str(work / "rm_run"))
    facts["rm_s"] = time.perf_counter() - started
    facts["rm_accuracy"] = toy.held_out_accuracy(rm, tok, toy.preference_rows(500, seed=99))
    torch.save(rm.state_dict(), work / "rm.pt")
    rm = load_reward_model(work, tok)
    # TRL's reward function must score exactly what llmkit's ModelReward scores
    gen = torch.Generator().manual_seed(0)
    q = [tok.encode(p, add_special_tokens=False) for p in bench_prompts(8)]
    c = [torch.randint(3, tok.vocab_size, (int(n),), generator=gen).tolist() + [stops[0]]
         for n in torch.randint(5, 30, (8,), generator=gen)]
    query, qmask = left_pad(q, tok.pad_id)
    width = max(map(len, c))
    response = torch.tensor([r + [tok.pad_id] * (width - len(r)) for r in c])
    rmask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in c])
    ours = ModelReward(rm)(Rollout(query, qmask, response, rmask, torch.ones(8, dtype=torch.bool)), None, None)
    theirs = torch.tensor(rm_score_ids(rm, tok.pad_id, q, c))
    facts["rm_score_diff"] = (ours - theirs).abs().max().item()
    if facts["rm_score_diff"] > 1e-5:
        raise SystemExit(f"TRL's reward function and llmkit's ModelReward disagree by {facts['rm_score_diff']:.2e}")
    facts["stop_ids"] = stops
    facts["stop_tokens"] = hf_tok.convert_ids_to_tokens(stops)
    facts["prompt_lengths"] = sorted({len(tok.encode(p, add_special_tokens=False)) for p in bench_prompts()})
    return facts


# ---- the two workers -------------------------------------------------------------------------

class Clock:
    def __init__(self):
        self.ends, self.rollout, self.sample, self.lengths, self.longest, self.scores = [], [], [], [], [], []

    def summary(self, warmup: int, rss_before: float) -> dict:
        n = len(self.ends)
        if len(self.rollout) != n or len(self.sample) != n:
            raise RuntimeError(f"{n} iterations but {len(self.rollout)} rollouts / {len(self.sample)} samplings: "
                               "expected one of each per iteration")
        iters = [self.ends[i] - self.ends[i - 1] for i in range(warmup, n)]
        keep = slice(warmup, n)
        return {"iter_s": iters, "rollout_s": self.rollout[keep], "sample_s": self.sample[keep],
                "mean_len": self.lengths[keep], "longest": self.longest[keep], "score": self.scores[keep],
                "rss_before_mib": rss_before, "peak_rss_mib": peak_rss_mib(), "iterations": n}


def worker_llmkit(args) -> dict:
    import torch

    import llmkit
    import llmkit.align.ppo as ppo_module
    from llmkit.align.ppo import PPOConfig, PPOTrainer
    from llmkit.train import TrainConfig

    work, model_dir = Path(args.work), Path(args.work) / args.size
    tok = llmkit.load_tokenizer(model_dir)
    policy = llmkit.load_hf(model_dir, dtype=torch.float32)
    rm = load_reward_model(work, tok)
    clock = Clock()
    real_sample = ppo_module.sample_rollout

    def timed_sample(*a, **kw):
        started = time.perf_counter()
        rollout = real_sample(*a, **kw)
        clock.sample.append(time.perf_counter() - started)
        lengths = rollout.response_mask.sum(1).float()                 # through the stop token, as TRL counts
        clock.lengths.append(float(lengths.mean()))
        clock.longest.append(float(lengths.max()))
        return rollout
    ppo_module.sample_rollout = timed_sample

    class StepEnds:
        def on_step_end(self, trainer, step, metrics):
            clock.ends.append(time.perf_counter())

    total = args.warmup + args.iterations
    config = PPOConfig(iterations=total, rollout_batch_size=args.batch, minibatch_size=args.batch, ppo_epochs=1,
                       max_new_tokens=args.max_new_tokens, temperature=1.0, kl_coef=args.beta, kl_estimator="k1",
                       critic="shared", seed=0)
    train = TrainConfig(out_dir=str(work / "runs" / f"llmkit_{args.size}_{os.getpid()}"), lr=args.lr,
                        betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, max_grad_norm=1.0, schedule="constant",
                        warmup_steps=0, precision=args.precision, log_every=10**6, save_every=0, keep_last=1,
                        progress=False, tensorboard=False, plot=False, device="cpu", seed=0)
    trainer = PPOTrainer(policy, tok, bench_prompts(), rm, config=config, train=train, callbacks=[StepEnds()])
    source, real_make = trainer.source, trainer.source.make_rollout

    def timed_make():
        started = time.perf_counter()
        batches = real_make()
        clock.rollout.append(time.perf_counter() - started)
        clock.scores.append(source.history[-1]["objective/scores"])
        return batches
    source.make_rollout = timed_make
    rss_before = current_rss_mib()
    trainer.fit()
    return clock.summary(args.warmup, rss_before)


def worker_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    work, model_dir = Path(args.work), Path(args.work) / args.size
    hf_tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    stop_ids = json.loads(args.stop_ids)
    model.generation_config.eos_token_id = stop_ids          # llmkit stops at every non-pad special token
    import llmkit
    rm = load_reward_model(work, llmkit.load_tokenizer(model_dir))
    clock = Clock()

    def rm_score(prompts, completions, completion_ids, **kwargs):
        prompt_ids = hf_tok(text=list(prompts), add_special_tokens=False)["input_ids"]
        scores = rm_score_ids(rm, hf_tok.pad_token_id, prompt_ids, completion_ids)
        clock.scores.append(sum(scores) / len(scores))
        return scores

    class StepEnds(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            clock.ends.append(time.perf_counter())

    total = args.warmup + args.iterations
    config = RLOOConfig(
        output_dir=str(work / "runs" / f"trl_{args.size}_{os.getpid()}"), max_steps=total,
        per_device_train_batch_size=args.batch, num_generations=args.generations, gradient_accumulation_steps=1,
        num_iterations=1, max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        beta=args.beta, epsilon=0.2, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
        optim="adamw_torch", bf16=args.precision == "bf16", fp16=False, gradient_checkpointing=False, use_cpu=True,
        disable_dropout=True, logging_steps=10**6, save_strategy="no", report_to="none", disable_tqdm=True,
        log_completions=False, dataloader_num_workers=0, seed=0)
    trainer = RLOOTrainer(model=model, reward_funcs=rm_score, args=config,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in bench_prompts()]),
                          processing_class=hf_tok, callbacks=[StepEnds()])
    if sorted(trainer.eos_token_ids) != sorted(stop_ids):
        raise RuntimeError(f"TRL stops at {trainer.eos_token_ids}, llmkit at {stop_ids}")
    real_rollout, real_sample = trainer._generate_and_score_completions, trainer._generate_single_turn

    def timed_rollout(*a, **kw):
        started = time.perf_counter()
        out = real_rollout(*a, **kw)
        clock.rollout.append(time.perf_counter() - started)
        return out

    def timed_sample(*a, **kw):
        started = time.perf_counter()
        completion_ids = real_sample(*a, **kw)
        clock.sample.append(time.perf_counter() - started)
        lengths = [len(c) for c in completion_ids]                    # through the EOS token
        clock.lengths.append(sum(lengths) / len(lengths))
        clock.longest.append(float(max(lengths)))
        return completion_ids
    trainer._generate_and_score_completions, trainer._generate_single_turn = timed_rollout, timed_sample
    rss_before = current_rss_mib()
    trainer.train()
    return clock.summary(args.warmup, rss_before)


# ---- driver ----------------------------------------------------------------------------------

def busy_seconds() -> float:
    """CPU seconds all processes on the machine have used (/proc/stat: user..steal, not idle / iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_worker(side: str, size, work: Path, args, stop_ids) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--work", str(work), "--size", tag(size),
           "--iterations", str(args.iterations), "--warmup", str(args.warmup), "--batch", str(args.batch),
           "--generations", str(args.generations), "--max-new-tokens", str(args.max_new_tokens),
           "--lr", repr(args.lr), "--beta", repr(args.beta), "--threads", str(args.threads),
           "--stop-ids", json.dumps(stop_ids), "--precision", args.precision]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    started, busy, ours = time.perf_counter(), busy_seconds(), children_seconds()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - started
    # cores' worth of CPU that other processes used while this worker ran (contention)
    other = max(0.0, (busy_seconds() - busy) - (children_seconds() - ours)) / elapsed
    if out.returncode != 0:
        raise SystemExit(f"{side} worker ({tag(size)}) failed:\n{out.stderr[-4000:]}")
    lines = [line for line in out.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if not lines:
        raise SystemExit(f"{side} worker ({tag(size)}) printed no result:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    result = json.loads(lines[-1][len(RESULT_MARK):])
    result["process_s"], result["other_cores"] = elapsed, other
    return result


def mean(xs):
    return statistics.fmean(xs) if xs else float("nan")


def side_summary(runs: list[dict]) -> dict:
    pooled = lambda key: [x for r in runs for x in r[key]]                      # noqa: E731
    s = {"iter_s": mean(pooled("iter_s")), "rollout_s": mean(pooled("rollout_s")), "sample_s": mean(pooled("sample_s")),
         "mean_len": mean(pooled("mean_len")), "longest": mean(pooled("longest")), "score": mean(pooled("score")),
         "peak_rss_mib": max(r["peak_rss_mib"] for r in runs), "rss_before_mib": max(r["rss_before_mib"] for r in runs),
         "per_run_iter_s": [mean(r["iter_s"]) for r in runs], "median_iter_s": statistics.median(pooled("iter_s")),
         "other_cores": [r["other_cores"] for r in runs]}
    s["update_s"] = s["iter_s"] - s["rollout_s"]
    s["rollout_share"] = s["rollout_s"] / s["iter_s"]
    return s


def report(results: dict, facts: dict, args, sizes, order, loads, wall_s) -> str:
    import transformers
    import trl

    from machine_info import machine_line
    prompts_per_step = args.batch // args.generations
    lines = ["# llmkit PPO vs TRL RLOO: one online RL iteration (rollout + update)", "",
             f"- machine: {machine_line()}, {args.threads} threads; transformers {transformers.__version__}, "
             f"trl {trl.__version__}; {datetime.date.today()}; load average (1 min) {loads[0]:.2f} before, "
             f"{loads[1]:.2f} after",
             f"- command: `.venv/bin/python benchmarks/bench_ppo.py{''.join(' ' + a for a in sys.argv[1:])}`"
             f"{' (SMOKE RUN: too few iterations to read ratios from)' if args.quick else ''}; {wall_s:.0f} s in all",
             f"- models: tiny Llama SFT policies (character vocabulary {facts['vocab']}, 4 heads, d_ff 4 d, no dropout, "
             f"untied head) trained {args.sft_steps} steps on toy reviews (`llmkit.align.toy_reviews`), saved in "
             "Hugging Face format and loaded by each side from the same files (logits agree to "
             f"{max(facts['logit_diff'].values()):.0e}); reward model: a Bradley-Terry ValueModel on the d=64 "
             f"SFT trunk, {args.rm_steps} steps on 2,000 pairs ranked by the true reward, held-out accuracy "
             f"{facts['rm_accuracy']:.3f} (500 pairs)",
             f"- batch: {args.batch} completions per iteration (llmkit: rollout_batch_size {args.batch}, one "
             f"completion per prompt; TRL: {prompts_per_step} prompts x num_generations {args.generations}), "
             f"prompts from the same pool (`toy.prompts(512)`, prompt lengths {facts['prompt_lengths']} tokens), up to "
             f"{args.max_new_tokens} new tokens, both stopping at the same stop tokens {facts['stop_tokens']} (llmkit: "
             "every special token but pad; TRL: set as the generation config's eos_token_id), temperature 1.0, "
             "no top-k / top-p",
             f"- update: one AdamW step per iteration on all {args.batch} completions (llmkit ppo_epochs 1, "
             f"minibatch_size {args.batch}; TRL num_iterations 1, steps_per_generation 1), lr {args.lr:g} constant, "
             f"betas (0.9, 0.999), weight decay 0, clip 1.0; KL coefficient {args.beta:g} (k1) against a frozen "
             f"reference copy on both sides; {args.precision} (llmkit `train.precision`, which the rollout runs "
             "under too; TRL `bf16`); TRL gradient_checkpointing off (its default is on)",
             f"- method: each side in its own fresh process, order {' '.join('A' if s == 'llmkit' else 'B' for s in order)}"
             f" (A llmkit, B TRL) per size; the first {args.warmup} iteration(s) of each process dropped, then "
             f"{args.iterations} timed, "
             "pooled over the processes of a side. Iteration = wall time between consecutive ends of the "
             "optimizer step (everything each loop does); rollout = llmkit `RolloutSource.make_rollout` / TRL "
             "`_generate_and_score_completions` (sampling, policy and reference log-probs, reward, advantages); "
             "sampling = llmkit `sample_rollout` / TRL `_generate_single_turn` (HF `generate`); update = iteration "
             "minus rollout; peak RSS = the worker process's high-water mark, VmHWM (imports, models, everything; "
             "`ru_maxrss` would include the driver's RSS, which Linux carries into a child across fork + exec)", ""]
    verdicts = []
    for size in sizes:
        k, t = results[tag(size)]["llmkit"], results[tag(size)]["trl"]
        ratio = lambda key: t[key] / k[key]                                     # noqa: E731
        lines += [f"## d_model {size[0]}, {size[1]} layers ({facts['params'][tag(size)] / 1e6:.2f} M parameters)", "",
                  "| metric | llmkit PPOTrainer | TRL RLOOTrainer | TRL / llmkit |", "|---|---:|---:|---:|",
                  f"| **seconds per iteration** | **{k['iter_s']:.3f}** | **{t['iter_s']:.3f}** | "
                  f"**{ratio('iter_s'):.2f}** |",
                  f"| rollout phase (s) | {k['rollout_s']:.3f} | {t['rollout_s']:.3f} | {ratio('rollout_s'):.2f} |",
                  f"| rollout share of the iteration | {k['rollout_share']:.0%} | {t['rollout_share']:.0%} | |",
                  f"| of which sampling (s) | {k['sample_s']:.3f} | {t['sample_s']:.3f} | {ratio('sample_s'):.2f} |",
                  f"| update = rest (s) | {k['update_s']:.3f} | {t['update_s']:.3f} | {ratio('update_s'):.2f} |",
                  f"| peak RSS (MiB) | {k['peak_rss_mib']:.0f} | {t['peak_rss_mib']:.0f} | "
                  f"{ratio('peak_rss_mib'):.2f} |",
                  f"| RSS when training starts (MiB) | {k['rss_before_mib']:.0f} | {t['rss_before_mib']:.0f} | |",
                  f"| mean completion length (tokens, incl. stop) | {k['mean_len']:.1f} | {t['mean_len']:.1f} | |",
                  f"| longest completion per batch (mean) | {k['longest']:.1f} | {t['longest']:.1f} | |",
                  f"| mean reward-model score | {k['score']:.2f} | {t['score']:.2f} | |", "",
                  f"Per process, mean s/iteration: llmkit {', '.join(f'{x:.3f}' for x in k['per_run_iter_s'])}; "
                  f"TRL {', '.join(f'{x:.3f}' for x in t['per_run_iter_s'])}. Medians: llmkit {k['median_iter_s']:.3f}, "
                  f"TRL {t['median_iter_s']:.3f}. CPU used by other processes meanwhile (cores): llmkit "
                  f"{', '.join(f'{x:.2f}' for x in k['other_cores'])}; TRL {', '.join(f'{x:.2f}' for x in t['other_cores'])}.",
                  ""]
        contended = max(k["other_cores"] + t["other_cores"]) > args.max_other
        if contended:
            lines += [f"**Contended: other processes used more than {args.max_other} cores during a run of this size; "
                      "its times are not a clean measurement. Rerun on an idle machine.**", ""]
        verdicts.append(f"d={size[0]}: {ratio('iter_s'):.2f}x ({'met' if ratio('iter_s') >= 2 else 'missed'}"
                        f"{', contended' if contended else ''})")
    lines += ["## Goal", "",
              f"Issue 15 asks llmkit's online RL iteration to be **≥ 2× faster** than TRL's: "
              f"{'; '.join(verdicts)}{' - smoke numbers, not a result' if args.quick else ''}.", "",
              "## What is and is not the same", "",
              "- Same: weights, tokenizer, prompt pool and prompt length, completions per iteration, stop tokens, "
              "maximum completion length, temperature, reward model and its scores, frozen reference, KL "
              f"coefficient, optimizer and its settings, one optimizer step per rollout, {args.precision}, threads.",
              "- The algorithm: llmkit runs PPO (Ziegler et al.; a value head on the policy's own trunk, per-token "
              "KL in the reward, GAE, whitened advantages, clipped policy + value loss); TRL 1.16 has no "
              "PPOTrainer, so its peer is RLOO (no critic; a leave-one-out baseline over the "
              f"{args.generations} completions of a prompt; sequence-level KL in the reward; clipped loss on "
              "sequence log-ratios). The model passes per iteration are the same: sampling, a policy and a "
              f"reference forward and a reward-model forward over the {args.batch} sequences, then one forward + "
              "backward + AdamW step; llmkit's value head adds one d x 1 projection, and it logs the rollout's "
              "entropy where TRL computes it in the loss.",
              f"- Prompts: RLOO needs {args.generations} completions of each prompt, so TRL samples "
              f"{prompts_per_step} prompts x {args.generations}; llmkit samples {args.batch} prompts once each. Both "
              "draw from the same pool, and the prompts are all one length here, so the tensors have the same shapes.",
              "- Reward: the reward model is llmkit's ValueModel on both sides (llmkit.io has no Hugging Face "
              "sequence-classification layout for it); on TRL it is a reward function given the completion token "
              "ids (through the EOS) and re-tokenized prompts, scoring exactly the sequence llmkit scores "
              f"(checked: max difference {facts['rm_score_diff']:.0e}). So the reward forward is the same code on "
              "both sides, not TRL's `AutoModelForSequenceClassification` path.",
              "- Completion lengths come from each side's own random samples of the same model, so they differ a "
              "little; both generate until every row has stopped or hit the maximum, so the longest completion in "
              "a batch sets the sampling cost: both are in the table.",
              "- Peak RSS includes each library's imports (TRL brings in datasets, accelerate and transformers' "
              "Trainer); the RSS when training starts shows how much of the peak is there before the first "
              "iteration."]
    return "\n".join(lines) + "\n"


DEFAULT_SIZES = "64x2,256x4"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: d=64 only, few iterations, AB order")
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="d_model x n_layers, comma separated")
    parser.add_argument("--iterations", type=int, default=10, help="timed iterations per process")
    parser.add_argument("--warmup", type=int, default=2, help="iterations dropped at the start of each process")
    parser.add_argument("--batch", type=int, default=32, help="completions per iteration")
    parser.add_argument("--generations", type=int, default=4, help="TRL's num_generations (completions per prompt)")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=0.05, help="KL coefficient, both sides")
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--rm-steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="both sides: llmkit train.precision, TRL bf16=True (results/ppo_bf16.md)")
    parser.add_argument("--max-other", type=float, default=0.3,
                        help="flag a size as contended when other processes used more cores than this meanwhile")
    parser.add_argument("--out", default=None, help=f"results file (default results/ppo.md; --quick: {QUICK_OUT})")
    parser.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--worker", choices=["llmkit", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--stop-ids", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first timed iteration starts at the end of the last warm-up one)")
    if args.batch % args.generations:
        parser.error(f"--batch {args.batch} must be a multiple of --generations {args.generations}")

    if args.worker:
        import torch
        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        result = (worker_llmkit if args.worker == "llmkit" else worker_trl)(args)
        print(RESULT_MARK + json.dumps(result), flush=True)
        return

    if args.quick:
        args.sizes, args.iterations, args.warmup, args.sft_steps, args.rm_steps = "64x2", 2, 1, 60, 30
    sizes = parse_sizes(args.sizes)
    order = ["llmkit", "trl", "trl", "llmkit"][:2 if args.quick else 4]
    sys.path.insert(0, str(HERE))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print(f"preparing in {work}: tokenizer, SFT policies {args.sizes}, reward model", flush=True)
        facts = prepare(work, sizes, args)
        facts["vocab"] = build_tokenizer().vocab_size
        print(f"  SFT seconds {({k: round(v) for k, v in facts['sft_s'].items()})}, reward model "
              f"{facts['rm_s']:.0f} s, held-out accuracy {facts['rm_accuracy']:.3f}", flush=True)
        loads = [os.getloadavg()[0]]
        results = {}
        for size in sizes:
            runs = {"llmkit": [], "trl": []}
            for side in order:
                r = run_worker(side, size, work, args, facts["stop_ids"])
                runs[side].append(r)
                print(f"  {tag(size)} {side:6s}: {mean(r['iter_s']):.3f} s/iteration, rollout {mean(r['rollout_s']):.3f} s, "
                      f"sampling {mean(r['sample_s']):.3f} s, mean length {mean(r['mean_len']):.1f}, "
                      f"peak RSS {r['peak_rss_mib']:.0f} MiB ({r['process_s']:.0f} s process, other processes "
                      f"{r['other_cores']:.2f} cores)", flush=True)
            results[tag(size)] = {side: side_summary(rs) for side, rs in runs.items()}
        loads.append(os.getloadavg()[0])
        text = report(results, facts, args, sizes, order, loads, time.perf_counter() - started)
        default = RESULTS / ("ppo.md" if args.precision == "fp32" else f"ppo_{args.precision}.md")
        out = Path(args.out) if args.out else (QUICK_OUT if args.quick else default)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    print(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
