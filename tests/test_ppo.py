"""PPO-RLHF (issue 15): rollouts, reward placement, the trainer, learning on the toy review task
whose true reward is known, and the bad-input errors."""
from __future__ import annotations

import math

import pytest
import torch

from llmkit.align import toy_reviews as toy
from llmkit.align.on_policy import complete
from llmkit.align.ppo import PPOConfig, PPOTrainer
from llmkit.align.rewards import ModelReward, check_same_tokenizer
from llmkit.align.rollout import Rollout, cut_after_stop, encode_prompts, response_logps
from llmkit.model.models import ValueModel
from llmkit.tokenizer import train_char
from llmkit.train import TrainConfig


def tokenizer():
    return train_char(texts=toy.corpus(200), special_tokens=("<pad>", "<|endoftext|>"), pad_token="<pad>")


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """A tiny Llama fitted to the toy reviews (about 6 s on 2 cores): E[true reward] near 0."""
    torch.manual_seed(0)
    tok = tokenizer()
    model = toy.tiny_policy(tok)
    toy.train_sft(model, tok, toy.sft_rows(3000), steps=300, out_dir=str(tmp_path_factory.mktemp("sft")))
    return tok, model.state_dict()


def policy_from(sft):
    tok, state = sft
    model = toy.tiny_policy(tok)
    model.load_state_dict(state)
    return tok, model


def train_config(tmp_path, **kw):
    return TrainConfig(lr=kw.pop("lr", 3e-4), out_dir=str(tmp_path), log_every=4,  # one log per rollout save_every=kw.pop("save_every", 0),
                       progress=False, schedule="constant", warmup_steps=0, plot=False, tensorboard=False, **kw)


def mean_true_reward(model, tok, n=192, seed=123):
    gen = torch.Generator().manual_seed(seed)
    outs = complete(model, tok, toy.prompts(n, seed=seed), max_new_tokens=32, do_sample=True, generator=gen)
    return sum(toy.true_reward(None, outs)) / n


def run_ppo(sft, tmp_path, **cfg):
    tok, model = policy_from(sft)
    train_kw = {k: cfg.pop(k) for k in ("lr", "save_every") if k in cfg}
    config = PPOConfig(**{**dict(iterations=25, rollout_batch_size=32, minibatch_size=16, max_new_tokens=32), **cfg})
    trainer = PPOTrainer(model, tok, toy.prompts(256), toy.true_reward, config=config,
                         train=train_config(tmp_path, **train_kw), track={"true_reward": toy.true_reward})
    return tok, model, trainer, trainer.fit()


# ---- rollouts and reward placement -----------------------------------------------------------------

def test_completions_are_cut_after_the_first_stop_token():
    response = torch.tensor([[5, 6, 1, 7, 8], [5, 5, 5, 5, 5], [1, 9, 9, 1, 9]])
    cut, mask, has_eos = cut_after_stop(response, [1], pad_id=0)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert cut.tolist() == [[5, 6, 1, 0, 0], [5, 5, 5, 5, 5], [1, 0, 0, 0, 0]]
    assert has_eos.tolist() == [True, False, True]


def test_log_probs_are_taken_at_the_sampling_temperature():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7)
    response = torch.tensor([[1, 2, 3], [4, 5, 0]])
    rollout = Rollout(torch.ones(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long), response,
                      torch.tensor([[1, 1, 1], [1, 1, 0]]), torch.tensor([True, False]))
    got = response_logps(logits, rollout, temperature=0.7)
    hand = torch.log_softmax(logits / 0.7, -1).gather(-1, response[..., None]).squeeze(-1) * rollout.response_mask
    torch.testing.assert_close(got, hand)
    assert got[1, 2] == 0


