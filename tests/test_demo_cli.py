"""The README's main job (`llmkit demo`) and the CLI."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import llmkit
from llmkit.cli import main


def test_demo_short_run_writes_a_loadable_checkpoint(tmp_path, capsys):
    from llmkit.demo import run_demo
    summary = run_demo(out_dir=str(tmp_path), steps=40, questions=20)
    printed = capsys.readouterr().out
    assert "before:" in printed and "after:" in printed and "held-out" in printed
    pretrain = summary["pretrain"]
    assert pretrain["after"]["val_loss"] < pretrain["before"]["val_loss"]   # 40 steps already learn
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    sft = summary["sft"]                               # the SFT stage ran and reported both sides
    assert "exact match on 20 held-out instructions" in printed and "perplexity" in printed
    assert 0 <= sft["exact_match_before"] <= 1 and 0 <= sft["exact_match_after"] <= 1
    assert sft["heldout_ppl_before"] > 1 and sft["heldout_ppl_after"] > 1
    assert sft["heldout_ppl_change"] == pytest.approx(sft["heldout_ppl_after"] - sft["heldout_ppl_before"], abs=1e-3)
    assert (tmp_path / "sft" / "model" / "config.json").is_file()
    ppo = summary["ppo"]                               # the PPO stage ran, reported and saved its policy
    assert "PPO with an exact-match reward" in printed and ppo["iterations"] == 2
    assert 0 <= ppo["before"]["exact_match"] <= 1 and 0 <= ppo["after"]["exact_match"] <= 1 and ppo["kl"] >= 0
    assert (tmp_path / "ppo" / "model" / "config.json").is_file()
    for name in ("metrics.jsonl", "loss.png", "recipe.yaml", "model/config.json", "model/tokenizer.json"):
        assert (tmp_path / name).is_file(), name
    model = llmkit.load_hf(tmp_path / "model")
    tokenizer = llmkit.load_tokenizer(tmp_path / "model")
    ids = torch.tensor([tokenizer.encode("12+34=", add_special_tokens=False)])
    assert model(ids).logits.shape == (1, ids.shape[1], tokenizer.vocab_size)


@pytest.mark.slow
def test_demo_default_run_learns(tmp_path):
    """SFT stage seen on a default (1500-step) pretrained demo model: exact match on 200 held-out
    instructions 5.5% -> 66.0% after 300 SFT steps; held-out pretraining ppl 3.58 -> 7.86."""
    from llmkit.demo import run_demo
    summary = run_demo(out_dir=str(tmp_path))
    before, after = summary["pretrain"]["before"], summary["pretrain"]["after"]
    assert after["exact_match"] > before["exact_match"] + 0.2
    assert after["val_loss"] < before["val_loss"] - 1.0
    sft = summary["sft"]                               # instruction SFT raises exact match on held-out instructions
    assert sft["exact_match_after"] > sft["exact_match_before"] + 0.2
    ppo = summary["ppo"]                               # seen: 58.5% -> 60.0%, KL 0.008 a token
    assert ppo["after"]["exact_match"] >= ppo["before"]["exact_match"] - 0.03 and ppo["kl"] < 0.05
    assert ppo["reward_last"] > ppo["reward_first"]


def test_cli_help_and_convert(tmp_path):
    result = subprocess.run([sys.executable, "-m", "llmkit.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "demo" in result.stdout and "convert" in result.stdout
    model = llmkit.build_model(llmkit.get_preset("gpt2-tiny"))
    llmkit.save_hf(model, tmp_path / "a")
    assert main(["convert", f"source={tmp_path / 'a'}", f"target={tmp_path / 'b'}"]) == 0
    ids = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, llmkit.load_hf(tmp_path / "b")(ids).logits)
