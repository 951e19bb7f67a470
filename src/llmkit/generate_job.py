"""`llmkit generate`: one prompt, or a JSONL file of prompts, through a checkpoint.

Three ways, picked from the recipe (`cli.GenerateRecipe`):
- plain: `llmkit.generation.generate` over the one prompt; prints prompt + completion.
- `engine=true`: the prompt runs on `llmkit.infer.Engine`; the text is streamed to stdout as the
  tokens come (`Engine.stream`), decoded incrementally (`TextStream`) so that the concatenated
  pieces are exactly the plain path's text (greedy: the same tokens).
- batch, `input=prompts.jsonl output=completions.jsonl`: every line is a JSON object with "prompt"
  (a string) and optional "id" (a string or integer; default: the 0-based line index) and per-line
  sampling overrides in the engine's OpenAI convention ("max_tokens", "temperature", "top_p",
  "top_k", "seed", "stop", "n"). The whole file is checked first (JSON, keys, values, prompt
  lengths), then every request goes into one engine (continuous batching, `max_num_seqs` at a
  time) and each completion is written as it finishes - so in finishing order, not input order:

      {"id", "prompt", "completion", "finish_reason", "prompt_tokens", "completion_tokens"}

  ("completion" and "finish_reason" are lists with n > 1; "completion_tokens" then counts all
  samples, as OpenAI's usage does). Lines go to OUTPUT.partial, flushed one by one (a crash keeps
  what was done); OUTPUT.partial is renamed to OUTPUT at the end, so OUTPUT is always complete.
  A line without "seed" draws one from the engine's generator (seeded with the recipe's `seed`),
  so a rerun of the same file gives the same samples.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from .data.errors import DataError
from .jobs.tokenizers import encode_prompt
from .recipes import RecipeError

OVERRIDES = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n")
INPUT_KEYS = ("prompt", "id") + OVERRIDES


class TextStream:
    """Incremental detokenization: `push(token)` -> the text it adds. The whole sequence is decoded
    each time and only the new suffix is returned, so tokens that merge with their neighbours
    (byte-level BPE, SentencePiece spaces) come out right; a text ending in U+FFFD (an incomplete
    UTF-8 character) is held back until the next token completes it. `finish()` flushes the rest."""

    def __init__(self, tokenizer, prompt_ids):
        self.tokenizer, self.ids = tokenizer, list(prompt_ids)
        self.shown = ""

    def _emit(self, hold_partial: bool) -> str:
        text = self.tokenizer.decode(self.ids)
        if (hold_partial and text.endswith("\ufffd")) or len(text) <= len(self.shown):
            return ""
        piece, self.shown = text[len(self.shown):], text
        return piece

    def start(self) -> str:
        return self._emit(hold_partial=True)

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._emit(hold_partial=True)

    def finish(self) -> str:
        return self._emit(hold_partial=False)


@dataclass
class BatchLine:
    lineno: int                  # 1-based, for messages
    id: Union[str, int]
    prompt: str
    params: object               # llmkit.infer.SamplingParams


def read_batch(path: str, base: dict) -> list[BatchLine]:
    """Every line of the JSONL `path`, checked: a DataError names the line (1-based) and the field.
    `base` holds the recipe's SamplingParams keywords; a line's overrides replace them."""
    from .infer.params import SamplingParams
    lines, seen = [], {}
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"input={path!r} line {lineno}"
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg}); expected one JSON object per line") from exc
            if not isinstance(record, dict):
                raise DataError(f"{where}: {raw.strip()[:60]!r}: expected a JSON object with a \"prompt\"")
            unknown = sorted(set(record) - set(INPUT_KEYS))
            if unknown:
                raise DataError(f"{where}: unknown field {unknown[0]!r}: expected fields from {list(INPUT_KEYS)}")
            if not isinstance(record.get("prompt"), str):
                raise DataError(f"{where}: \"prompt\"={record.get('prompt')!r}: expected a string")
            rid = record.get("id", lineno - 1)
            if isinstance(rid, bool) or not isinstance(rid, (str, int)):
                raise DataError(f"{where}: \"id\"={rid!r}: expected a string or an integer")
            if rid in seen:
                raise DataError(f"{where}: \"id\"={rid!r} is already the id of line {seen[rid]}: expected unique ids "
                                "(a line without \"id\" takes its 0-based line index)")
            seen[rid] = lineno
            try:
                params = SamplingParams(**{**base, **{k: record[k] for k in OVERRIDES if k in record}})
            except ValueError as exc:      # "SamplingParams.top_p=2: expected a number in (0, 1]"
                raise DataError(f"{where}: {exc}") from exc
            lines.append(BatchLine(lineno, rid, record["prompt"], params))
    if not lines:
        raise DataError(f"input={path!r}: no prompts; expected one JSON object with a \"prompt\" per line")
    return lines


def _load(job):
    from .jobs.artifacts import load_artifacts
    artifacts = load_artifacts(job.model)
    if job.adapter:
        from .peft import load
        load(artifacts.model, job.adapter)
    return artifacts.model, artifacts.tokenizer


def _engine(job, model, tokenizer):
    from .infer import Engine
    speculative = job.speculative
    if speculative is not None and speculative != "ngram":
        from .jobs.artifacts import load_artifacts
        speculative = load_artifacts(speculative).model.eval()
    try:
        return Engine(model, tokenizer=tokenizer, max_num_seqs=job.max_num_seqs, seed=job.seed,
                      speculative=speculative, num_speculative_tokens=job.num_speculative_tokens)
    except ValueError as exc:                  # e.g. an encoder model, a prefix-tuning adapter
        raise RecipeError(f"model={job.model!r}: {exc}") from exc


def run_generate(job) -> None:
    """Run a validated `cli.GenerateRecipe`."""
    if job.input is not None:
        run_batch(job)
    elif job.engine:
        run_stream(job)
    else:
        run_plain(job)


def _prompt(job) -> str:
    return Path(job.prompt_file).read_text(encoding="utf-8").removesuffix("\n") if job.prompt_file else job.prompt


def run_plain(job) -> None:
    import torch

    from .generation import generate
    prompt = _prompt(job)
    model, tokenizer = _load(job)
    ids = encode_prompt(tokenizer, prompt)
    out = generate(model, torch.tensor([ids]), **job.sampling(), generator=torch.Generator().manual_seed(job.seed))
    print(tokenizer.decode(out[0].tolist()))


def run_stream(job) -> None:
    from .infer import SamplingParams
    prompt = _prompt(job)
    model, tokenizer = _load(job)
    ids = encode_prompt(tokenizer, prompt)
    engine = _engine(job, model, tokenizer)
    try:
        rid = engine.add_request(ids, SamplingParams(**job.engine_sampling(), seed=job.seed))
    except ValueError as exc:                  # the prompt is longer than the context, ...
        raise RecipeError(f"prompt: {exc}") from exc
    text = TextStream(tokenizer, ids)
    out = sys.stdout
    out.write(text.start())
    out.flush()
    for token in engine.stream(rid):
        piece = text.push(token)
        if piece:
            out.write(piece)
            out.flush()
    out.write(text.finish() + "\n")
    out.flush()


def _record(line: BatchLine, result) -> dict:
    samples = result.outputs
    many = len(samples) > 1
    return {"id": line.id, "prompt": line.prompt,
            "completion": [s.text for s in samples] if many else samples[0].text,
            "finish_reason": [s.finish_reason for s in samples] if many else samples[0].finish_reason,
            "prompt_tokens": len(result.prompt_token_ids),
            "completion_tokens": sum(len(s.token_ids) for s in samples)}


def run_batch(job) -> None:
    from tqdm import tqdm
    lines = read_batch(job.input, job.engine_sampling())       # the whole file, before the model loads
    model, tokenizer = _load(job)
    engine = _engine(job, model, tokenizer)
    for index, line in enumerate(lines):                       # checked one by one; nothing runs yet
        try:
            engine.add_request(encode_prompt(tokenizer, line.prompt), line.params, request_id=index)
        except ValueError as exc:          # a prompt longer than the context, a request the KV cache can't hold
            raise DataError(f"input={job.input!r} line {line.lineno}: \"prompt\" / \"max_tokens\" / \"n\": {exc}") \
                from exc
    final = Path(job.output)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_name(final.name + ".partial")
    quiet = os.environ.get("LLMKIT_NO_PROGRESS", "0") not in ("", "0")
    done = 0
    with open(partial, "w", encoding="utf-8") as f, \
            tqdm(total=len(lines), desc="generate", unit="req", file=sys.stderr, dynamic_ncols=True,
                 disable=quiet) as bar:
        while engine.has_unfinished():
            for result in engine.step():
                if not result.finished:
                    continue
                f.write(json.dumps(_record(lines[result.request_id], result), ensure_ascii=False) + "\n")
                f.flush()
                engine.release(result.request_id)
                done += 1
                rate = engine.stats["generated_tokens"] / max(bar.format_dict["elapsed"], 1e-9)
                bar.set_postfix_str(f"tok/s={rate:.1f}", refresh=False)
                bar.update(1)
    if done != len(lines):                 # a bug, not bad input: keep the partial file for inspection
        raise RuntimeError(f"generate: {done} of {len(lines)} requests finished; {partial} holds them")
    os.replace(partial, final)
    print(f"wrote {done} completions to {final}")
