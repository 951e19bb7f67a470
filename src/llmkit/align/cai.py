"""Constitutional AI (Bai et al. 2022, "Constitutional AI: Harmlessness from AI Feedback"), both stages.

SL-CAI (`critique_and_revise`, then `sl_cai_sft`). For each prompt x the model answers, y_0; then
for rounds k = 1..K a principle c_k is drawn from the constitution (seeded) and the model writes

    critique_k = M(x, y_{k-1}, c_k.critique)          "CritiqueRequest: ... Critique:"
    y_k        = M(x, y_{k-1}, c_k.critique, critique_k, c_k.revision)   "... Revision:"

(the paper's transcript format, below). Each round restarts from "Human: x / Assistant: y_{k-1}" so
the context stays one critique long however many rounds run. The model is then fine-tuned on
(x, y_K) with the SFT loss over response tokens, L = −(1/|y_K|) Σ_t log π(y_K,t | x, y_K,<t)
(`objectives.sft`, the loss `llmkit finetune` uses).

RL-CAI (`harmlessness_labels`). For a pair of responses (a, b) to x, a feedback model is asked each
of N principles' preference questions (N drawn per pair, seeded); each is an RLAIF `Judge`
(P(A ≻ B) from the label tokens' log-probs, averaged over both orders), and the ensemble is

    P(a ≻ b) = (1/N) Σ_n P_n(a ≻ b)

giving a preference row {prompt, chosen, rejected, label = max(P, 1 − P) ≥ ½}: the soft target of
the reward model's cross-entropy (`RewardObjective`, `losses.reward_loss(label=...)`).

Generation is batched and greedy by default (`on_policy.complete`); prompts are plain text in the
HH-RLHF layout, as `align.data` reads it, so the SFT rows are tokenized as `tokenize_rows` does.
"""
from __future__ import annotations

import random
import warnings
from typing import Optional, Sequence

import torch

from ..objectives.sft import SFTBatches, SFTExample, sft_loss
from ..train import TrainConfig, Trainer
from .constitution import Constitution
from .data import tokenize_rows
from .judge import Judge
from .on_policy import complete

HUMAN = "\n\nHuman: {prompt}\n\nAssistant:"
CRITIQUE = "\n\nCritiqueRequest: {request}\n\nCritique:"
REVISION = "\n\nRevisionRequest: {request}\n\nRevision:"
PREFERENCE = ("Consider this conversation between a human and an assistant.\nHuman: {prompt}\n"
              "{question}\nResponse A: {a}\nResponse B: {b}\n{rationale}Preferred response:")


def dialogue(prompt: str, response: Optional[str] = None) -> str:
    """The HH-RLHF text of a one-turn conversation; without a response, the generation prompt."""
    return HUMAN.format(prompt=prompt) + ("" if response is None else " " + response)


# ---- SL-CAI --------------------------------------------------------------------------------------
def critique_and_revise(model, tokenizer, prompts: Sequence[str], constitution: Constitution, *, rounds: int = 1,
                        max_new_tokens: int = 64, seed: int = 0, batch_size: int = 16, prefix_ids: Sequence[int] = (),
                        do_sample: bool = False, temperature: float = 1.0) -> list[dict]:
    """Prompts -> rows {prompt, response (y_0), steps: [{principle, critique, revision}] * rounds,
    revision (y_K)}. See the module docstring. Answers are stripped; an empty revision is recorded
    in its step but does not replace the response it revises (there would be nothing to train on)."""
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds={rounds!r}: expected an int >= 1")
    rng = random.Random(seed)
    generator = None
    if do_sample:
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    args = dict(prefix_ids=prefix_ids, max_new_tokens=max_new_tokens, batch_size=batch_size, do_sample=do_sample,
                temperature=temperature, generator=generator)

    def ask(texts: list[str]) -> list[str]:
        return [answer.strip() for answer in complete(model, tokenizer, texts, **args)]

    prompts = list(prompts)
    current = ask([dialogue(p) for p in prompts])                                  # y_0 per prompt
    rows = [{"prompt": p, "response": y, "steps": []} for p, y in zip(prompts, current)]
    for _ in range(rounds):
        principles = [rng.choice(constitution.principles) for _ in prompts]       # one draw per row, row order
        critique_asks = [dialogue(p, y) + CRITIQUE.format(request=c.critique)
                         for p, y, c in zip(prompts, current, principles)]
        critiques = ask(critique_asks)
        revisions = ask([a + " " + k + REVISION.format(request=c.revision)
                         for a, k, c in zip(critique_asks, critiques, principles)])
        for i, (c, k, y) in enumerate(zip(principles, critiques, revisions)):
            rows[i]["steps"].append({"principle": c.name, "critique": k, "revision": y})
            if y:
                current[i] = y
    for row, y in zip(rows, current):
        row["revision"] = y
    return rows


