"""Preference data: read, normalise, tokenize and batch.

Accepted rows (one dict each; `read_rows` reads .jsonl, .jsonl.gz, .json or takes a list):

    {"prompt", "chosen", "rejected"}     paired preference (strings); an optional "label" p in [0, 1]
                                         is a soft preference P(chosen ≻ rejected) (an AI judge's,
                                         RLAIF / RL-CAI): the reward model's cross-entropy target
    {"chosen", "rejected"}               full HH-RLHF dialogues ("\n\nHuman: … \n\nAssistant: …"):
                                         the shared prompt is everything up to the last
                                         "\n\nAssistant:", the completion is what follows it
    {"prompt", "completion", "label"}    unpaired (KTO): label true = desirable
    message lists                        "chosen"/"rejected" (and optionally "prompt") as lists of
                                         {"role", "content"}: rendered with the tokenizer's chat
                                         template; the prompt is every message before the final
                                         assistant turn, rendered with the generation prompt

Choices, and why:
- Tokens: prompt_ids = prefix_ids + encode(prompt); completion_ids = encode(completion) + [eos], so
  the policy learns where the answer stops.
- Truncation: when prompt + completion exceed max_length, the prompt loses tokens from its start
  (the end of a prompt is what the answer depends on) down to max_prompt_length, then the
  completion loses tokens from its end; max_prompt_length < max_length, so a completion always
  keeps at least one token. A pair's two completions share one truncated prompt.
- Soft labels: a paired example keeps "label" and `collate_pairs` carries it as "label" (B,) float,
  which `RewardObjective` hands to `reward_loss(label=...)`; in a batch where only some pairs carry
  one, the others count as hard preferences (p = 1).
- Empty completions (empty or whitespace only) are an error naming the row and field: there is
  nothing to score.
- chosen == rejected (as text, or after truncation): the pair carries no preference and its DPO
  gradient is exactly zero. `identical="drop"` (default) drops such pairs with a warning that
  counts them and names the first rows; `identical="error"` raises instead.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from ..data.epochs import EpochBatches
from ..data.errors import DataError
from ..data.readers import read_records

ASSISTANT = "\n\nAssistant:"
HUMAN = "\n\nHuman:"
IDENTICAL = ("drop", "error")


# ---- reading and normalising rows -----------------------------------------------------------------
def read_rows(source: Any) -> list[dict]:
    """Rows from a .jsonl / .jsonl.gz / .json (a list of objects) / .tsv / .csv file, or a list of dicts as is."""
    if isinstance(source, (list, tuple)):
        return list(source)
    path = Path(source)
    if not path.is_file():
        raise DataError(f"data.source={str(source)!r}: file not found (expected .jsonl, .jsonl.gz or .json)")
    data, _ = read_records(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, found {type(data).__name__}")
    return data


def split_dialogue(text: str, where: str = "text") -> tuple[str, str]:
    """An HH-RLHF dialogue -> (prompt ending in "\n\nAssistant:", the final response); prompt + response == text."""
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise DataError(f"{where}: no {ASSISTANT!r} turn in {text[:60]!r}...: expected an HH-RLHF dialogue "
                        "('\\n\\nHuman: ... \\n\\nAssistant: ...') or an explicit 'prompt' field")
    cut += len(ASSISTANT)
    return text[:cut], text[cut:]


def first_human_turn(text: str, where: str = "text") -> str:
    """The first Human turn of an HH-RLHF dialogue, stripped: the prompt of a one-turn conversation."""
    start = text.find(HUMAN)
    if start < 0:
        raise DataError(f"{where}: no {HUMAN!r} turn in {text[:60]!r}...: expected an HH-RLHF dialogue")
    start += len(HUMAN)
    ends = [i for i in (text.find(ASSISTANT, start), text.find(HUMAN, start)) if i >= 0]
    return text[start:min(ends) if ends else len(text)].strip()


def _render_messages(messages: Any, tokenizer, where: str) -> tuple[str, str]:
    """Chat messages -> (prompt text with the generation prompt, final assistant turn's text)."""
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise DataError(f"{where}: expected a non-empty list of {{'role', 'content'}} messages")
    if messages[-1].get("role") != "assistant":
        raise DataError(f"{where}: the last message has role {messages[-1].get('role')!r}: expected 'assistant'")
    if tokenizer is None:
        raise DataError(f"{where}: message lists need a tokenizer with a chat template")
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages)
    if not full.startswith(prompt):
        raise DataError(f"{where}: the chat template does not render the conversation as prompt + reply, so "
                        "the completion cannot be cut out; pass 'prompt' and completion strings instead")
    return prompt, full[len(prompt):]


