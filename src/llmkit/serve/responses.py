"""Response bodies and stream chunks in the OpenAI shapes, built from the engine's outputs.

    /v1/completions       {"id": "cmpl-…", "object": "text_completion", "created", "model",
                           "choices": [{"index", "text", "logprobs", "finish_reason"}], "usage"}
    /v1/chat/completions  {"id": "chatcmpl-…", "object": "chat.completion", "created", "model",
                           "choices": [{"index", "message": {"role", "content"}, "logprobs",
                                        "finish_reason"}], "usage"}

Streams send the same objects with "object": "text_completion" / "chat.completion.chunk", one id
on every chunk, a "delta" instead of "message" in chat (the role in the first delta of each
choice), finish_reason on the chunk with the last text, and, with stream_options.include_usage,
"usage": null on every chunk and a final chunk with no choices and the totals.
Logprobs: completions use the legacy {"tokens", "token_logprobs", "top_logprobs", "text_offset"};
chat uses {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}.
"""
from __future__ import annotations

import json
from typing import Optional

class TextDelta:
    """The new text of one streamed choice, from the engine's text so far (already cut at a stop
    string). While the choice runs it holds back a trailing U+FFFD (an incomplete UTF-8 character
    the next token completes) and the last len(longest stop) - 1 characters: a stop string that is
    still being completed must never reach the client, since the final text is cut before it."""

    def __init__(self, stops=()):
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.shown = ""

    def update(self, text: str, finished: bool) -> str:
        upto = len(text)
        if not finished:
            upto -= self.hold
            while upto > 0 and text[upto - 1] == "\ufffd":
                upto -= 1
        if upto <= len(self.shown):
            return ""
        piece, self.shown = text[len(self.shown):upto], text[:upto]
        return piece


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def chat_logprobs(tokenizer, entries: list[dict]) -> list[dict]:
    def item(tid, lp):
        s = token_text(tokenizer, tid)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
    return [dict(item(e["token"], e["logprob"]), top_logprobs=[item(t, lp) for t, lp in e["top"]])
            for e in entries]


def completion_logprobs(tokenizer, entries: list[dict], offset: int) -> dict:
    """The legacy shape; text_offset counts characters from `offset` (the choice's text start)."""
    tokens = [token_text(tokenizer, e["token"]) for e in entries]
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{token_text(tokenizer, t): lp for t, lp in e["top"]} for e in entries],
            "text_offset": offsets}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion_choice(index: int, text: str, finish: Optional[str], logprobs=None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def chat_choice(index: int, text: str, finish: Optional[str], logprobs=None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text},
            "logprobs": None if logprobs is None else {"content": logprobs},
            "finish_reason": finish}


def chat_delta(index: int, delta: dict, finish: Optional[str], logprobs=None) -> dict:
    return {"index": index, "delta": delta, "logprobs": None if logprobs is None else {"content": logprobs},
            "finish_reason": finish}


def envelope(rid: str, obj: str, created: int, model: str, choices: list, **extra) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": choices, **extra}


def sse(payload) -> str:
    """One server-sent event: `data: <json>` and a blank line (`data: [DONE]` for the string)."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"