def revision_examples(rows: Sequence[dict], tokenizer, *, max_length: int = 512,
                      prefix_ids: Sequence[int] = ()) -> list[SFTExample]:
    """SL-CAI rows -> SFT examples: prompt = the HH generation prompt of x, response = " " + y_K (+ EOS),
    tokenized and truncated by `tokenize_rows`; the loss mask covers the response. Rows whose
    final revision is empty are dropped with a warning that counts them."""
    usable = [{"prompt": dialogue(r["prompt"]), "completion": " " + r["revision"], "label": True}
              for r in rows if r["revision"].strip()]
    if len(usable) < len(rows):
        warnings.warn(f"revision_examples: {len(rows) - len(usable)} of {len(rows)} rows have an empty revision "
                      "and were dropped", stacklevel=2)
    tokens = tokenize_rows(usable, tokenizer, max_length=max_length, prefix_ids=prefix_ids)
    out = []
    for i, t in enumerate(tokens):
        prompt, response = t["prompt_ids"], t["completion_ids"]
        out.append(SFTExample(prompt + response, [0] * len(prompt) + [1] * len(response), where=f"revision {i}"))
    return out


def sl_cai_sft(model, tokenizer, rows: Sequence[dict], *, config: TrainConfig, batch_size: int = 8,
               max_length: int = 512, prefix_ids: Sequence[int] = (), val_rows: Optional[Sequence[dict]] = None,
               callbacks: Sequence = ()):
    """SFT of `model` on (x, y_K) of SL-CAI rows with `llmkit.train.Trainer`; returns its TrainResult.
    val_rows (SL-CAI rows too) give the validation SFT loss."""
    examples = revision_examples(rows, tokenizer, max_length=max_length, prefix_ids=prefix_ids)
    train = SFTBatches(examples, batch_size, tokenizer.pad_id, seed=config.seed)
    val = None
    if val_rows:
        val_examples = revision_examples(val_rows, tokenizer, max_length=max_length, prefix_ids=prefix_ids)
        val = list(SFTBatches(val_examples, batch_size, tokenizer.pad_id, shuffle=False).iter_once())
    return Trainer(model, sft_loss, train, val_data=val, config=config, callbacks=callbacks).fit()


# ---- RL-CAI --------------------------------------------------------------------------------------
def principle_judges(judge_model, tokenizer, constitution: Constitution, *, labels: Sequence[str] = (" A", " B"),
                     template: str = PREFERENCE) -> dict[str, Judge]:
    """One RLAIF Judge per principle, its template carrying the principle's preference question."""
    if "{question}" not in template:
        raise ValueError(f"template: no {{question}} field in {template[:60]!r}...: expected one for the "
                         "principle's preference question")
    judges = {}
    for p in constitution.principles:
        question = p.preference.replace("{", "{{").replace("}", "}}")   # the Judge formats the template again
        judges[p.name] = Judge(judge_model, tokenizer, template=template.replace("{question}", question),
                               labels=labels)
    return judges


def harmlessness_labels(judge_model, tokenizer, rows: Sequence[dict], constitution: Constitution, *,
                        principles_per_pair: int = 4, seed: int = 0, both_orders: bool = True,
                        labels: Sequence[str] = (" A", " B"), template: str = PREFERENCE) -> list[dict]:
    """Rows {prompt, a, b} -> preference rows {prompt, chosen, rejected, label, principles}: label is
    the ensemble P(chosen ≻ rejected) >= 0.5 over `principles_per_pair` principles drawn per pair
    (all of them when there are fewer), each averaged over both orders unless both_orders=False."""
    if not isinstance(principles_per_pair, int) or principles_per_pair < 1:
        raise ValueError(f"principles_per_pair={principles_per_pair!r}: expected an int >= 1")
    judges = principle_judges(judge_model, tokenizer, constitution, labels=labels, template=template)
    rng = random.Random(seed)
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("prompt", "a", "b")):
            raise ValueError(f"harmlessness_labels: row {i} = {str(row)[:80]!r}: expected {{'prompt', 'a', 'b'}} "
                             "strings")
        drawn = constitution.sample(rng, principles_per_pair)
        probs = [judges[p.name].prefer(row["prompt"], row["a"], row["b"], both_orders) for p in drawn]
        p = sum(probs) / len(probs)                                               # ensemble P(a ≻ b)
        chosen, rejected = (row["a"], row["b"]) if p >= 0.5 else (row["b"], row["a"])
        out.append({"prompt": row["prompt"], "chosen": chosen, "rejected": rejected, "label": max(p, 1 - p),
                    "principles": [q.name for q in drawn]})
    return out
