"""Text generation: greedy and sampled decoding through `KVCache`, for decoder-only and
encoder-decoder models.

    out = generate(model, input_ids, max_new_tokens=32, do_sample=True, top_p=0.9)   # (B, T + n)
    for tokens in stream_generate(model, input_ids, params=SamplingParams(...)):     # (B,) per step
        ...

One prefill forward runs over the prompt, then one forward per new token reads the cache.
Left-padded batches (`attention_mask` with zeros) get position ids cumsum(mask) - 1 (as in
Hugging Face) and a mask that grows with each new token; unpadded batches pass no mask at all so
SDPA keeps its fused path. Per step, the logits go through the processors below in Hugging Face's
order: repetition penalty, temperature, top-k, top-p, then argmax or a multinomial draw.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import torch

from .model.cache import KVCache
from .model.modes import evaluating

StopIds = Optional[Union[int, Sequence[int]]]


@dataclass
class SamplingParams:
    """How to pick each new token. Invalid values raise ValueError naming field, value, expected.

    `stop_token_ids=None` means "the model's eos_token_id, if it has one"; `[]` means never stop.
    Temperature, top-k and top-p only matter when `do_sample=True` (they never change an argmax).
    """
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    repetition_penalty: float = 1.0
    stop_token_ids: StopIds = None

    def __post_init__(self) -> None:
        def fail(name: str, expected: str) -> None:
            raise ValueError(f"SamplingParams.{name}={getattr(self, name)!r}: expected {expected}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            fail("max_new_tokens", "an integer >= 0")
        if not isinstance(self.do_sample, bool):
            fail("do_sample", "True or False")
        if not is_num(self.temperature) or self.temperature < 0 or (self.do_sample and self.temperature == 0):
            fail("temperature", "a number > 0 when do_sample=True (>= 0 for greedy, where it is ignored)")
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 1):
            fail("top_k", "None or an integer >= 1")
        if self.top_p is not None and (not is_num(self.top_p) or not 0 < self.top_p <= 1):
            fail("top_p", "None or a number in (0, 1]")
        if not is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            fail("repetition_penalty", "a number > 0 (1.0 = no penalty)")
        if self.stop_token_ids is not None:
            ids = [self.stop_token_ids] if is_int(self.stop_token_ids) else self.stop_token_ids
            if not isinstance(ids, (list, tuple)) or not all(is_int(i) and i >= 0 for i in ids):
                fail("stop_token_ids", "None, a token id >= 0, or a list of them")
            self.stop_token_ids = tuple(ids)


# ---- logit processors: pure functions on (B, V) logits ------------------------------------------

def apply_repetition_penalty(logits: torch.Tensor, token_ids: torch.Tensor, penalty: float,
                             mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al., 2019): for every token id already in the sequence,
    logit' = logit / penalty if logit > 0 else logit * penalty (penalty > 1 discourages repeats).

    logits: (B, V); token_ids: (B, T) the sequence so far; mask: (B, T), 0 marks padding to ignore.
    """
    if penalty == 1.0:
        return logits
    weight = torch.ones_like(token_ids, dtype=logits.dtype) if mask is None else mask.to(logits.dtype)
    counts = torch.zeros_like(logits).scatter_add_(1, token_ids, weight)             # (B, V)
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)          # (B, V)
    return torch.where(counts > 0, penalized, logits)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """p_i = softmax(z / T)_i: T < 1 sharpens the distribution, T > 1 flattens it."""
    return logits if temperature == 1.0 else logits / temperature


def apply_top_k(logits: torch.Tensor, k) -> torch.Tensor:
    """Top-k sampling (Fan et al., 2018): keep the k largest logits per row (ties with the k-th
    are kept), set the rest to -inf. k: an int for every row, or a (B,) LongTensor, one per row
    (values >= V keep the whole row)."""
    if isinstance(k, torch.Tensor):
        k = k.clamp(max=logits.shape[-1])
        kth = logits.sort(dim=-1, descending=True).values.gather(-1, (k - 1)[:, None])   # (B, 1)
        return logits.masked_fill(logits < kth, float("-inf"))
    if k is None or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]                             # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: Optional[float]) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al., 2020): keep the smallest set of most likely tokens whose
    cumulative probability is >= p, i.e. token i (sorted by probability) survives iff the mass
    strictly before it is < p. The most likely token always survives; the rest become -inf.
    p: a float for every row, or a (B,) tensor, one per row (rows with p >= 1 keep everything)."""
    per_row = isinstance(p, torch.Tensor)
    if not per_row and (p is None or p >= 1.0):
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)               # (B, V)
    probs = sorted_logits.float().softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs                                       # (B, V)
    drop_sorted = mass_before >= (p[:, None] if per_row else p)
    if per_row:
        drop_sorted &= (p < 1)[:, None]
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)                               # back to vocab order
    return logits.masked_fill(drop, float("-inf"))


def process_logits(logits: torch.Tensor, params: SamplingParams, token_ids: torch.Tensor,
                   mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """All processors in Hugging Face's order; the warpers are skipped for greedy decoding."""
    logits = apply_repetition_penalty(logits.float(), token_ids, params.repetition_penalty, mask)
    if params.do_sample:
        logits = apply_top_p(apply_top_k(apply_temperature(logits, params.temperature), params.top_k),
                             params.top_p)
    return logits


