"""PPO-RLHF, DPO and RLAIF end to end on the toy review task, measured against its true reward.

    .venv/bin/python benchmarks/bench_ppo_toy.py            # about 2 minutes on 2 cores
    .venv/bin/python benchmarks/bench_ppo_toy.py --save runs/toy   # also keep sft/ and rm/ for recipes/align_ppo_toy.yaml

Pipeline (llmkit.align.toy_reviews): a tiny Llama fitted to synthetic reviews (the SFT model,
E[R] ≈ 0) -> a reward model on 2,000 pairs ranked by the true reward R (held-out accuracy) -> PPO
with that reward model for several fixed β and one adaptive run -> DPO on the same pairs -> RLAIF:
a noisy judge with a planted position bias labels pairs, one order vs both orders (agreement with
R), a reward model on its labels, PPO on that. Every policy is scored on fresh samples: the true
reward E[R] and the KL to the SFT model, Σ_t log π − log π_ref averaged over completions.
Writes benchmarks/results/ppo_toy.md and ppo_toy_frontier.png.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine_info import machine_line  # noqa: E402

from llmkit.align import DPOObjective, PreferenceBatches, frozen_copy, tokenize_rows  # noqa: E402
from llmkit.align import toy_reviews as toy  # noqa: E402
from llmkit.align.judge import Judge, agreement  # noqa: E402
from llmkit.align.ppo import PPOConfig, PPOTrainer  # noqa: E402
from llmkit.align.rollout import sample_kl_and_reward  # noqa: E402
from llmkit.tokenizer import train_char  # noqa: E402
from llmkit.train import TrainConfig, Trainer  # noqa: E402

RESULTS = Path(__file__).parent / "results"
EVAL_PROMPTS = toy.prompts(256, seed=7)


def train_cfg(out, **kw):
    return TrainConfig(out_dir=str(out), log_every=4, save_every=0, progress=False, schedule="constant", warmup_steps=0,
                       plot=False, tensorboard=False, **kw)


def score(policy, sft, tok):
    return sample_kl_and_reward(policy, sft, tok, EVAL_PROMPTS, toy.true_reward, max_new_tokens=32, seed=11)


def ppo(sft, tok, reward, work, name, **cfg):
    policy = copy.deepcopy(sft)
    config = PPOConfig(**{**dict(iterations=25, rollout_batch_size=32, minibatch_size=16, max_new_tokens=32), **cfg})
    start = time.time()
    trainer = PPOTrainer(policy, tok, toy.prompts(512), reward, config=config, train=train_cfg(work / name, lr=3e-4),
                         track={"true_reward": toy.true_reward})
    trainer.fit()
    return policy, time.time() - start, trainer.source.kl.beta


def dpo(sft, tok, rows, work, beta):
    policy = copy.deepcopy(sft)
    examples = tokenize_rows(rows, tok, max_length=policy.config.max_seq_len)
    objective = DPOObjective(frozen_copy(sft), beta=beta)
    Trainer(policy, objective.loss, PreferenceBatches(examples, 32, tok.pad_id, seed=0),
            config=train_cfg(work / f"dpo{beta}", lr=3e-4, max_steps=150)).fit()
    return policy


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--save", default=None, help="also save sft/ and rm/ checkpoints here")
    parser.add_argument("--work", default="/tmp/bench_ppo_toy")
    args = parser.parse_args()
    torch.set_num_threads(2)
    work = Path(args.work)
    started = time.time()
    tok = train_char(texts=toy.corpus(200), special_tokens=("<pad>", "<|endoftext|>"), pad_token="<pad>")
    torch.manual_seed(0)
    sft = toy.tiny_policy(tok)
    toy.train_sft(sft, tok, toy.sft_rows(3000), steps=300, out_dir=str(work / "sft"))
    sft.eval()
    base = score(sft, sft, tok)
    pairs, held_out = toy.preference_rows(2000, seed=1), toy.preference_rows(500, seed=99)
    rm = toy.train_reward_model(sft, tok, pairs, steps=300, out_dir=str(work / "rm"))
    rm_acc = toy.held_out_accuracy(rm, tok, held_out)
    if args.save:
        from llmkit.jobs.artifacts import save_artifacts
        save_artifacts(Path(args.save) / "sft", sft, tok, job="toy", task="causal_lm")
        save_artifacts(Path(args.save) / "rm", rm, tok, job="toy", task="reward")

    rows = [("SFT model", "-", base, None, None)]
    points = {"PPO": [], "DPO": []}
    for beta in (0.3, 1.0, 3.0, 10.0):          # the reward model's scores have std ≈ 5.6 on SFT samples
        policy, seconds, _ = ppo(sft, tok, rm, work, f"ppo{beta}", kl_coef=beta)
        s = score(policy, sft, tok)
        rows.append((f"PPO, RM reward, β = {beta}", "fixed", s, seconds, None))
        points["PPO"].append((beta, s))
    policy, seconds, beta_end = ppo(sft, tok, rm, work, "ppo_adaptive", kl_coef=3.0, target_kl=6.0, kl_horizon=160,
                                    iterations=30)
    s = score(policy, sft, tok)
    rows.append(("PPO, RM reward, adaptive (target 6 nats, β₀ 3)", f"β → {beta_end:.3f}", s, seconds, None))
    adaptive = s
    for beta in (0.1, 0.5):
        s = score(dpo(sft, tok, pairs, work, beta), sft, tok)
        rows.append((f"DPO on the same 2,000 pairs, β = {beta}", "-", s, None, None))
        points["DPO"].append((beta, s))

    # RLAIF: a judge with a planted position bias (+1.5 logits on whatever is shown first) and noise
    judge_tok = train_char(texts=["abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 :.,?!\n'-"])
    judge = Judge(toy.BiasedReviewJudge(judge_tok, scale=2.0, bias=1.5, noise=0.5), judge_tok, labels=("A", "B"))
    jrows, truth = toy.judge_rows(600, seed=3)
    one = agreement(judge.label_pairs(jrows, both_orders=False), truth)
    labelled = judge.label_pairs(jrows, both_orders=True)
    both = agreement(labelled, truth)
    ai_rm = toy.train_reward_model(sft, tok, labelled, steps=300, out_dir=str(work / "ai_rm"))
    ai_acc = toy.held_out_accuracy(ai_rm, tok, held_out)
    policy, seconds, _ = ppo(sft, tok, ai_rm, work, "ppo_rlaif", kl_coef=1.0)
    rlaif = score(policy, sft, tok)
    rows.append(("RLAIF: PPO on the judge-labelled reward model, β = 1", "fixed", rlaif, seconds, None))

    png = RESULTS / "ppo_toy_frontier.png"
    plot(points, base, adaptive, rlaif, png)
    write(rows, rm_acc, one, both, ai_acc, len(jrows), png, time.time() - started)


def plot(points, base, adaptive, rlaif, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, marker in (("PPO", "o-"), ("DPO", "s--")):
        xs, ys = [p[1]["kl"] for p in points[name]], [p[1]["reward"] for p in points[name]]
        ax.plot(xs, ys, marker, label=f"{name} (fixed β)")
        for beta, p in points[name]:
            ax.annotate(f"β={beta}", (p["kl"], p["reward"]), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.plot([adaptive["kl"]], [adaptive["reward"]], "^", label="PPO, adaptive KL (target 6)")
    ax.plot([rlaif["kl"]], [rlaif["reward"]], "D", label="RLAIF (judge-labelled RM), β=1")
    ax.plot([0], [base["reward"]], "k*", markersize=10, label="SFT model")
    ax.set_xlabel("KL(π ‖ π_SFT) per completion, nats (sampled)")
    ax.set_ylabel("true reward E[R]")
    ax.set_title("Toy reviews: true reward against KL to the SFT model")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def write(rows, rm_acc, one, both, ai_acc, n_judged, png, seconds):
    lines = ["# PPO-RLHF, DPO and RLAIF on the toy review task (true reward known)", "",
             f"Machine: {machine_line()}. `benchmarks/bench_ppo_toy.py`, seeded, {seconds:.0f} s in all.", "",
             "Task: `llmkit.align.toy_reviews`: prompts \"review of the <item>:\", completions \" it was w1, w2 "
             "and w3.\" with words from 6 positive, 6 negative, 6 neutral; true reward R = (#positive − "
             "#negative) / max(3, #words). SFT model: a 2-layer d=64 Llama (character tokenizer), 300 steps. "
             "Every policy is scored on 256 fresh prompts, one sample each at τ = 1, 32 new tokens at most: E[R], "
             "and the KL to the SFT model per completion (Σ_t log π − log π_ref over the sampled tokens).", "",
             f"- Reward model (Bradley–Terry on 2,000 pairs ranked by R, 300 steps): held-out accuracy "
             f"**{rm_acc:.3f}** on 500 pairs.",
             f"- RLAIF judge (planted position bias +1.5 logits on the first response, noise σ = 0.5) on "
             f"{n_judged} pairs: agreement with R **{one:.3f}** one order → **{both:.3f}** averaged over both orders.",
             f"- Reward model trained on the judge's both-order labels: held-out accuracy **{ai_acc:.3f}** "
             "(against the true ranking).", "",
             "| policy | KL control | true reward E[R] | KL to SFT (nats) | seconds |", "|---|---|---|---|---|"]
    for name, control, s, secs, _ in rows:
        lines.append(f"| {name} | {control} | {s['reward']:.3f} | {s['kl']:.2f} | "
                     f"{'' if secs is None else f'{secs:.1f}'} |")
    lines += ["", f"![true reward against KL]({png.name})", "",
              "PPO runs: 25 rollouts of 32 completions (30 for the adaptive one), 2 epochs of 2 minibatches each, "
              "lr 3e-4, k1 KL, shared critic, GAE γ = 1, λ = 0.95. DPO: 150 steps, batch 32, lr 3e-4, reference the "
              "SFT model. Seconds are wall time of the run on this machine (PPO includes its rollouts)."]
    (RESULTS / "ppo_toy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
