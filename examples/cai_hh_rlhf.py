"""Constitutional AI on HH-RLHF prompts, on CPU (Bai et al. 2022; see llmkit/align/cai.py).

    .venv/bin/python examples/cai_hh_rlhf.py                          # fresh tiny Llama: a smoke run
    .venv/bin/python examples/cai_hh_rlhf.py --checkpoint runs/demo/sft/model --prompts 64 --rounds 2

1. SL-CAI: the first Human turn of the first --prompts dialogues of the HH-RLHF harmless test file,
   answered, critiqued and revised --rounds times under sampled principles of the constitution;
   then SFT on (prompt, final revision). Prints the SFT loss on the revisions before -> after.
2. RL-CAI: each (initial response, final revision) pair labelled by a frozen copy of the model as
   its feedback model, --principles-per-pair principles per pair; a reward model (the model's stack
   plus a scalar head) trained on the soft labels with the cross-entropy reward loss.

No `llmkit` command runs CAI (there is no job wiring for it yet): this script is its entry point.
Leaves in --out: sl_cai_rows.jsonl, rl_cai_labels.jsonl, sft/ and rm/ (Trainer outputs), summary.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import torch

import llmkit
from llmkit.align import (PreferenceBatches, RewardObjective, first_human_turn, frozen_copy, normalize_rows,
                          read_rows, reward_model_from, tokenize_rows)
from llmkit.align.cai import (CRITIQUE, HUMAN, PREFERENCE, REVISION, critique_and_revise, dialogue,
                              harmlessness_labels, revision_examples, sl_cai_sft)
from llmkit.align.constitution import load_constitution
from llmkit.objectives.sft import SFTBatches, sft_loss
from llmkit.tokenizer import train_char
from llmkit.train import TrainConfig, Trainer

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LLMKIT_SHARED_DATA", REPO.parent / "shared" / "data")) / "hh_rlhf_harmless_test.jsonl.gz"


def model_and_tokenizer(args, texts):
    if args.checkpoint:
        from llmkit.jobs.artifacts import load_artifacts
        saved = load_artifacts(args.checkpoint)
        return saved.model, saved.tokenizer
    tok = train_char(texts=texts, special_tokens=("<pad>", "<|endoftext|>"), pad_token="<pad>")
    torch.manual_seed(args.seed)
    config = llmkit.get_preset("llama-tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)
    return llmkit.build_model(config), tok


def mean_sft_loss(model, tokenizer, rows) -> float:
    batches = list(SFTBatches(revision_examples(rows, tokenizer), 8, tokenizer.pad_id, shuffle=False).iter_once())
    model.eval()
    with torch.no_grad():
        return sum(sft_loss(model, b)[0].item() for b in batches) / len(batches)


def train_config(args, out: Path, steps: int) -> TrainConfig:
    return TrainConfig(out_dir=out, lr=args.lr, max_steps=steps, warmup_steps=0, log_every=max(steps // 5, 1),
                       device=args.device, seed=args.seed, tensorboard=False, progress=False, plot=False)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--checkpoint", default=None, help="a model folder (llmkit or Hugging Face); default: fresh")
    parser.add_argument("--constitution", default=None, help="a .yaml/.json constitution; default: the packaged one")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--sft-steps", type=int, default=60)
    parser.add_argument("--rm-steps", type=int, default=30)
    parser.add_argument("--principles-per-pair", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/cai_hh_rlhf")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    prompts = [first_human_turn(r["chosen"], f"row {i}") for i, r in enumerate(read_rows(args.data)[:args.prompts])]
    constitution = load_constitution(args.constitution)
    texts = prompts + [HUMAN, CRITIQUE, REVISION, PREFERENCE, "AB"] + [
        p.critique + p.revision + p.preference for p in constitution.principles]
    model, tok = model_and_tokenizer(args, texts)

    # 1. SL-CAI
    rows = critique_and_revise(model, tok, prompts, constitution, rounds=args.rounds,
                               max_new_tokens=args.max_new_tokens, seed=args.seed)
    (out / "sl_cai_rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = mean_sft_loss(model, tok, rows)
    sft = sl_cai_sft(model, tok, rows, config=train_config(args, out / "sft", args.sft_steps), val_rows=rows)
    summary = {"prompts": len(prompts), "rounds": args.rounds, "sft_loss_before": before,
               "sft_loss_after": sft.val_loss}
    print(f"SL-CAI: {len(rows)} revisions; SFT loss on them {before:.3f} -> {sft.val_loss:.3f}")

    # 2. RL-CAI: the model's first answer against its final revision, judged by a frozen copy of it
    pairs = [{"prompt": r["prompt"], "a": r["response"], "b": r["revision"]} for r in rows
             if r["response"].strip() and r["revision"].strip() and r["response"] != r["revision"]]
    labels = (" A", " B") if len(tok.encode(" A", add_special_tokens=False)) == 1 else ("A", "B")
    labelled = harmlessness_labels(frozen_copy(model), tok, pairs, constitution,
                                   principles_per_pair=args.principles_per_pair, seed=args.seed, labels=labels)
    (out / "rl_cai_labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in labelled))
    summary.update(pairs=len(labelled), revision_preferred=sum(r["chosen"] == p["b"] for r, p in zip(labelled, pairs)),
                   mean_label=sum(r["label"] for r in labelled) / max(len(labelled), 1))
    if len(labelled) >= 2:
        hh = [{"prompt": dialogue(r["prompt"]), "chosen": " " + r["chosen"], "rejected": " " + r["rejected"],
               "label": r["label"]} for r in labelled]
        examples = tokenize_rows(normalize_rows(hh), tok, max_length=512)
        reward_model = reward_model_from(copy.deepcopy(model))
        batches = PreferenceBatches(examples, min(8, len(examples)), tok.pad_id, seed=args.seed)
        rm = Trainer(reward_model, RewardObjective().loss, batches,
                     config=train_config(args, out / "rm", args.rm_steps)).fit()
        summary.update(rm_loss=rm.train_loss, rm_accuracy=rm.metrics.get("rewards/accuracies"))
    print(f"RL-CAI: {summary['pairs']} pairs, revision preferred in {summary['revision_preferred']}, "
          f"mean label {summary['mean_label']:.3f}; reward model loss {summary.get('rm_loss')}")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
