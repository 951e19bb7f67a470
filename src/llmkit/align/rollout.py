"""PPO rollouts: prompts in, sampled completions out, with the masks and log-probs PPO needs.

A rollout is B prompts, left-padded to Tq tokens, and their completions, right-padded to Tr:

    query (B, Tq)  = [pad ... pad, prompt]        query_mask (B, Tq)
    response (B, Tr) = [y_1 ... y_k = stop, pad]  response_mask (B, Tr): 1 up to and including the
                                                  first stop token, 0 after it (the completion is
                                                  cut after its stop token)
    has_eos (B,)   whether a stop token was produced within max_new_tokens

Completions come from `generation.generate` (one prefill, then one cached step per token), the
fastest path llmkit has. Their log-probs are *not* read from the sampler: they are recomputed by
one forward over query + response, at the sampling temperature,

    log π(y_t | x, y_<t) = log softmax(logits_t / τ)[y_t],

for the policy and the reference alike, so that π and π_ref are compared under the same settings
(a reference scored at τ = 1 against a policy sampled at τ ≠ 1 is the usual source of a negative
KL). Top-k / top-p are refused: the log-probs would not be those of the sampling distribution.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..generation import generate
from ..model.modes import evaluating
from .logps import token_logps


@dataclass
class Rollout:
    query: torch.Tensor          # (B, Tq) left-padded prompt ids
    query_mask: torch.Tensor     # (B, Tq)
    response: torch.Tensor       # (B, Tr) completion ids, pad after the stop token
    response_mask: torch.Tensor  # (B, Tr) 1 on real completion tokens
    has_eos: torch.Tensor        # (B,) bool

    def inputs(self) -> dict:
        """The forward's inputs over query + response: ids, mask and position ids (B, Tq + Tr)."""
        ids = torch.cat([self.query, self.response], dim=1)
        mask = torch.cat([self.query_mask, self.response_mask], dim=1)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)     # left padding: real tokens from 0
        return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}

    def predicting(self) -> torch.Tensor:
        """(B, Tq + Tr) bool: the positions whose logits predict a response token (Tq−1 ... Tq+Tr−2)."""
        B, Tq = self.query.shape
        where = torch.zeros(B, Tq + self.response.shape[1], dtype=torch.bool, device=self.query.device)
        where[:, Tq - 1:-1] = True
        return where


def encode_prompts(tokenizer, prompts: Sequence[str], *, max_seq_len: int, max_new_tokens: int,
                   prefix_ids: Sequence[int] = ()) -> list[list[int]]:
    """prefix_ids + encode(prompt) per prompt; a prompt that leaves no room for max_new_tokens in the
    context is an error naming it (cutting it silently would change what the reward model sees)."""
    out, too_long = [], []
    for i, prompt in enumerate(prompts):
        ids = list(prefix_ids) + tokenizer.encode(prompt, add_special_tokens=False)
        if not ids:
            raise ValueError(f"prompts[{i}]={prompt!r}: encodes to no token; expected a non-empty prompt")
        if len(ids) + max_new_tokens > max_seq_len:
            too_long.append((i, len(ids)))
        out.append(ids)
    if too_long:
        i, n = too_long[0]
        raise ValueError(f"{len(too_long)} prompt(s) too long for the context, e.g. prompts[{i}] = {n} tokens: "
                         f"{n} + max_new_tokens={max_new_tokens} > max_seq_len={max_seq_len}; expected prompts of "
                         f"at most {max_seq_len - max_new_tokens} tokens (shorten them or lower max_new_tokens)")
    return out


def stop_token_ids(tokenizer) -> list[int]:
    """The ids that end a completion: the tokenizer's EOS and its other special tokens, but not pad."""
    special = set(getattr(tokenizer, "special_ids", ()) or ())
    special.discard(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        special.add(tokenizer.eos_token_id)
    return sorted(special)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + list(r) for r in rows], device=device)      # (B, Tq)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)     # (B, Tq)
    return ids, mask


