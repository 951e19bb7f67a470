"""PPO-RLHF (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"; Ouyang et
al. 2022, "Training language models to follow instructions with human feedback"; Schulman et al.
2017 for PPO): the policy π_θ (the SFT model) maximises

    E_{x, y ~ π_θ} [ r(x, y) ] − β · KL(π_θ(·|x) ‖ π_ref(·|x)),     π_ref = the SFT model, frozen.

One iteration:
1. rollout: sample B completions at temperature τ (`rollout.sample_rollout`), score them
   (`rewards.as_reward`: a reward model at the last real token, or a text function), minus
   `missing_eos_penalty` where no stop token came;
2. per-token rewards r_t = −β·KL_t (k1 or k3, `ppo_math.kl_per_token`) plus the score at the last
   real token; values V_t from the critic; GAE(γ, λ) advantages, whitened; returns A + V;
3. `ppo_epochs` passes over shuffled minibatches of the rollout, each an optimizer step on
   clipped policy loss + vf_coef · clipped value loss (`ppo_math`);
4. β from a fixed or an adaptive (target-KL) controller.

The critic is a value head on the policy's own trunk (`critic="shared"`: one forward gives
logits and values) or a separate scalar-head model (`critic="separate"`: a copy of the reward
model, as Ouyang et al. initialise it). The reference is a frozen copy, or - with a PEFT handle -
the policy itself with its adapters disabled (one model in memory).

It runs on the one Trainer: `RolloutSource` is the training data (each `next()` hands out the
next minibatch, sampling a new rollout when the last one is used up), `PPOObjective.loss` the
loss, so checkpoints, SIGTERM, NaN guards, TensorBoard and progress bars are the Trainer's. A
resume restarts at the next rollout: the minibatches left of an interrupted rollout are dropped
(its samples came from weights that no longer exist). Metrics carry TRL's names.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ..model.heads import ValueHead
from ..model.modes import evaluating
from ..train import TrainConfig, Trainer
from .objectives import frozen_copy, reward_model_from
from .ppo_math import AdaptiveKL, FixedKL, gae, kl_per_token, policy_loss, token_rewards, value_loss, whiten
from .rewards import as_reward, missing_eos_penalty
from .rollout import Rollout, completion_texts, encode_prompts, stop_token_ids, entropy, policy_logits, response_logps, sample_rollout

CRITICS = ("shared", "separate")


@dataclass
class PPOConfig:
    iterations: int = 20              # rollouts; the Trainer's max_steps = iterations × steps_per_rollout
    rollout_batch_size: int = 16      # prompts (= completions) per rollout
    minibatch_size: int = 8
    ppo_epochs: int = 2
    max_new_tokens: int = 24
    temperature: float = 1.0
    kl_coef: float = 0.05             # β (the adaptive controller's start)
    kl_estimator: str = "k1"          # k1 | k3
    target_kl: Optional[float] = None  # set: Ziegler et al.'s adaptive β towards this KL (nats / completion)
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    whiten_rewards: bool = False
    missing_eos_penalty: Optional[float] = None   # subtracted from the score of a completion with no stop token
    critic: str = "shared"
    seed: int = 0

    def __post_init__(self):
        def fail(name, expected):
            raise ValueError(f"ppo.{name}={getattr(self, name)!r}: expected {expected}")
        for name in ("iterations", "rollout_batch_size", "minibatch_size", "ppo_epochs", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                fail(name, "a positive integer")
        if self.rollout_batch_size % self.minibatch_size:
            fail("minibatch_size", f"a divisor of rollout_batch_size={self.rollout_batch_size}")
        for name in ("temperature", "cliprange", "cliprange_value", "kl_horizon"):
            if not getattr(self, name) > 0:
                fail(name, "a number > 0")
        if self.kl_coef < 0:
            fail("kl_coef", "a number >= 0")
        if self.kl_estimator not in ("k1", "k3"):
            fail("kl_estimator", "'k1' or 'k3'")
        if self.target_kl is not None and not self.target_kl > 0:
            fail("target_kl", "None (fixed β) or a KL > 0")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            fail("gamma" if not 0 <= self.gamma <= 1 else "lam", "a number in [0, 1]")
        if self.critic not in CRITICS:
            fail("critic", f"one of {list(CRITICS)}")

    @property
    def steps_per_rollout(self) -> int:
        return self.ppo_epochs * (self.rollout_batch_size // self.minibatch_size)

    def controller(self):
        return FixedKL(self.kl_coef) if self.target_kl is None else AdaptiveKL(self.kl_coef, self.target_kl,
                                                                                self.kl_horizon)


class PolicyAndValue(nn.Module):
    """The trained module: the policy plus its critic (a head on the policy's trunk, or a model).

    forward(rollout inputs) -> (logits (B, Tr, V) at the positions predicting the response,
    values (B, Tr): V of the state before each response token). Dropout stays off in training
    too, so the first minibatch's ratio π_θ / π_old is exactly 1 (TRL does the same)."""

    def __init__(self, policy: nn.Module, critic: Optional[nn.Module] = None):
        super().__init__()
        self.policy = policy
        self.critic = critic
        self.value_head = ValueHead(policy.config.d_model) if critic is None else None
        if self.value_head is not None:
            nn.init.zeros_(self.value_head.proj.weight)     # V = 0 at the start: the first advantages are the returns
            nn.init.zeros_(self.value_head.proj.bias)

    @property
    def config(self):
        return self.policy.config

    def train(self, mode: bool = True):
        super().train(mode)
        self.policy.eval()
        if self.critic is not None:
            self.critic.eval()
        return self

    def forward(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        logits, out = policy_logits(self.policy, rollout)                                # (B, Tr, V)
        Tq = rollout.query.shape[1]
        if self.critic is None:
            hidden = out.last_hidden_state[:, Tq - 1:-1]                                 # (B, Tr, d)
            values = self.value_head(hidden)                                             # (B, Tr)
        else:
            inputs = rollout.inputs()
            values = self.critic(inputs["input_ids"], inputs["attention_mask"],
                                 position_ids=inputs["position_ids"]).values[:, Tq - 1:-1]   # (B, Tr)
        return logits, values.float() * rollout.response_mask


def _rollout_of(batch: dict) -> Rollout:
    return Rollout(batch["query"], batch["query_mask"], batch["response"], batch["response_mask"], batch["has_eos"])


class PPOObjective:
    """loss = clipped policy loss + vf_coef · clipped value loss on one minibatch of a rollout."""

    def __init__(self, config: PPOConfig):
        self.config = config

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        cfg = self.config
        rollout = _rollout_of(batch)
        mask = rollout.response_mask
        logits, values = model(rollout)
        logps = response_logps(logits, rollout, cfg.temperature)                         # (B, Tr)
        pg, pg_stats = policy_loss(logps, batch["logps"], batch["advantages"], mask, cfg.cliprange)
        vf, vf_stats = value_loss(values, batch["values"], batch["returns"], mask, cfg.cliprange_value)
        metrics = {"loss/policy_avg": pg.detach(), "loss/value_avg": vf.detach(),
                   "policy/clipfrac_avg": pg_stats["clipfrac"], "policy/approxkl_avg": pg_stats["approxkl"],
                   "val/clipfrac_avg": vf_stats["clipfrac"], "val/ratio": pg_stats["ratio"], **batch["stats"]}
        return pg + cfg.vf_coef * vf, metrics


class RolloutSource:
    """The PPO Trainer's data: minibatches of rollouts sampled from the policy as it trains."""

    def __init__(self, model: PolicyAndValue, prompt_ids: Sequence[Sequence[int]], prompts: Sequence[str], reward,
                 config: PPOConfig, tokenizer, *, stop_ids: Sequence[int], reference: Any = None,
                 track: Optional[dict] = None):
        self.model, self.prompt_ids, self.prompts, self.reward = model, list(prompt_ids), list(prompts), reward
        self.config, self.tokenizer, self.stop_ids = config, tokenizer, list(stop_ids)
        self.reference, self.track = reference, dict(track or {})
        self.kl = config.controller()
        self.rollouts = 0
        self._queue: list[dict] = []
        self.last_rollout: Optional[dict] = None
        self.history: list[dict] = []          # each rollout's stats (objective/*, val/*), this process only
        # the update's precision for the rollout too (PPOTrainer passes Trainer.autocast): old and new
        # log-probs then come from the same kernels, so the first ratio stays exactly 1 under bf16
        self.autocast = contextlib.nullcontext

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if not self._queue:
            self._queue = self.make_rollout()
        return self._queue.pop(0)

    def state_dict(self) -> dict:
        return {"rollouts": self.rollouts, "beta": self.kl.beta}

    def load_state_dict(self, state: dict) -> None:
        self.rollouts, self.kl.beta, self._queue = int(state["rollouts"]), float(state["beta"]), []

    def _indices(self, n: int) -> list[int]:
        """Prompts of rollout n: consecutive slices of per-epoch seeded permutations."""
        B, N = self.config.rollout_batch_size, len(self.prompt_ids)
        orders: dict[int, list[int]] = {}            # one permutation per epoch touched, not one per prompt
        out = []
        for k in range(n * B, (n + 1) * B):
            epoch, at = divmod(k, N)
            if epoch not in orders:
                orders[epoch] = torch.randperm(N, generator=torch.Generator().manual_seed(
                    self.config.seed * 7919 + epoch)).tolist()
            out.append(orders[epoch][at])
        return out

    def completions(self, rollout: Rollout) -> list[str]:
        return completion_texts(rollout, self.tokenizer, self.stop_ids)

    def _reference_logps(self, rollout: Rollout) -> torch.Tensor:
        ref, T = self.reference, self.config.temperature
        if isinstance(ref, nn.Module):
            ref.to(rollout.query.device)
            with evaluating(ref):
                return response_logps(policy_logits(ref, rollout)[0], rollout, T)
        with ref.disable(), evaluating(self.model.policy):                  # the PEFT handle: adapters off
            return response_logps(policy_logits(self.model.policy, rollout)[0], rollout, T)

    @torch.no_grad()
    def make_rollout(self) -> list[dict]:
        with self.autocast():
            return self._make_rollout()

    def _make_rollout(self) -> list[dict]:
        cfg, n = self.config, self.rollouts
        device = next(self.model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + n)
        chosen = self._indices(n)
        rollout = sample_rollout(self.model.policy, [self.prompt_ids[i] for i in chosen],
                                 max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                 stop_ids=self.stop_ids, pad_id=self.tokenizer.pad_id, generator=generator)
        mask = rollout.response_mask
        with evaluating(self.model):
            logits, values = self.model(rollout)
            logps = response_logps(logits, rollout, cfg.temperature)                     # (B, Tr)
            ent = entropy(logits, rollout, cfg.temperature)                              # (B,)
        ref_logps = self._reference_logps(rollout)                                       # (B, Tr)
        prompts, texts = [self.prompts[i] for i in chosen], self.completions(rollout)
        raw_scores = self.reward(rollout, prompts, texts)                                # (B,)
        scores = missing_eos_penalty(raw_scores, rollout.has_eos, cfg.missing_eos_penalty)
        kl = kl_per_token(logps, ref_logps, cfg.kl_estimator) * mask                     # (B, Tr)
        beta = self.kl.beta
        rewards = token_rewards(scores, kl, mask, beta)                                  # (B, Tr)
        if cfg.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        advantages = whiten(advantages, mask)
        seq_kl = kl.sum(1)                                                                # (B,)
        non_score = (-beta * kl).sum(1)
        stats = {"objective/kl": float(seq_kl.mean()), "objective/entropy": float(ent.mean()),
                 "objective/non_score_reward": float(non_score.mean()),
                 "objective/rlhf_reward": float((scores + non_score).mean()),
                 "objective/scores": float(scores.mean()), "objective/kl_coef": beta,
                 "val/num_eos_tokens": float(rollout.has_eos.sum()),
                 "val/completion_length": float(mask.sum(1).float().mean())}
        for name, count in (self.reward.stats() if hasattr(self.reward, "stats") else {}).items():
            stats[f"judge/{name}"] = float(count)     # cumulative: a d-RLAIF judge's unparsed answers are counted
        for name, fn in self.track.items():
            stats[f"objective/{name}"] = float(torch.as_tensor(fn(prompts, texts), dtype=torch.float32).mean())
        self.kl.update(stats["objective/kl"], len(chosen))
        self.rollouts += 1
        self.last_rollout = {"prompts": prompts, "completions": texts, "scores": scores.tolist(), **stats}
        self.history.append(stats)
        tensors = {"query": rollout.query, "query_mask": rollout.query_mask, "response": rollout.response,
                   "response_mask": mask, "has_eos": rollout.has_eos, "logps": logps, "values": values,
                   "advantages": advantages, "returns": returns}
        batches = []
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(len(chosen), generator=torch.Generator().manual_seed(cfg.seed + 31 * n + len(batches)))
            for start in range(0, len(chosen), cfg.minibatch_size):
                idx = order[start:start + cfg.minibatch_size].to(device)
                batches.append({**{k: v[idx] for k, v in tensors.items()}, "stats": stats})
        return batches


class PPOTrainer:
    """PPO on the Trainer. `reward`: a reward model (ValueModel) or `fn(prompts, completions)`;
    `reference`: None (a frozen copy of the policy, or the adapter-free policy when `handle` is
    given), or a model; `track`: text functions logged as objective/<name> (e.g. a true reward).

        result = PPOTrainer(policy, tokenizer, prompts, reward_model, config=PPOConfig(...),
                            train=TrainConfig(lr=1e-5, out_dir="runs/ppo")).fit()
    """

    def __init__(self, policy: nn.Module, tokenizer, prompts: Sequence[str], reward, *,
                 config: Optional[PPOConfig] = None, train: Optional[TrainConfig] = None, handle: Any = None,
                 reference: Optional[nn.Module] = None, reward_tokenizer=None, critic: Optional[nn.Module] = None,
                 track: Optional[dict[str, Callable]] = None, prefix_ids: Sequence[int] = (), callbacks=()):
        self.config = config = config if config is not None else PPOConfig()
        train = train if train is not None else TrainConfig()
        self.train_config = replace(train, max_steps=config.iterations * config.steps_per_rollout)
        if not prompts:
            raise ValueError("prompts=[]: expected at least one prompt")
        if not any(p.requires_grad for p in policy.parameters()):
            raise ValueError("the policy has no parameter with requires_grad=True: PPO would train only the critic; "
                             "expected a trainable policy (or PEFT adapters on it)")
        prompt_ids = encode_prompts(tokenizer, prompts, max_seq_len=policy.config.max_seq_len,
                                    max_new_tokens=config.max_new_tokens, prefix_ids=prefix_ids)
        self.reward = as_reward(reward, policy_tokenizer=tokenizer, reward_tokenizer=reward_tokenizer)
        if config.critic == "separate" and critic is None:
            critic = copy.deepcopy(reward) if isinstance(reward, nn.Module) else reward_model_from(copy.deepcopy(policy))
        self.model = PolicyAndValue(policy, critic if config.critic == "separate" else None)
        if reference is None and handle is None:
            reference = frozen_copy(policy)
        stops = stop_token_ids(tokenizer)
        if not stops:
            raise ValueError("the tokenizer has no EOS or other special token: expected a stop token that ends "
                             "a completion (the reward is read at it)")
        self.source = RolloutSource(self.model, prompt_ids, prompts, self.reward, config, tokenizer,
                                    stop_ids=stops, reference=reference if reference is not None
                                    else handle, track=track)
        self.objective = PPOObjective(config)
        loss = handle.wrap_loss(self.objective.loss) if handle is not None else self.objective.loss
        callbacks = list(callbacks) + (handle.callbacks() if handle is not None else [])
        self.trainer = Trainer(self.model, loss, self.source, config=self.train_config, callbacks=callbacks)
        self.source.autocast = self.trainer.autocast

    def fit(self):
        return self.trainer.fit()
