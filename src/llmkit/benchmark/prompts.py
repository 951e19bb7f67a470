"""The prompts a serving benchmark sends.

A JSONL file, one request per line, each line an object with one of:
    "prompt":   a string (sent as the user message on the chat endpoint),
    "messages": a list of {"role", "content"} (chat endpoint; on completions, the last message's content),
    "turns":    a list of strings, MT-Bench style (the first turn is the prompt).
Without a file: the first turns of MT-Bench's 80 questions (../shared/data/mt_bench_questions.jsonl beside
the checkout, or $LLMKIT_SHARED_DATA/mt_bench_questions.jsonl), else a few synthetic prompts.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

from ..recipes import RecipeError

Prompt = Union[str, list]   # a text, or a chat's list of messages

SYNTHETIC = ["Write a short story about a lighthouse keeper who finds a message in a bottle.",
             "Explain, step by step, how a bicycle's gears make climbing a hill easier.",
             "List five ideas for a rainy afternoon and say why each one is fun.",
             "Describe the water cycle to a ten-year-old in a few paragraphs."]


def default_prompts_file() -> Path:
    shared = os.environ.get("LLMKIT_SHARED_DATA")
    base = Path(shared) if shared else Path(__file__).resolve().parents[3].parent / "shared" / "data"
    return base / "mt_bench_questions.jsonl"


def load_prompts(path: Optional[str]) -> list[Prompt]:
    """The prompts of the JSONL `path` (a RecipeError, a ValueError, names the line and what is wrong), or the
    built-in set."""
    if path is None:
        default = default_prompts_file()
        return _read(default) if default.is_file() else list(SYNTHETIC)
    return _read(Path(path))


def _read(path: Path) -> list[Prompt]:
    prompts: list[Prompt] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"prompts={str(path)!r} line {lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RecipeError(f"{where}: not valid JSON ({exc})") from exc
            if not isinstance(row, dict):
                raise RecipeError(f"{where}: expected a JSON object, found {type(row).__name__}")
            prompts.append(_prompt_of(row, where))
    if not prompts:
        raise RecipeError(f"prompts={str(path)!r}: no prompts in the file; expected JSONL lines with 'prompt'")
    return prompts


def _prompt_of(row: dict, where: str) -> Prompt:
    if isinstance(row.get("prompt"), str):
        return row["prompt"]
    messages = row.get("messages")
    if isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        return messages
    turns = row.get("turns")
    if isinstance(turns, list) and turns and isinstance(turns[0], str):
        return turns[0]
    raise RecipeError(f"{where}: expected 'prompt' (a string), 'messages' (a list of {{'role', 'content'}}) "
                     f"or 'turns' (a list of strings); found keys {sorted(row)}")


def as_messages(prompt: Prompt) -> list:
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def as_text(prompt: Prompt) -> str:
    return prompt[-1]["content"] if isinstance(prompt, list) else prompt
