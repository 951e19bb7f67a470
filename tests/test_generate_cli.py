"""`llmkit generate` on the inference engine: engine=true streams the plain path's text; batch mode
(input= / output=) writes each completion as it finishes to OUTPUT.partial, renamed at the end."""
from __future__ import annotations

import json

import pytest

import llmkit
from llmkit.cli import main
from llmkit.generate_job import TextStream
from llmkit.infer import Engine
from llmkit.tokenizer import train_char

PROMPTS = ["the cat sat", "on a mat", "abc", "a dog ran", "xyz tac"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Llama with a character tokenizer over the prompts' characters."""
    folder = tmp_path_factory.mktemp("ckpt") / "model"
    tokenizer = train_char(texts=[" ".join(PROMPTS) + " 0123456789"], special_tokens=("<pad>", "<|endoftext|>"),
                           pad_token="<pad>")
    llmkit.save_hf(llmkit.build_model(llmkit.get_preset("llama-tiny", vocab_size=tokenizer.vocab_size)), folder)
    tokenizer.save(folder)
    return folder


@pytest.fixture(autouse=True)
def _no_bar(monkeypatch):
    monkeypatch.setenv("LLMKIT_NO_PROGRESS", "1")


class Recorder:
    """A stdout that keeps every write, to see the text arrive in pieces."""

    def __init__(self):
        self.pieces = []

    def write(self, s):
        self.pieces.append(s)

    def flush(self):
        pass


def _printed(monkeypatch, words) -> tuple[str, list[str]]:
    out = Recorder()
    with monkeypatch.context() as patch:
        patch.setattr("sys.stdout", out)
        assert main(["generate", *words]) == 0
    return "".join(out.pieces), [p for p in out.pieces if p]


def _single(monkeypatch, checkpoint, prompt, n_new, *extra) -> str:
    text, _ = _printed(monkeypatch, [f"model={checkpoint}", f"prompt={prompt}", f"max_new_tokens={n_new}",
                                     "do_sample=false", "engine=true", *extra])
    return text


@pytest.mark.parametrize("extra", [[], ["repetition_penalty=1.3"]])
def test_engine_greedy_prints_the_plain_paths_text_streamed(checkpoint, monkeypatch, extra):
    words = [f"model={checkpoint}", f"prompt={PROMPTS[0]}", "max_new_tokens=12", *extra]
    plain, _ = _printed(monkeypatch, [*words, "do_sample=false"])
    assert plain.startswith(PROMPTS[0]) and len(plain) > len(PROMPTS[0]) + 1
    streamed, pieces = _printed(monkeypatch, [*words, "do_sample=false", "engine=true"])
    assert streamed == plain
    assert len(pieces) >= 12                     # the prompt, then a piece per token, then the newline
    # temperature 0 is greedy on the engine (OpenAI convention), whatever do_sample says
    assert _printed(monkeypatch, [*words, "temperature=0", "engine=true"])[0] == plain


def test_text_stream_holds_back_an_incomplete_utf8_character():
    class Bytes:                                 # a byte-level tokenizer: one token per UTF-8 byte
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    text = "h€é!"
    stream = TextStream(Bytes(), list(b"h"))
    pieces = [stream.start()] + [stream.push(b) for b in text.encode()[1:]] + [stream.finish()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert pieces[1:4] == ["", "", "€"]          # the euro sign's three bytes print once, whole


def _write_lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_batch_writes_every_completion_with_its_id_in_finishing_order(checkpoint, tmp_path, monkeypatch):
    rows = [{"prompt": PROMPTS[0], "id": "a"},                                  # recipe's greedy, 6 tokens
            {"prompt": PROMPTS[1], "max_tokens": 2},                            # greedy, finishes first
            {"prompt": PROMPTS[2], "temperature": 0.9, "top_k": 5, "seed": 3},
            {"prompt": PROMPTS[3], "n": 2, "temperature": 1.0, "top_p": 0.9, "id": 7},
            {"prompt": PROMPTS[4], "stop": ["a", "t"], "max_tokens": 10}]       # greedy, cut at a stop string
    source, target = _write_lines(tmp_path / "in.jsonl", rows), tmp_path / "out" / "done.jsonl"
    words = ["generate", f"model={checkpoint}", f"input={source}", f"output={target}", "max_new_tokens=6",
             "do_sample=false"]
    assert main(words) == 0
    records = [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()]
    by_id = {r["id"]: r for r in records}
    assert len(records) == 5 and set(by_id) == {"a", 1, 2, 7, 4}
    assert {r["id"]: r["prompt"] for r in records} == dict(zip(["a", 1, 2, 7, 4], PROMPTS))
    ids = [r["id"] for r in records]
    assert ids.index(1) < ids.index("a")        # written as they finish: the 2-token request first
    for rid, prompt, n_new in (("a", PROMPTS[0], 6), (1, PROMPTS[1], 2)):
        r = by_id[rid]
        assert prompt + r["completion"] + "\n" == _single(monkeypatch, checkpoint, prompt, n_new)
        assert (r["finish_reason"], r["prompt_tokens"], r["completion_tokens"]) == ("length", len(prompt), n_new)
    full = _single(monkeypatch, checkpoint, PROMPTS[4], 10)[len(PROMPTS[4]):-1]
    cut = min((full.find(s) for s in "at" if s in full), default=len(full))
    assert by_id[4]["completion"] == full[:cut]
    assert by_id[4]["finish_reason"] == ("stop" if cut < len(full) else "length")
    sampled = by_id[7]
    assert isinstance(sampled["completion"], list) and len(sampled["completion"]) == 2
    assert sampled["finish_reason"] == ["length", "length"] and sampled["completion_tokens"] == 12
    assert isinstance(by_id[2]["completion"], str) and by_id[2]["completion_tokens"] == 6
    first = target.read_text(encoding="utf-8")
    assert main(words) == 0                     # seeded: a line without "seed" draws one from the recipe's seed
    assert sorted(target.read_text(encoding="utf-8").splitlines()) == sorted(first.splitlines())


def test_batch_output_appears_only_at_the_end_and_a_crash_keeps_the_partial(checkpoint, tmp_path, monkeypatch):
    source = _write_lines(tmp_path / "in.jsonl", [{"prompt": p, "max_tokens": i + 1} for i, p in enumerate(PROMPTS)])
    target = tmp_path / "out.jsonl"
    partial = tmp_path / "out.jsonl.partial"
    seen, step = [], Engine.step

    def watched(self):
        lines = len(partial.read_text(encoding="utf-8").splitlines()) if partial.exists() else None
        seen.append((target.exists(), lines))
        return step(self)

    monkeypatch.setattr(Engine, "step", watched)
    assert main(["generate", f"model={checkpoint}", f"input={source}", f"output={target}", "do_sample=false"]) == 0
    assert seen and not any(exists for exists, _ in seen)
    assert {lines for _, lines in seen} >= {0, 1, 2, 3, 4}        # one more line after each step: as they finish
    assert not partial.exists() and len(target.read_text(encoding="utf-8").splitlines()) == 5

    def crashing(self):
        if self.stats["steps"] == 3:           # after three steps
            raise RuntimeError("the machine went away")
        return step(self)

    monkeypatch.setattr(Engine, "step", crashing)
    target, partial = tmp_path / "crash.jsonl", tmp_path / "crash.jsonl.partial"
    with pytest.raises(RuntimeError, match="went away"):
        main(["generate", f"model={checkpoint}", f"input={source}", f"output={target}", "do_sample=false"])
    kept = [json.loads(line) for line in partial.read_text(encoding="utf-8").splitlines()]
    assert not target.exists() and [r["id"] for r in kept] == [0, 1, 2]    # three steps, three requests


@pytest.mark.parametrize("rows, line, named", [
    ([{"prompt": "abc"}, "{not json", {"prompt": "a"}], 2, "not valid JSON"),
    ([{"prompt": "abc"}, {"prompt": "a"}, {"text": "a"}], 3, "unknown field 'text'"),
    ([{"prompt": "abc"}, {"id": 3}], 2, "\"prompt\"=None: expected a string"),
    ([{"prompt": "abc"}, {"prompt": "a", "top_p": 2}], 2, "SamplingParams.top_p=2: expected a number in (0, 1]"),
    ([{"prompt": "abc", "max_tokens": 0}], 1, "SamplingParams.max_tokens=0"),
    ([{"prompt": "abc", "id": 1}, {"prompt": "a"}], 2, "\"id\"=1 is already the id of line 1"),
])
def test_a_bad_line_is_named_before_the_model_loads(tmp_path, capsys, rows, line, named):
    source = _write_lines(tmp_path / "in.jsonl", rows)
    target = tmp_path / "out.jsonl"
    # the model folder does not exist: the file is checked first, so the error is the line's
    assert main(["generate", f"model={tmp_path / 'nope'}", f"input={source}", f"output={target}"]) == 2
    err = capsys.readouterr().err
    assert f"line {line}: " in err and named in err and err.count("\n") == 1, err
    assert not target.exists() and not (tmp_path / "out.jsonl.partial").exists()


def test_a_prompt_too_long_for_the_context_names_its_line_before_anything_runs(checkpoint, tmp_path, capsys):
    source = _write_lines(tmp_path / "in.jsonl", [{"prompt": "abc"}, {"prompt": "abc " * 80}])
    target = tmp_path / "out.jsonl"
    assert main(["generate", f"model={checkpoint}", f"input={source}", f"output={target}"]) == 2
    err = capsys.readouterr().err
    assert "line 2: " in err and "prompt_ids has 320 tokens" in err, err
    assert not (tmp_path / "out.jsonl.partial").exists()


def test_batch_mode_recipe_errors(tmp_path, capsys):
    source = _write_lines(tmp_path / "in.jsonl", [{"prompt": "abc"}])
    cases = [([f"input={source}"], "output=None: expected the JSONL file to write the completions to"),
             ([f"output={tmp_path / 'o.jsonl'}"], "without input: expected input= too"),
             ([f"input={source}", f"output={source}"], "expected a file other than input"),
             ([f"input={tmp_path / 'nope.jsonl'}", "output=o.jsonl"], "file not found"),
             ([f"input={source}", "output=o.jsonl", "prompt=hi"], "expected one of them"),
             ([f"input={source}", "output=o.jsonl", "engine=false"], "batch mode runs on the engine"),
             ([f"input={source}", "output=o.jsonl", "max_num_seqs=0"], "max_num_seqs=0: expected an integer >= 1"),
             (["engine=true", "max_new_tokens=0"], "max_new_tokens=0: expected an integer >= 1")]
    for words, named in cases:
        assert main(["generate", f"model={tmp_path / 'nope'}", *words]) == 2, words
        err = capsys.readouterr().err
        assert err.startswith("llmkit generate: ") and named in err, (words, err)


@pytest.mark.parametrize("speculative", ["ngram", "draft"])
def test_speculative_engine_prints_the_plain_greedy_text(checkpoint, monkeypatch, speculative):
    words = [f"model={checkpoint}", f"prompt={PROMPTS[0]}", "max_new_tokens=16", "do_sample=false"]
    plain, _ = _printed(monkeypatch, words)
    draft = "ngram" if speculative == "ngram" else str(checkpoint)      # the model as its own draft
    assert _printed(monkeypatch, [*words, "engine=true", f"speculative={draft}",
                                  "num_speculative_tokens=3"])[0] == plain


def test_speculative_needs_the_engine_and_a_real_draft(checkpoint, capsys):
    assert main(["generate", f"model={checkpoint}", "prompt=a", "speculative=ngram"]) == 2
    assert "speculative='ngram'" in capsys.readouterr().err
    assert main(["generate", f"model={checkpoint}", "prompt=a", "engine=true", "speculative=nowhere"]) == 2
    assert "speculative='nowhere': expected 'ngram' or a draft model folder" in capsys.readouterr().err
