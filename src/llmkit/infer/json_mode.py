"""Constrained decoding to one JSON object:

    grammar = JsonObject(tokenizer, eos_ids)              # once per tokenizer (masks are cached here)
    SamplingParams(allowed_tokens=grammar.constraint())   # once per request

At every step only tokens that keep the output a prefix of some valid JSON object (RFC 8259, the
top-level value an object) may be drawn, and once the object is closed only the end-of-text token
may follow, so a request that finishes with "stop" holds exactly one parseable object (one cut by
max_tokens is a prefix of one, as OpenAI's JSON mode documents).

How: a character-level pushdown automaton (`step(state, char) -> state | None`) over immutable
states (the container stack, a mode, and the mode's detail). The state after the output so far is
kept incrementally; a token is allowed if the automaton accepts every character of its text. The
mask depends only on the state, so masks are cached by state: inside a string, where most tokens
are spent, every step after the first is a lookup. Whitespace between tokens is allowed (models
write pretty JSON); max_tokens bounds a model that would only write spaces.

As in Willard & Louf 2023 (Outlines) and llama.cpp's GBNF grammars, but for the one grammar the
OpenAI API asks for, with no index built ahead.
"""
from __future__ import annotations

from typing import Optional

import torch

WS = " \t\n\r"
ESCAPES = '"\\/bfnrtu'
HEX = "0123456789abcdefABCDEF"
DIGITS = "0123456789"
LITERALS = {"t": "rue", "f": "alse", "n": "ull"}
NUM_END = ("zero", "int", "frac", "expdig")        # number states where the number may end

# state = (stack, mode, detail): stack a string of "{" / "[", mode one of
#   start | value | value_or_end | key | key_or_end | colon | after | str | esc | uhex | num | lit | done


def _value(stack: str, c: str):
    if c == "{":
        return (stack + "{", "key_or_end", None)
    if c == "[":
        return (stack + "[", "value_or_end", None)
    if c == '"':
        return (stack, "str", False)
    if c == "-":
        return (stack, "num", "minus")
    if c == "0":
        return (stack, "num", "zero")
    if c in "123456789":
        return (stack, "num", "int")
    if c in LITERALS:
        return (stack, "lit", LITERALS[c])
    return None


def _close(stack: str, c: str):
    """After a value: a comma, the matching bracket, or (at the top) nothing."""
    if not stack:
        return None
    top = stack[-1]
    if c == ",":
        return (stack, "key" if top == "{" else "value", None)
    if (c == "}" and top == "{") or (c == "]" and top == "["):
        rest = stack[:-1]
        return (rest, "after" if rest else "done", None)
    return None


def _number(stack: str, sub: str, c: str):
    nxt = {"minus": {"0": "zero", **dict.fromkeys("123456789", "int")},
           "zero": {".": "dot", "e": "exp", "E": "exp"},
           "int": {**dict.fromkeys(DIGITS, "int"), ".": "dot", "e": "exp", "E": "exp"},
           "dot": dict.fromkeys(DIGITS, "frac"),
           "frac": {**dict.fromkeys(DIGITS, "frac"), "e": "exp", "E": "exp"},
           "exp": {"+": "expsign", "-": "expsign", **dict.fromkeys(DIGITS, "expdig")},
           "expsign": dict.fromkeys(DIGITS, "expdig"),
           "expdig": dict.fromkeys(DIGITS, "expdig")}[sub]
    if c in nxt:
        return (stack, "num", nxt[c])
    if sub not in NUM_END:
        return None
    if c in WS:                                     # the number ended
        return (stack, "after", None)
    return _close(stack, c)


