"""`llmkit demo`: the README's first command, end to end on a laptop CPU with nothing downloaded.

It writes procedurally generated two-digit additions ("37+45=82"), trains a character tokenizer on
them, pretrains a small Llama-style decoder with the causal LM loss, and reports validation loss
and exact-match accuracy on held-out questions before and after, with a few samples. The run
folder gets the Hugging Face checkpoint (config.json, model.safetensors, tokenizer.json) and the
metrics as JSON. The training engine issue replaces the plain loop below with the Trainer.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .generation import generate
from .io import save_hf
from .model import build_model
from .presets import get_preset
from .tokenizer import train_char


def addition_lines(n: int, rng: random.Random) -> list[str]:
    return [f"{a}+{b}={a + b}" for a, b in ((rng.randrange(100), rng.randrange(100)) for _ in range(n))]


def batches(ids: list[list[int]], batch_size: int, rng: random.Random, pad: int):
    """Endless shuffled right-padded batches of (input, target); padding targets are -100."""
    while True:
        rows = rng.sample(ids, batch_size)
        width = max(map(len, rows))
        x = torch.full((batch_size, width), pad)
        for i, row in enumerate(rows):
            x[i, : len(row)] = torch.tensor(row)
        y = x[:, 1:].masked_fill(x[:, 1:] == pad, -100)
        yield x[:, :-1], y


@torch.no_grad()
def exact_match(model, tokenizer, questions: list[str], answers: list[str]) -> float:
    eos = tokenizer.eos_token_id
    correct = 0
    for question, answer in zip(questions, answers):
        prompt = torch.tensor([tokenizer.encode(question, add_special_tokens=False)])
        out = generate(model, prompt, max_new_tokens=5, stop_token_ids=[eos])
        text = tokenizer.decode(out[0, prompt.shape[1]:].tolist())
        correct += text.strip() == answer
    return correct / len(questions)


@torch.no_grad()
def validation_loss(model, val_batches) -> float:
    losses = [F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten(), ignore_index=-100).item()
              for x, y in val_batches]
    return sum(losses) / len(losses)


def run_demo(out_dir: str = "runs/demo", steps: int = 1500, seed: int = 0, batch_size: int = 64,
             lr: float = 3e-3) -> dict:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_text, val_text = addition_lines(20000, rng), addition_lines(400, rng)
    tokenizer = train_char(texts=train_text, special_tokens=("<pad>", "<|endoftext|>"), pad_token="<pad>")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    encode = lambda line: tokenizer.encode(line, add_special_tokens=False) + [eos]
    train_ids, val_ids = [encode(t) for t in train_text], [encode(t) for t in val_text]

    config = get_preset("llama-tiny", vocab_size=tokenizer.vocab_size, d_model=128, n_layers=4,
                        n_heads=4, n_kv_heads=2, d_ff=352, max_seq_len=32, eos_token_id=eos,
                        pad_token_id=pad)
    model = build_model(config)
    questions = [t.split("=")[0] + "=" for t in val_text[:200]]
    answers = [t.split("=")[1] for t in val_text[:200]]
    val_batches = [next(batches(val_ids, 100, random.Random(i), pad)) for i in range(4)]

    model.eval()
    before = {"val_loss": validation_loss(model, val_batches), "exact_match": exact_match(model, tokenizer, questions, answers)}
    print(f"before: val loss {before['val_loss']:.3f}, exact match {before['exact_match']:.1%}")

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    model.train()
    data, start = batches(train_ids, batch_size, rng, pad), time.time()
    progress = tqdm(range(steps), desc="pretrain", unit="step")
    for step in progress:
        x, y = next(data)
        loss = F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten(), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 20 == 0:
            progress.set_postfix(loss=f"{loss.item():.3f}", lr=f"{schedule.get_last_lr()[0]:.1e}")
    train_seconds = time.time() - start

    model.eval()
    after = {"val_loss": validation_loss(model, val_batches), "exact_match": exact_match(model, tokenizer, questions, answers)}
    print(f"after:  val loss {after['val_loss']:.3f}, exact match {after['exact_match']:.1%} "
          f"({steps} steps, {train_seconds:.0f} s)")
    for question in questions[:5]:
        prompt = torch.tensor([tokenizer.encode(question, add_special_tokens=False)])
        sample = generate(model, prompt, max_new_tokens=5, stop_token_ids=[eos])
        print("  sample:", tokenizer.decode(sample[0].tolist()))

    save_hf(model, out / "model")
    tokenizer.save(out / "model")
    metrics = {"before": before, "after": after, "steps": steps, "train_seconds": round(train_seconds, 1)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"wrote {out / 'model'} (Hugging Face format) and {out / 'metrics.json'}")
    return metrics
