"""`llmkit finetune`, `llmkit eval` and `llmkit tune` on the command line."""
from __future__ import annotations

import json
import pytest
import yaml

from llmkit.cli import main

ROWS = [{"question": f"{a}+{b}?", "answer": str(a + b)} for a in range(6) for b in range(6)]


def _recipe(tmp_path) -> str:
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    recipe = {
        "model": {"preset": "llama-tiny", "tokenizer": "char",
                  "d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "d_ff": 64},
        "data": {"train": str(data), "dev": str(data), "columns": {"prompt": "question", "response": "answer"},
                 "max_len": 64, "batch_size": 8},
        "train": {"out_dir": str(tmp_path / "run"), "max_steps": 4, "lr": 3e-3, "progress": False,
                  "tensorboard": False, "plot": False},
        "eval": {"generate": True, "max_new_tokens": 3, "generate_rows": 4},
    }
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_finetune_then_eval_from_the_command_line(tmp_path, capsys):
    recipe = _recipe(tmp_path)
    assert main(["finetune", recipe, "train.optimizer=sgd", "train.lr=0.1"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 4 and {"loss", "ppl", "exact_match"} <= set(summary["dev"])
    assert (tmp_path / "run" / "model" / "tokenizer.json").is_file()
    out = tmp_path / "eval.json"
    assert main(["eval", f"model={tmp_path / 'run' / 'model'}", f"data={tmp_path / 'pairs.jsonl'}",
                 "columns={prompt: question, response: answer}", "max_new_tokens=3", f"out={out}"]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["loss"] == summary["dev"]["loss"] or abs(metrics["loss"] - summary["dev"]["loss"]) < 1e-4
    assert metrics["generated"] == len(ROWS) and "| ppl |" in capsys.readouterr().out


def test_bad_input_ends_the_command_with_a_message_naming_the_column(tmp_path, capsys):
    recipe = _recipe(tmp_path)
    assert main(["finetune", recipe, "data.columns={prompt: q, response: answer}"]) == 2
    err = capsys.readouterr().err
    assert "missing column 'q'" in err and "columns found: ['answer', 'question']" in err
    assert main(["finetune", recipe, "data.max_lenn=3"]) == 2
    assert "did you mean 'max_len'" in capsys.readouterr().err


def test_help_lists_the_recipe_keys(capsys):
    for command, keys in (("finetune", ["model.task", "data.packing", "data.on_empty_response", "train.patience",
                                        "forgetting.l2_init", "train.optimizer", "peft"]),
                          ("tune", ["search"]), ("eval", ["model=", "max_new_tokens"])):
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0
        out = capsys.readouterr().out
        for key in keys:
            assert key in out, (command, key)
    with pytest.raises(SystemExit):
        main(["--help"])
    listing = capsys.readouterr().out
    assert all(name in listing for name in ("finetune", "eval", "tune", "pretrain", "demo"))
