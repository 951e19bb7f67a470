"""Instruction SFT for decoders: chat-template formatting with the loss on response tokens only.

A row ({"prompt", "response"} or {"messages": [...]}) is rendered with the tokenizer's Jinja chat
template (`Tokenizer.apply_chat_template`; ChatML when it has none). The span of every assistant
turn is found by rendering prefixes of the conversation: for assistant message i,

    g_i = render(messages[:i], add_generation_prompt=True)      everything the model is given
    r_i = render(messages[:i + 1])                              ... plus its answer

so the text between g_i and r_i (the answer and the template's end-of-turn marker) is the response.
Each span is tokenized with add_special_tokens=False: the template writes the BOS/EOS it wants and
the tokenizer's post-processor never adds a second one. When the response span holds no special
token at all (a template without an end-of-turn marker), EOS is appended so the model learns to stop.

The SFT loss (Ouyang et al., 2022, "Training language models to follow instructions with human
feedback"; Wei et al., 2022, FLAN) is the causal-LM loss over response tokens only:

    L = -(1 / |R|) sum_{t in R} log P(x_t | x_<t),   R = response positions

Batches use the pretraining format (`llmkit.data.batches`): "input_ids" (B, T) and pre-shifted
"targets" (B, T) with -100 at prompt and padding positions, so `llmkit.objectives.clm_loss` is the
loss and pretraining windows can be mixed in. Right-padded batches add "attention_mask"; packed
batches (several examples per row) add "position_ids" restarting at each example and "doc_ids" so
attention stays inside each example.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from ..data.errors import DataError
# The example, its batches and the loss are shared with align's SL-CAI, so they live one layer down.
from ..objectives.sft import SFTBatches, SFTExample, pack, sft_loss  # noqa: F401  (re-exported)
from ..tokenizer import Tokenizer
from .data import Row

__all__ = ["row_messages", "encode_chat", "encode_sft_rows", "SFTExample", "SFTBatches", "sft_loss",
           "prompt_ids", "load_template"]


def load_template(template: Optional[str]) -> Optional[str]:
    """A Jinja string, or the path of a file holding one."""
    if template is not None and "{" not in template and Path(template).is_file():
        return Path(template).read_text(encoding="utf-8")
    return template


def row_messages(row: Row, shape: str, system_prompt: Optional[str] = None) -> list[dict]:
    v = row.values
    if shape == "messages":
        messages = v["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{row.where}: column 'messages' = {str(messages)[:60]!r}: expected a non-empty list "
                            "of {role, content}")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{row.where}: messages[{i}] = {str(m)[:60]!r}: expected {{role, content}} strings")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{row.where}: column 'messages' has no assistant turn: nothing to learn")
        return [dict(m) for m in messages]
    for name in ("prompt", "response"):
        if not isinstance(v[name], str):
            raise DataError(f"{row.where}: column {name!r} = {v[name]!r}: expected a string")
    if not v["response"].strip():
        raise DataError(f"{row.where}: column 'response' is empty: nothing to learn")
    system = v.get("system") or system_prompt
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": v["prompt"]}, {"role": "assistant", "content": v["response"]}]


def _render(tokenizer: Tokenizer, messages, template, generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=generation, chat_template=template)


def chat_segments(tokenizer: Tokenizer, messages: Sequence[dict], template: Optional[str],
                  where: str = "") -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_response) pieces."""
    full = _render(tokenizer, messages, template, False)
    pieces, pos = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        given = _render(tokenizer, messages[:i], template, True) if i else ""
        upto = _render(tokenizer, messages[:i + 1], template, False)
        if not (full.startswith(upto) and upto.startswith(given) and len(given) >= pos):
            raise DataError(f"{where}: the chat template does not render the conversation up to message {i} as a "
                            "prefix of the whole one, so the response span cannot be found; use a template "
                            "that renders turns in order (data.chat_template)")
        pieces += [(full[pos:len(given)], False), (full[len(given):len(upto)], True)]
        pos = len(upto)
    pieces.append((full[pos:], False))
    return [(text, is_response) for text, is_response in pieces if text]


def encode_chat(tokenizer: Tokenizer, messages: Sequence[dict], template: Optional[str] = None,
                where: str = "") -> SFTExample:
    """Token ids and the response mask of one conversation (no special token added twice)."""
    ids: list[int] = []
    mask: list[int] = []
    for text, is_response in chat_segments(tokenizer, messages, template, where):
        piece = tokenizer.encode(text, add_special_tokens=False)
        if is_response and tokenizer.eos_token_id is not None and not (set(piece) & tokenizer.special_ids):
            piece = piece + [tokenizer.eos_token_id]          # no end-of-turn marker: teach the model to stop
        ids += piece
        mask += [int(is_response)] * len(piece)
    return SFTExample(ids, mask, where)


def prompt_ids(tokenizer: Tokenizer, messages: Sequence[dict], template: Optional[str] = None) -> list[int]:
    """The ids a model is given to answer the last assistant turn (for generation / exact match):
    the training encoding of the conversation, cut where that turn's response starts, so a prompt
    is tokenized exactly as it was in training."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    example = encode_chat(tokenizer, messages[:last + 1], template)
    start = len(example.mask)
    while start > 0 and example.mask[start - 1] == 0:     # trailing template text after the answer
        start -= 1
    while start > 0 and example.mask[start - 1] == 1:     # back to where the last answer starts
        start -= 1
    return example.ids[:start]


def truncate_example(example: SFTExample, max_len: int, side: str) -> SFTExample:
    if len(example.ids) <= max_len:
        return example
    cut = slice(0, max_len) if side == "right" else slice(len(example.ids) - max_len, None)
    return SFTExample(example.ids[cut], example.mask[cut], example.where)


def encode_sft_rows(rows: list[Row], shape: str, tokenizer: Tokenizer, *, max_len: int, truncation: str = "right",
                    on_empty_response: str = "error", template: Optional[str] = None,
                    system_prompt: Optional[str] = None) -> tuple[list[SFTExample], int]:
    """(examples, dropped): every row formatted, masked and truncated to max_len tokens.

    A row whose response tokens are all cut by truncation raises (naming the row, its length and
    max_len), or with on_empty_response="drop" is dropped and counted."""
    examples, dropped = [], 0
    for row in rows:
        full = encode_chat(tokenizer, row_messages(row, shape, system_prompt), template, row.where)
        cut = truncate_example(full, max_len, truncation)
        if not any(cut.mask[1:]):      # position 0 is never a target: it has no token before it
            if on_empty_response == "drop":
                dropped += 1
                continue
            prompt_len = full.mask.index(1) if 1 in full.mask else len(full.ids)
            raise DataError(f"{row.where}: the response is left empty by truncation: the example has "
                            f"{len(full.ids)} tokens ({prompt_len} before the response) and data.max_len={max_len} "
                            f"with data.truncation={truncation!r}; raise data.max_len, shorten the prompt, use "
                            "truncation=left, or set data.on_empty_response=drop to skip such rows")
        examples.append(cut)
    if not examples:
        raise DataError(f"all {len(rows)} rows were dropped by truncation (data.max_len={max_len})")
    return examples, dropped
