"""`llmkit align method=ppo` end to end on tiny checkpoints, and the job's bad-input errors."""
from __future__ import annotations

import json

import pytest
import torch

from llmkit.align import toy_reviews as toy
from llmkit.cli import main
from llmkit.jobs.artifacts import load_artifacts, save_artifacts
from llmkit.model.models import ValueModel
from llmkit.tokenizer import train_char

RECIPE = "recipes/align_ppo_toy.yaml"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    tok = train_char(texts=toy.corpus(200), special_tokens=("<pad>", "<|endoftext|>"), pad_token="<pad>")
    torch.manual_seed(0)
    policy = toy.tiny_policy(tok)
    toy.train_sft(policy, tok, toy.sft_rows(1000), steps=60, out_dir=str(root / "run"))
    save_artifacts(root / "sft", policy, tok, job="toy", task="causal_lm")
    save_artifacts(root / "rm", ValueModel(policy.config), tok, job="toy", task="reward")
    other = train_char(texts=["xyz review"], special_tokens=("<pad>", "<|endoftext|>"), pad_token="<pad>")
    config = toy.tiny_policy(other).config
    save_artifacts(root / "rm_other", ValueModel(config), other, job="toy", task="reward")
    return root


def args(root, out, *extra):
    return ["align", RECIPE, f"model.from={root / 'sft'}", f"reward.from={root / 'rm'}", "options.iterations=2",
            "options.rollout_batch_size=8", "options.minibatch_size=4", f"train.out_dir={out}", *extra]


def test_the_ppo_recipe_runs_end_to_end_and_leaves_a_policy(checkpoints, tmp_path):
    assert main(args(checkpoints, tmp_path)) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rollouts"] == 2 and summary["step"] == 8
    for name in ("objective/kl", "objective/scores", "objective/toy_reviews", "loss/policy_avg", "val/ratio"):
        assert name in summary["metrics"]
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and all({"prompt", "completion", "score"} <= set(s) for s in samples)
    saved = load_artifacts(tmp_path / "model")
    assert type(saved.model).__name__ == "CausalLM"


def test_the_text_reward_needs_no_reward_model(checkpoints, tmp_path):
    assert main(args(checkpoints, tmp_path, "reward={text: toy_reviews}")) == 0
    assert json.loads((tmp_path / "summary.json").read_text())["rollouts"] == 2


def test_d_rlaif_uses_a_judge_score_and_counts_its_unparsed_answers(checkpoints, tmp_path):
    """reward: {judge: <causal LM>}: the (untrained) judge's answers are rarely a number in 1..10; every
    completion is still rewarded (unparsed -> 0) and the counts add up to the completions judged."""
    assert main(args(checkpoints, tmp_path, f"reward={{judge: {checkpoints / 'sft'}}}")) == 0
    metrics = json.loads((tmp_path / "summary.json").read_text())["metrics"]
    assert metrics["judge/scored"] + metrics["judge/unparsed"] == 16     # 2 rollouts of 8
    assert metrics["judge/unparsed"] > 0


@pytest.mark.parametrize("extra, message", [
    (("reward.from={rm_other}",), "tokenizer differs from the policy's"),
    (("data.max_prompt_length=5",), r"exceed data.max_prompt_length=5 tokens"),
    (("reward={text: nope}",), r"reward.text='nope': expected one of \['toy_reviews'\]"),
    (("options.kl_estimator=k2",), r"ppo.kl_estimator='k2'"),
    (("track=[nope]",), r"track=\['nope'\]"),
])
def test_bad_ppo_recipes_fail_with_a_clear_error(checkpoints, tmp_path, capsys, extra, message):
    extra = tuple(e.replace("{rm_other}", str(checkpoints / "rm_other")) for e in extra)
    assert main(args(checkpoints, tmp_path, *extra)) != 0
    import re
    assert re.search(message, capsys.readouterr().err)