def _completion(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}={value!r}: expected a string")
    if not value.strip():
        raise DataError(f"{where}={value!r}: empty completion: expected text to score")
    return value


def normalize_row(row: Any, index: int, tokenizer=None) -> dict:
    """One row in any accepted shape -> {"prompt", "chosen", "rejected"} or {"prompt", "completion", "label"}."""
    where = f"row {index}"
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, found {type(row).__name__}")
    if "completion" in row or ("label" in row and "chosen" not in row and "rejected" not in row):
        missing = [k for k in ("prompt", "completion", "label") if k not in row]
        if missing:
            raise DataError(f"{where}: missing {missing}: expected the keys prompt, completion, label (unpaired)")
        if not isinstance(row["label"], bool):
            raise DataError(f"{where}: label={row['label']!r}: expected true (desirable) or false (undesirable)")
        if isinstance(row["completion"], list):
            prompt, completion = _render_messages(row["prompt"] + row["completion"], tokenizer, f"{where}.completion")
        else:
            prompt, completion = row["prompt"], row["completion"]
        if not isinstance(prompt, str):
            raise DataError(f"{where}.prompt={prompt!r}: expected a string")
        return {"prompt": prompt, "completion": _completion(completion, f"{where}.completion"),
                "label": row["label"]}
    missing = [k for k in ("chosen", "rejected") if k not in row]
    if missing:
        raise DataError(f"{where}: missing {missing}: expected keys (prompt,) chosen, rejected; or prompt, "
                        f"completion, label; found {sorted(row)}")
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, list) or isinstance(rejected, list):
        prefix = row.get("prompt", [])
        if not isinstance(prefix, list):
            raise DataError(f"{where}.prompt: expected a message list like chosen/rejected")
        prompt, chosen = _render_messages(prefix + chosen, tokenizer, f"{where}.chosen")
        prompt_r, rejected = _render_messages(prefix + rejected, tokenizer, f"{where}.rejected")
    elif "prompt" in row:
        prompt = prompt_r = row["prompt"]
    else:
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            raise DataError(f"{where}: chosen/rejected must be strings or message lists")
        prompt, chosen = split_dialogue(chosen, f"{where}.chosen")
        prompt_r, rejected = split_dialogue(rejected, f"{where}.rejected")
    if prompt != prompt_r:
        raise DataError(f"{where}: chosen and rejected have different prompts: expected two answers to the same "
                        "conversation")
    if not isinstance(prompt, str):
        raise DataError(f"{where}.prompt={prompt!r}: expected a string")
    out = {"prompt": prompt, "chosen": _completion(chosen, f"{where}.chosen"),
           "rejected": _completion(rejected, f"{where}.rejected")}
    if "label" in row:
        out["label"] = _soft_label(row["label"], f"{where}.label")
    return out


