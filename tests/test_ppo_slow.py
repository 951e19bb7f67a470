"""PPO-RLHF on the toy review task with a learnt reward model (issue 15), against the true reward:
the reward model's held-out accuracy, then PPO on it raising the true reward with a bounded KL.
About 30 s on 2 cores (benchmarks/bench_ppo_toy.py runs the full sweep)."""
from __future__ import annotations

import pytest
import torch

from llmkit.align import toy_reviews as toy
from llmkit.align.ppo import PPOConfig, PPOTrainer
from llmkit.align.rollout import sample_kl_and_reward
from llmkit.tokenizer import train_char
from llmkit.train import TrainConfig

pytestmark = pytest.mark.slow


def test_ppo_on_a_learnt_reward_model_raises_the_true_reward(tmp_path):
    torch.manual_seed(0)
    tok = train_char(texts=toy.corpus(200), special_tokens=("<pad>", "<|endoftext|>"), pad_token="<pad>")
    sft = toy.tiny_policy(tok)
    toy.train_sft(sft, tok, toy.sft_rows(3000), steps=300, out_dir=str(tmp_path / "sft"))
    rm = toy.train_reward_model(sft, tok, toy.preference_rows(2000, seed=1), steps=300, out_dir=str(tmp_path / "rm"))
    accuracy = toy.held_out_accuracy(rm, tok, toy.preference_rows(500, seed=99))
    reference = toy.tiny_policy(tok)
    reference.load_state_dict(sft.state_dict())
    prompts = toy.prompts(256, seed=7)
    before = sample_kl_and_reward(sft, reference, tok, prompts, toy.true_reward, max_new_tokens=32, seed=11)
    config = PPOConfig(iterations=25, rollout_batch_size=32, minibatch_size=16, max_new_tokens=32, kl_coef=1.0)
    train = TrainConfig(lr=3e-4, out_dir=str(tmp_path / "ppo"), log_every=4, save_every=0, progress=False,
                        schedule="constant", warmup_steps=0, plot=False, tensorboard=False)
    PPOTrainer(sft, tok, toy.prompts(512), rm, config=config, train=train).fit()
    after = sample_kl_and_reward(sft, reference, tok, prompts, toy.true_reward, max_new_tokens=32, seed=11)
    print(f"RM held-out accuracy {accuracy:.3f}; true reward {before['reward']:.3f} -> {after['reward']:.3f}, "
          f"KL {after['kl']:.2f} nats")
    assert accuracy >= 0.85                       # 0.896 in benchmarks/results/ppo_toy.md
    assert after["reward"] - before["reward"] >= 0.3   # 0.029 -> 0.583 there
    assert after["kl"] < 10.0                     # 4.5 nats there