def pick_tokens(logits: torch.Tensor, do_sample: bool,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B, V) processed logits -> (B,) token ids: argmax, or one draw from softmax(logits)."""
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = logits.float().softmax(dim=-1)                                           # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


# ---- decoding loop -------------------------------------------------------------------------------

def _resolve(params: Optional[SamplingParams], options: dict) -> SamplingParams:
    from_keywords = SamplingParams(**options)
    if params is None:
        return from_keywords
    if not isinstance(params, SamplingParams):
        raise ValueError(f"params={params!r}: expected a SamplingParams or None")
    defaults = SamplingParams()
    changed = [k for k in options if getattr(defaults, k) != getattr(from_keywords, k)]
    if changed:
        raise ValueError(f"pass sampling options either as params= or as keywords, not both "
                         f"(got params and {', '.join(changed)})")
    return params


def _decoder_start(config) -> int:
    start = config.decoder_start_token_id
    start = config.bos_token_id if start is None else start
    if start is None:
        raise ValueError("ModelConfig.decoder_start_token_id=None (and bos_token_id=None): "
                         "expected the token an encoder-decoder starts decoding from")
    return start


@torch.inference_mode()
def _decode(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
            params: SamplingParams, generator: Optional[torch.Generator]
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (tokens (B,), raw logits (B, V)) per step. The decorator enters inference mode only
    while this generator runs, so nothing leaks into the caller's code between steps."""
    config = model.config
    if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.dtype != torch.long:
        raise ValueError(f"input_ids has shape {tuple(input_ids.shape)} and dtype {input_ids.dtype}: "
                         "expected a (batch, length >= 1) LongTensor")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}: expected "
                         f"{tuple(input_ids.shape)} like input_ids")
    B, T = input_ids.shape
    device, n_new = input_ids.device, params.max_new_tokens
    stops = params.stop_token_ids
    if stops is None:  # default: the model's eos (an int, or a list as some HF configs have)
        eos = config.eos_token_id
        stops = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    stop_ids = torch.tensor(stops, dtype=torch.long, device=device)
    pad_id = config.pad_token_id if config.pad_token_id is not None else (stops[0] if stops else 0)
    padded = attention_mask is not None and not bool(attention_mask.all())
    encoder_decoder = config.is_encoder_decoder
    if encoder_decoder:
        tokens = torch.full((B, 1), _decoder_start(config), dtype=torch.long, device=device)  # (B, 1)
        seq_mask = None                                                              # decoder has no padding
    else:
        tokens, seq_mask = input_ids, (attention_mask if padded else None)          # (B, T)
    if n_new == 0:
        return
    if config.positional in ("learned", "sinusoidal") and tokens.shape[1] + n_new - 1 > config.max_seq_len:
        raise ValueError(f"max_new_tokens={n_new}: {tokens.shape[1]} prompt tokens + {n_new} new ones "
                         f"exceed ModelConfig.max_seq_len={config.max_seq_len}")

    with evaluating(model):  # no_grad inside inference mode: inference mode stays on
        cache = KVCache(capacity=tokens.shape[1] + n_new)
        if encoder_decoder:
            out = model(input_ids, attention_mask, decoder_input_ids=tokens, cache=cache)
            memory = out.encoder_last_hidden_state                                   # (B, S, d)
        elif padded:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)       # (B, T)
            next_pos = attention_mask.long().sum(-1)                                 # (B,)
            out = model(tokens, attention_mask, position_ids=position_ids, cache=cache, logits_to_keep=1)
        else:
            out = model(tokens, cache=cache, logits_to_keep=1)
        logits = out.logits[:, -1]                                                   # (B, V)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(n_new):
            scores = process_logits(logits, params, tokens, seq_mask)
            new = pick_tokens(scores, params.do_sample, generator)                   # (B,)
            new = torch.where(finished, torch.full_like(new, pad_id), new)
            finished |= torch.isin(new, stop_ids)
            yield new, logits
            if step == n_new - 1 or bool(finished.all()):
                return
            tokens = torch.cat([tokens, new[:, None]], dim=1)                        # (B, t + 1)
            if encoder_decoder:
                out = model(None, attention_mask, decoder_input_ids=new[:, None],
                            encoder_hidden_states=memory, cache=cache)
            elif padded:
                seq_mask = torch.cat([seq_mask, seq_mask.new_ones(B, 1)], dim=1)     # (B, t + 1)
                out = model(new[:, None], seq_mask, position_ids=next_pos[:, None], cache=cache)
                next_pos = next_pos + 1
            else:
                out = model(new[:, None], cache=cache)
            logits = out.logits[:, -1]                                               # (B, V)


