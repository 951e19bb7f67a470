"""Every `llmkit` command ends on bad input with one line naming the field or file, and status 2."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

import llmkit
from llmkit.cli import COMMANDS, KNOWN_ERRORS, RUNNERS, SUBJECTS, main
from llmkit.tokenizer import train_char

PROMPT = "Question: what is 2+2? Answer:"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Llama with a character tokenizer that knows every character of PROMPT."""
    folder = tmp_path_factory.mktemp("ckpt") / "model"
    tokenizer = train_char(texts=[PROMPT + " 0123456789"], special_tokens=("<pad>", "<|endoftext|>"),
                           pad_token="<pad>")
    llmkit.save_hf(llmkit.build_model(llmkit.get_preset("llama-tiny", vocab_size=tokenizer.vocab_size)), folder)
    tokenizer.save(folder)
    return folder


def _broken(checkpoint, tmp_path, how: str):
    folder = tmp_path / how
    if how == "missing":
        return folder, str(folder)
    folder.mkdir()
    for file in checkpoint.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    if how == "truncated":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        return folder, "model.safetensors"
    config = json.loads((folder / "config.json").read_text())
    key = {"n_layers": "num_hidden_layers", "hidden_size": "hidden_size"}[how]
    config[key] *= 2
    (folder / "config.json").write_text(json.dumps(config))
    return folder, "model.safetensors"


@pytest.mark.parametrize("how", ["truncated", "n_layers", "missing"])
def test_generate_on_a_bad_checkpoint_prints_one_line(checkpoint, tmp_path, how):
    folder, named = _broken(checkpoint, tmp_path, how)
    result = subprocess.run([sys.executable, "-m", "llmkit.cli", "generate", f"model={folder}", "max_new_tokens=2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("llmkit generate: ") and named in result.stderr


def test_generate_config_that_disagrees_with_the_weights_names_the_tensor(checkpoint, tmp_path, capsys):
    folder, _ = _broken(checkpoint, tmp_path, "hidden_size")
    assert main(["generate", f"model={folder}"]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors: tensor 'model.embed_tokens.weight': expected shape" in err


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_shares_the_error_path(command, capsys):
    assert set(RUNNERS) == set(COMMANDS)
    assert main([command, *SUBJECTS.get(command, [])[:1], "no_such_key=1"]) == 2     # `bench serve ...`
    err = capsys.readouterr().err
    assert err.startswith(f"llmkit {command}: unknown recipe key 'no_such_key'") and err.count("\n") == 1


def test_known_errors_are_the_projects_classes_and_others_keep_their_traceback(monkeypatch):
    for name in KNOWN_ERRORS:
        module, _, cls = name.rpartition(".")
        assert issubclass(getattr(importlib.import_module(module), cls), Exception), name
    monkeypatch.setitem(RUNNERS, "demo", lambda data: {}["a bug"])
    with pytest.raises(KeyError):
        main(["demo"])


def test_convert_names_a_missing_source(tmp_path, capsys):
    assert main(["convert", f"source={tmp_path / 'nope'}", f"target={tmp_path / 'out'}"]) == 2
    assert f"llmkit convert: {tmp_path / 'nope'}: not a directory" in capsys.readouterr().err


def test_generate_takes_a_string_value_literally_and_from_a_file(checkpoint, tmp_path, capsys):
    words = ["generate", f"model={checkpoint}", "max_new_tokens=3", "do_sample=false"]
    assert main([*words, f"prompt={PROMPT}"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(PROMPT)
    (tmp_path / "prompt.txt").write_text(PROMPT + "\n", encoding="utf-8")
    assert main([*words, f"prompt_file={tmp_path / 'prompt.txt'}"]) == 0
    assert capsys.readouterr().out == printed        # the file's final newline is not part of the prompt
    assert main([*words, f"prompt_file={tmp_path / 'nope.txt'}"]) == 2
    assert f"prompt_file='{tmp_path / 'nope.txt'}': file not found" in capsys.readouterr().err
    assert main([*words, "prompt=hi", f"prompt_file={tmp_path / 'prompt.txt'}"]) == 2
    assert "expected one, not both" in capsys.readouterr().err
    assert main([*words, "temperature=0", "do_sample=true"]) == 2     # checked before the model loads
    assert "SamplingParams.temperature=0.0: expected a number > 0" in capsys.readouterr().err