def test_the_reward_model_scores_the_last_real_token_of_a_padded_rollout():
    """Left padding before the prompt, padding after the stop: the score equals that of the bare
    sequence scored alone, i.e. the head's value at the stop token, never at a pad."""
    torch.manual_seed(0)
    tok = tokenizer()
    rm = ValueModel(toy.tiny_policy(tok).config).eval()
    q = [tok.encode("review of the film:", add_special_tokens=False), tok.encode("review of the meal:",
                                                                                   add_special_tokens=False)[3:]]
    r = [tok.encode(" it was good.", add_special_tokens=False) + [tok.eos_token_id],
         tok.encode(" it was bad and dull.", add_special_tokens=False) + [tok.eos_token_id]]
    from llmkit.align.rollout import left_pad
    query, qmask = left_pad(q, tok.pad_id)
    width = max(map(len, r))
    response = torch.tensor([x + [tok.pad_id] * (width - len(x)) for x in r])
    rmask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in r])
    rollout = Rollout(query, qmask, response, rmask, torch.tensor([True, True]))
    scores = ModelReward(rm)(rollout, None, None)
    for i in range(2):
        alone = rm(torch.tensor([q[i] + r[i]])).values[0, -1]
        torch.testing.assert_close(scores[i], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(scores[0], rm(torch.tensor([q[0] + r[0] + [tok.pad_id]])).values[0, -1])


def test_first_rollout_kl_is_zero_and_first_ratio_is_one_even_with_dropout_and_a_temperature(sft, tmp_path):
    """Policy and reference scored the same way (one forward, same τ, dropout off): k1 is exactly 0
    on the first rollout and the first minibatch's ratio is 1 - no negative KL from mismatched settings."""
    tok, model = policy_from(sft)
    model.config.dropout = model.config.attn_dropout = 0.2
    for module in model.modules():
        if hasattr(module, "dropout") and isinstance(module.dropout, float):
            module.dropout = 0.2
    trainer = PPOTrainer(model, tok, toy.prompts(64), toy.true_reward, train=train_config(tmp_path),
                         config=PPOConfig(iterations=1, rollout_batch_size=16, minibatch_size=16, ppo_epochs=1,
                                          temperature=0.7, max_new_tokens=24))
    batch = next(trainer.source)
    assert batch["stats"]["objective/kl"] == 0.0
    _, metrics = trainer.objective.loss(trainer.model.train(), batch)
    assert float(metrics["val/ratio"]) == pytest.approx(1.0, abs=1e-6)
    assert float(metrics["policy/approxkl_avg"]) == pytest.approx(0.0, abs=1e-10)


def test_under_bf16_the_rollout_runs_in_the_updates_precision(sft, tmp_path):
    """precision=bf16: the rollout is scored under the same autocast as the update, so the first
    minibatch's ratio is still exactly 1 and the first rollout's k1 KL exactly 0."""
    tok, model = policy_from(sft)
    trainer = PPOTrainer(model, tok, toy.prompts(64), toy.true_reward, train=train_config(tmp_path, precision="bf16"),
                         config=PPOConfig(iterations=1, rollout_batch_size=16, minibatch_size=16, ppo_epochs=1,
                                          max_new_tokens=24))
    batch = next(trainer.source)
    assert batch["stats"]["objective/kl"] == 0.0
    with trainer.trainer.autocast():
        _, metrics = trainer.objective.loss(trainer.model.train(), batch)
    assert float(metrics["val/ratio"]) == 1.0


# ---- learning on the toy task (seeded) -------------------------------------------------------------

def test_ppo_raises_the_true_reward_and_logs_trl_metric_names(sft, tmp_path):
    tok, before_model = policy_from(sft)
    before = mean_true_reward(before_model, tok)
    _, model, _, result = run_ppo(sft, tmp_path, kl_coef=0.05)
    after = mean_true_reward(model, tok)
    print(f"true reward {before:.3f} -> {after:.3f}, kl {result.metrics['objective/kl']:.2f}")
    assert after - before >= 0.4
    for name in ("objective/kl", "objective/scores", "objective/rlhf_reward", "policy/clipfrac_avg",
                 "policy/approxkl_avg", "loss/policy_avg", "loss/value_avg", "val/ratio"):
        assert name in result.metrics and math.isfinite(float(result.metrics[name]))


def test_a_larger_beta_gives_a_smaller_kl(sft, tmp_path):
    kls = {}
    for beta in (0.01, 0.3):
        *_, result = run_ppo(sft, tmp_path / str(beta), kl_coef=beta, kl_estimator="k3")
        kls[beta] = float(result.metrics["objective/kl"])
    print(kls)
    assert kls[0.3] < kls[0.01]


def test_the_adaptive_controller_keeps_the_kl_below_its_target(sft, tmp_path):
    """Ziegler et al.'s controller from β = 0.3 towards 6 nats: the KL per completion, averaged over
    the last 10 rollouts (one rollout's estimate is noisy), stays below the target while β falls
    (the KL was under target, so the policy is let go further); a fixed β = 0.01 goes far past it
    (test_a_larger_beta_gives_a_smaller_kl: about 29 nats)."""
    target = 6.0
    _, _, trainer, result = run_ppo(sft, tmp_path, kl_coef=0.3, target_kl=target, kl_horizon=160, iterations=30)
    kls = [r["objective/kl"] for r in _rollout_log(tmp_path)]
    print(kls[-10:], trainer.source.kl.beta)
    assert len(kls) == 31                      # step 1 is logged too
    assert sum(kls[-10:]) / 10 < target
    assert trainer.source.kl.beta < 0.3


def _rollout_log(out_dir):
    from llmkit.train.logging import read_metrics
    return [r for r in read_metrics(out_dir / "metrics.jsonl") if "objective/kl" in r]


def test_a_lora_policy_is_its_own_reference_and_a_separate_critic_trains(sft, tmp_path):
    from llmkit import peft
    tok, model = policy_from(sft)
    handle = peft.apply(model, "lora", r=4, alpha=8, targets=["q_proj", "v_proj"])
    trainer = PPOTrainer(model, tok, toy.prompts(64), toy.true_reward, handle=handle, train=train_config(tmp_path, lr=3e-3),
                         config=PPOConfig(iterations=4, rollout_batch_size=16, minibatch_size=8, critic="separate",
                                          max_new_tokens=24))
    assert trainer.source.reference is handle          # no second policy in memory
    critic_before = {k: v.clone() for k, v in trainer.model.critic.state_dict().items()}
    result = trainer.fit()
    assert result.status == "completed"
    assert float(result.metrics["objective/kl"]) != 0.0
    moved = [k for k, v in trainer.model.critic.state_dict().items() if not torch.equal(v, critic_before[k])]
    assert moved


def test_ppo_resumes_at_the_next_rollout_with_its_beta(sft, tmp_path):
    *_, trainer, _ = run_ppo(sft, tmp_path, iterations=3, target_kl=1.0, kl_horizon=64, save_every=4)
    beta, rollouts = trainer.source.kl.beta, trainer.source.rollouts
    tok, model = policy_from(sft)
    config = PPOConfig(iterations=5, rollout_batch_size=32, minibatch_size=16, max_new_tokens=32, target_kl=1.0,
                       kl_horizon=64)
    again = PPOTrainer(model, tok, toy.prompts(256), toy.true_reward, config=config,
                       train=train_config(tmp_path, save_every=4, resume="auto"))
    again.trainer._resume()
    assert again.source.rollouts == rollouts == 3 and again.source.kl.beta == pytest.approx(beta)
    assert again.fit().step == 20


# ---- bad input -------------------------------------------------------------------------------------

def test_a_reward_model_with_another_tokenizer_is_refused(sft, tmp_path):
    tok, model = policy_from(sft)
    other = train_char(texts=["abcxyz"], special_tokens=("<pad>", "<|endoftext|>"), pad_token="<pad>")
    with pytest.raises(ValueError, match="tokenizer differs from the policy's"):
        check_same_tokenizer(tok, other)
    rm = ValueModel(model.config)
    with pytest.raises(ValueError, match="vocab sizes"):
        PPOTrainer(model, tok, toy.prompts(8), rm, reward_tokenizer=other, train=train_config(tmp_path))


def test_prompts_longer_than_the_context_are_an_error_naming_one(sft):
    tok, _ = sft
    prompts = ["review of the film:", "x" * 90]
    with pytest.raises(ValueError, match=r"prompts\[1\] = 90 tokens: 90 \+ max_new_tokens=24 > max_seq_len=96"):
        encode_prompts(tok, prompts, max_seq_len=96, max_new_tokens=24)


def test_bad_ppo_options_name_the_field():
    with pytest.raises(ValueError, match=r"ppo.minibatch_size=5: expected a divisor of rollout_batch_size=16"):
        PPOConfig(rollout_batch_size=16, minibatch_size=5)
    with pytest.raises(ValueError, match=r"ppo.kl_estimator='k2'"):
        PPOConfig(kl_estimator="k2")
    with pytest.raises(ValueError, match=r"ppo.critic='both'"):
        PPOConfig(critic="both")