def cut_after_stop(response: torch.Tensor, stop_ids: Sequence[int], pad_id: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(response with pad after the first stop token, mask (B, Tr) through it, has_eos (B,))."""
    is_stop = torch.isin(response, torch.tensor(list(stop_ids), device=response.device))          # (B, Tr)
    # stops before t (exclusive): a token is real while no stop came before it
    before = is_stop.long().cumsum(-1) - is_stop.long()                                           # (B, Tr)
    mask = (before == 0).long()
    return torch.where(mask.bool(), response, torch.full_like(response, pad_id)), mask, is_stop.any(-1)


def sample_rollout(policy, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float,
                   stop_ids: Sequence[int], pad_id: int, generator: Optional[torch.Generator] = None) -> Rollout:
    """Sample one completion per prompt at `temperature` (KV-cached `generate`)."""
    device = next(policy.parameters()).device
    query, query_mask = left_pad(prompt_ids, pad_id, device)
    with evaluating(policy):
        out = generate(policy, query, attention_mask=query_mask, max_new_tokens=max_new_tokens, do_sample=True,
                       temperature=temperature, stop_token_ids=list(stop_ids), generator=generator)  # (B, Tq + n)
    response = out[:, query.shape[1]:]                                                              # (B, n)
    if response.shape[1] == 0:
        raise ValueError("max_new_tokens=0: expected at least one completion token per prompt")
    response, mask, has_eos = cut_after_stop(response, stop_ids, pad_id)
    return Rollout(query, query_mask, response, mask, has_eos)


def completion_texts(rollout: Rollout, tokenizer, stop_ids: Sequence[int]) -> list[str]:
    """Each completion's text: its real tokens without the stop token."""
    return [tokenizer.decode([t for t, m in zip(row, mask) if m and t not in stop_ids])
            for row, mask in zip(rollout.response.tolist(), rollout.response_mask.tolist())]


def response_logps(logits: torch.Tensor, rollout: Rollout, temperature: float) -> torch.Tensor:
    """logits (B, Tr, V) of the predicting positions -> log π(y_t) (B, Tr) at `temperature` (fp32);
    padding positions get 0."""
    B, Tr, V = logits.shape
    scaled = logits.float() / temperature
    logps = token_logps(scaled.reshape(B * Tr, V), rollout.response.reshape(B * Tr)).view(B, Tr)
    return logps * rollout.response_mask


def entropy(logits: torch.Tensor, rollout: Rollout, temperature: float) -> torch.Tensor:
    """Mean per completion of the summed next-token entropy at `temperature`, (B,)."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)                                     # (B, Tr, V)
    per_token = -(logp.exp() * logp).sum(-1) * rollout.response_mask                               # (B, Tr)
    return per_token.sum(-1)


def policy_logits(model, rollout: Rollout, **inputs_override) -> tuple[torch.Tensor, object]:
    """One causal-LM forward over the rollout -> (logits (B, Tr, V) at the predicting positions, output).

    The LM head runs only where a response token is predicted (`logits_index`)."""
    inputs = rollout.inputs()
    where = rollout.predicting()
    out = model(inputs["input_ids"], inputs["attention_mask"], position_ids=inputs["position_ids"],
                logits_index=where, **inputs_override)
    B, Tr = rollout.response.shape
    return out.logits.view(B, Tr, -1), out


@torch.no_grad()
def sample_kl_and_reward(policy, reference, tokenizer, prompts: Sequence[str], reward_fn, *, max_new_tokens: int,
                         temperature: float = 1.0, batch_size: int = 64, seed: int = 0) -> dict:
    """Monte Carlo E_{y~π}[R(x, y)] and KL(π‖π_ref) per completion = E_{y~π}[Σ_t log π(y_t) − log π_ref(y_t)]
    over one sampled completion per prompt (both at `temperature`): the axes of a reward-vs-KL plot."""
    stops, pad = stop_token_ids(tokenizer), tokenizer.pad_id
    device = next(policy.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    ids = encode_prompts(tokenizer, prompts, max_seq_len=policy.config.max_seq_len, max_new_tokens=max_new_tokens)
    rewards, kls = [], []
    for start in range(0, len(ids), batch_size):
        rollout = sample_rollout(policy, ids[start:start + batch_size], max_new_tokens=max_new_tokens,
                                 temperature=temperature, stop_ids=stops, pad_id=pad, generator=generator)
        with evaluating(policy), evaluating(reference):
            logps = response_logps(policy_logits(policy, rollout)[0], rollout, temperature)         # (B, Tr)
            ref = response_logps(policy_logits(reference, rollout)[0], rollout, temperature)        # (B, Tr)
        kls += (logps - ref).sum(1).tolist()
        texts = completion_texts(rollout, tokenizer, stops)
        rewards += [float(r) for r in reward_fn(prompts[start:start + batch_size], texts)]
    return {"reward": sum(rewards) / len(rewards), "kl": sum(kls) / len(kls), "n": len(rewards)}