def _soft_label(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise DataError(f"{where}={value!r}: expected a soft preference P(chosen ≻ rejected), a number in [0, 1]")
    return float(value)


def normalize_rows(rows: Iterable[Any], tokenizer=None, *, bad_rows: str = "error") -> list[dict]:
    """normalize_row over all rows. bad_rows="error" stops at the first bad row; "skip" drops bad rows
    with one warning that counts them and quotes the first errors (real data sets have a few: the
    HH-RLHF harmless test file has 4 empty answers and 5 pairs whose dialogues differ before the end)."""
    if bad_rows not in ("error", "skip"):
        raise DataError(f"bad_rows={bad_rows!r}: expected 'error' or 'skip'")
    out, errors = [], []
    for i, row in enumerate(rows):
        try:
            out.append(normalize_row(row, i, tokenizer))
        except DataError as exc:
            if bad_rows == "error":
                raise
            errors.append(str(exc))
    if errors:
        warnings.warn(f"skipped {len(errors)} bad row(s) (bad_rows='skip'): " + "; ".join(errors[:3])
                      + (" ..." if len(errors) > 3 else ""), stacklevel=2)
    if not out:
        raise DataError("no usable rows")
    return out


def to_unpaired(rows: Sequence[dict]) -> list[dict]:
    """Paired rows -> unpaired KTO rows: (prompt, chosen, desirable) and (prompt, rejected, undesirable);
    unpaired rows pass through."""
    out = []
    for row in rows:
        if "completion" in row:
            out.append(row)
        else:
            out.append({"prompt": row["prompt"], "completion": row["chosen"], "label": True})
            out.append({"prompt": row["prompt"], "completion": row["rejected"], "label": False})
    return out


# ---- tokenizing --------------------------------------------------------------------------------------
def truncate(prompt: list[int], completions: Sequence[list[int]], max_length: int,
             max_prompt_length: Optional[int] = None) -> tuple[list[int], list[list[int]]]:
    """Cut prompt (from its start) and completions (from their end) so each prompt + completion fits
    max_length; the prompt keeps at least min(len, max_prompt_length) tokens, every completion >= 1."""
    max_prompt_length = max_length // 2 if max_prompt_length is None else max_prompt_length
    if not 0 <= max_prompt_length < max_length:
        raise DataError(f"max_prompt_length={max_prompt_length!r}: expected 0 <= it < max_length={max_length}")
    longest = max(len(c) for c in completions)
    if len(prompt) + longest > max_length:
        keep = max(max_length - longest, min(len(prompt), max_prompt_length))
        prompt = prompt[len(prompt) - keep:] if keep else []
    room = max_length - len(prompt)
    return prompt, [c[:room] for c in completions]


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False) if text else []


def tokenize_rows(rows: Sequence[dict], tokenizer, *, max_length: int = 512, max_prompt_length: Optional[int] = None,
                  prefix_ids: Sequence[int] = (), append_eos: bool = True, identical: str = "drop") -> list[dict]:
    """Normalised rows -> token examples: paired {"prompt_ids", "chosen_ids", "rejected_ids"} or
    unpaired {"prompt_ids", "completion_ids", "label"}. See the module docstring for the rules."""
    if identical not in IDENTICAL:
        raise DataError(f"identical={identical!r}: expected one of {list(IDENTICAL)}")
    eos = [tokenizer.eos_token_id] if append_eos and tokenizer.eos_token_id is not None else []
    out, same = [], []
    for i, row in enumerate(rows):
        prompt = list(prefix_ids) + _encode(tokenizer, row["prompt"])
        if "completion" in row:
            prompt, (completion,) = truncate(prompt, [_encode(tokenizer, row["completion"]) + eos], max_length,
                                             max_prompt_length)
            out.append({"prompt_ids": prompt, "completion_ids": completion, "label": bool(row["label"])})
            continue
        chosen, rejected = _encode(tokenizer, row["chosen"]) + eos, _encode(tokenizer, row["rejected"]) + eos
        prompt, (chosen, rejected) = truncate(prompt, [chosen, rejected], max_length, max_prompt_length)
        if chosen == rejected:
            same.append(i)
            continue
        example = {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}
        if "label" in row:
            example["label"] = float(row["label"])               # soft preference, see the module docstring
        out.append(example)
    if same:
        message = (f"{len(same)} pair(s) have chosen == rejected (as text or after truncation to max_length="
                   f"{max_length}), rows {same[:5]}{' ...' if len(same) > 5 else ''}: they carry no preference")
        if identical == "error":
            raise DataError(message + " (identical='error')")
        warnings.warn(message + "; dropped (set identical='error' to stop instead)", stacklevel=2)
    if not out:
        raise DataError("no usable preference examples left after tokenizing")
    return out