def stream_generate(model, input_ids: torch.Tensor, *, params: Optional[SamplingParams] = None,
                    max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                    top_k: Optional[int] = None, top_p: Optional[float] = None,
                    repetition_penalty: float = 1.0, stop_token_ids: StopIds = None,
                    attention_mask: Optional[torch.Tensor] = None,
                    generator: Optional[torch.Generator] = None) -> Iterator[torch.Tensor]:
    """Yield the new token of every row, a (B,) LongTensor, one decoding step at a time.

    Rows that produced a stop token keep yielding the pad token (config.pad_token_id, else the
    first stop token); the stream ends after max_new_tokens steps or once every row has stopped.
    Options as in `generate`.
    """
    params = _resolve(params, dict(max_new_tokens=max_new_tokens, do_sample=do_sample,
                                   temperature=temperature, top_k=top_k, top_p=top_p,
                                   repetition_penalty=repetition_penalty, stop_token_ids=stop_token_ids))
    for new, _ in _decode(model, input_ids, attention_mask, params, generator):
        yield new.clone()  # a normal tensor, usable with autograd later (e.g. RL rollouts)


def generate(model, input_ids: torch.Tensor, *, params: Optional[SamplingParams] = None,
             max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None,
             repetition_penalty: float = 1.0, stop_token_ids: StopIds = None,
             attention_mask: Optional[torch.Tensor] = None,
             generator: Optional[torch.Generator] = None, return_logits: bool = False):
    """Generate up to `max_new_tokens` tokens after `input_ids` (B, T) and return the sequences.

    model: a `CausalLM` or a `Seq2SeqLM` (anything with `.config` whose forward takes `cache=`).
    Decoder-only models return prompt + new tokens, (B, T + n); encoder-decoders encode
    `input_ids` once and return the decoder sequence [decoder_start, new tokens...], (B, 1 + n),
    as Hugging Face does. `attention_mask` (B, T): 1 = real token, 0 = (left) padding.
    Sampling options come as keywords or as `params=SamplingParams(...)`, not both.
    With `return_logits=True`, also return the raw model logits that produced each new token,
    (B, n, V), before any processor. Pass a seeded `torch.Generator` for reproducible sampling.
    """
    params = _resolve(params, dict(max_new_tokens=max_new_tokens, do_sample=do_sample,
                                   temperature=temperature, top_k=top_k, top_p=top_p,
                                   repetition_penalty=repetition_penalty, stop_token_ids=stop_token_ids))
    new_tokens, step_logits = [], []
    for new, logits in _decode(model, input_ids, attention_mask, params, generator):
        new_tokens.append(new)
        if return_logits:
            step_logits.append(logits)
    prefix = (input_ids.new_full((input_ids.shape[0], 1), _decoder_start(model.config))   # (B, 1)
              if model.config.is_encoder_decoder else input_ids)
    # Outside inference mode: torch.cat/stack of inference tensors give normal tensors.
    sequences = torch.cat([prefix, *[t[:, None] for t in new_tokens]], dim=1)        # (B, T + n)
    if not return_logits:
        return sequences
    empty = torch.empty(input_ids.shape[0], 0, model.config.vocab_size, device=input_ids.device)
    return sequences, torch.stack(step_logits, dim=1) if step_logits else empty     # (B, n, V)