def step(state, c: str):
    """The state after character c, or None if no valid JSON object has the text so far + c as prefix."""
    stack, mode, detail = state
    if mode == "str":
        if c == '"':
            return (stack, "colon", None) if detail else (stack, "after" if stack else "done", None)
        if c == "\\":
            return (stack, "esc", detail)
        return state if c >= " " else None          # control characters must be escaped
    if mode == "esc":
        if c not in ESCAPES:
            return None
        return (stack, "uhex", (detail, 4)) if c == "u" else (stack, "str", detail)
    if mode == "uhex":
        if c not in HEX:
            return None
        is_key, left = detail
        return (stack, "str", is_key) if left == 1 else (stack, "uhex", (is_key, left - 1))
    if mode == "num":
        return _number(stack, detail, c)
    if mode == "lit":
        if c != detail[0]:
            return None
        return (stack, "lit", detail[1:]) if len(detail) > 1 else (stack, "after", None)
    if mode == "done":
        return state if c in WS else None
    if c in WS:
        return state
    if mode == "start":
        return ("{", "key_or_end", None) if c == "{" else None
    if mode == "value":
        return _value(stack, c)
    if mode == "value_or_end":
        return (stack[:-1], "after" if stack[:-1] else "done", None) if c == "]" else _value(stack, c)
    if mode in ("key", "key_or_end"):
        if c == '"':
            return (stack, "str", True)
        if c == "}" and mode == "key_or_end":
            rest = stack[:-1]
            return (rest, "after" if rest else "done", None)
        return None
    if mode == "colon":
        return (stack, "value", None) if c == ":" else None
    if mode == "after":
        return _close(stack, c)
    raise AssertionError(f"unknown JSON automaton mode {mode!r}")


START = ("", "start", None)


def run(text: str, state=START):
    """The state after `text` (None as soon as it cannot be a prefix of a JSON object)."""
    for c in text:
        state = step(state, c)
        if state is None:
            return None
    return state


class JsonObject:
    """The grammar for one tokenizer: each token's text and the mask of every automaton state seen
    so far (shared by all requests: build it once). `constraint()` gives one request its
    `allowed_tokens` callable, with that request's own incremental state."""

    def __init__(self, tokenizer, eos_ids, vocab_size: Optional[int] = None):
        eos_ids = [e for e in ([eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [])) if e is not None]
        if not eos_ids:
            raise ValueError("JsonObject: the model has no end-of-text token, so a closed object could never "
                             "end the completion; expected a model with eos_token_id")
        self.tokenizer, self.eos_ids = tokenizer, eos_ids
        self.vocab_size = vocab_size or tokenizer.vocab_size
        self.pieces = _pieces(tokenizer, self.vocab_size)
        self._masks: dict = {}

    def mask(self, state) -> torch.Tensor:
        """(V,) bool: the tokens whose every character the automaton accepts from `state`."""
        mask = self._masks.get(state)
        if mask is None:
            mask = torch.zeros(self.vocab_size, dtype=torch.bool)
            if state[1] == "done":
                mask[self.eos_ids] = True
            else:
                for i, piece in enumerate(self.pieces):
                    if piece and run(piece, state) is not None:
                        mask[i] = True
            self._masks[state] = mask
        return mask

    def constraint(self) -> "JsonConstraint":
        return JsonConstraint(self)


class JsonConstraint:
    """One request's `allowed_tokens`: output ids -> the grammar's mask at the state after their text
    (only end-of-text once the object is closed)."""

    def __init__(self, grammar: JsonObject):
        self.grammar = grammar
        self._text, self._state = "", START

    def state_for(self, output_ids) -> Optional[tuple]:
        text = self.grammar.tokenizer.decode(list(output_ids))
        if text.startswith(self._text):             # the usual case: one more token
            state = run(text[len(self._text):], self._state)
        else:                                       # another sample of the request, or a merge changed earlier text
            state = run(text)
        if state is not None:
            self._text, self._state = text, state
        return state

    def __call__(self, output_ids) -> torch.Tensor:
        state = self.state_for(output_ids)
        # None cannot happen through the mask (a tokenizer whose joined text differs from its pieces
        # could); then end the completion rather than write more
        return self.grammar.mask(("", "done", None) if state is None else state)


def _pieces(tokenizer, vocab_size: int) -> list[str]:
    """Each token's text ("" for special tokens, which never go inside JSON)."""
    pieces = []
    for i in range(vocab_size):
        try:
            pieces.append(tokenizer.decode([i]))
        except Exception:                           # ids past the tokenizer's vocabulary (padded embeddings)
            pieces.append("")
    return pieces