# ---- batching ----------------------------------------------------------------------------------------
def _pad(seqs: Sequence[list[int]], pad_id: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs], dtype=torch.long)


def _sequences(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """(prompt, completion) pairs -> right-padded input_ids, attention_mask, loss_mask (completion = 1)."""
    ids = [p + c for p, c in pairs]
    loss = [[0] * len(p) + [1] * len(c) for p, c in pairs]
    return {"input_ids": _pad(ids, pad_id),                                         # (N, T)
            "attention_mask": _pad([[1] * len(s) for s in ids], 0),                 # (N, T)
            "loss_mask": _pad(loss, 0)}                                             # (N, T)


def collate_pairs(examples: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Paired examples -> one concatenated batch: rows 0..B-1 chosen, B..2B-1 rejected, (2B, T);
    precomputed "ref_chosen_logps"/"ref_rejected_logps" (B,) when every example carries them; soft
    "label" (B,) when any does (1.0 for those that do not)."""
    batch = _sequences([(e["prompt_ids"], e["chosen_ids"]) for e in examples]
                       + [(e["prompt_ids"], e["rejected_ids"]) for e in examples], pad_id)
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        if all(key in e for e in examples):
            batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.float32)
    if any("label" in e for e in examples):
        batch["label"] = torch.tensor([e.get("label", 1.0) for e in examples], dtype=torch.float32)   # (B,)
    return batch


def collate_unpaired(examples: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Unpaired examples -> rows 0..B-1 (prompt_i, completion_i) and B..2B-1 the mismatched pairs
    (prompt_i, completion_{i+1 mod B}) that estimate KTO's z_ref; "desirable" (B,) bool."""
    n = len(examples)
    if n < 2:
        raise DataError(f"KTO batch of {n} example(s): z_ref needs mismatched (prompt, completion) pairs from "
                        "a batch of at least 2; raise data.batch_size")
    matched = [(e["prompt_ids"], e["completion_ids"]) for e in examples]
    mismatched = [(examples[i]["prompt_ids"], examples[(i + 1) % n]["completion_ids"]) for i in range(n)]
    batch = _sequences(matched + mismatched, pad_id)
    batch["desirable"] = torch.tensor([e["label"] for e in examples], dtype=torch.bool)
    return batch


def collate(examples: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    return collate_unpaired(examples, pad_id) if "completion_ids" in examples[0] else collate_pairs(examples, pad_id)


class PreferenceBatches(EpochBatches):
    """Endless shuffled epochs of full collated batches (seeded, resumable; see llmkit.data.epochs).

    drop_last keeps every batch the same size (KTO's z_ref and the Trainer's accumulation rely on it)."""

    def __init__(self, examples: Sequence[dict], batch_size: int, pad_id: int, *, seed: int = 0,
                 shuffle: bool = True, collate_fn: Callable = collate):
        super().__init__(list(examples), batch_size, shuffle=shuffle, seed=seed, drop_last=True)
        self.pad_id, self.collate_fn = pad_id, collate_fn
        if "completion_ids" in self.items[0] and batch_size < 2:
            collate_unpaired(self.items[:1], pad_id)              # raises the KTO batch-size error

    def collate(self, items: list) -> dict[str, torch.Tensor]:
        return self.collate_fn(items, self.pad_id)

    def fixed(self, n_batches: Optional[int] = None) -> list[dict[str, torch.Tensor]]:
        """The first n batches in order (no shuffle): for evaluation."""
        batches = list(self.iter_once())
        return batches if n_batches is None else batches[:n_batches]
