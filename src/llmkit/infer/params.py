"""The engine's per-request sampling parameters, in the OpenAI / vLLM convention.

`llmkit.generation.SamplingParams` follows Hugging Face's `generate` (do_sample, max_new_tokens);
this one follows the OpenAI API that the server exposes and vLLM's `SamplingParams`:
temperature 0 means greedy, `max_tokens` counts new tokens, `n` samples share one prompt.

Per step, the logits of a sequence go through (in this order):

    repetition penalty (CTRL):   z_v / rp if z_v > 0 else z_v * rp, for v in prompt + output
    presence / frequency (OpenAI):  z_v -= presence * [c_v > 0] + frequency * c_v,
                                    c_v = count of v in the output so far
    temperature, top-k, top-p    as in llmkit.generation (skipped when temperature == 0)

then, with `allowed_tokens`, every token outside its mask set to -inf (constrained decoding: JSON
mode, infer/json_mode.py), then an argmax (temperature 0) or a draw from the request's own seeded generator, so a seeded
request gives the same tokens whatever else shares its batches. `logprobs=k` returns the chosen
token's log-probability and the k most likely tokens', from the model's raw distribution
(log_softmax of the logits before any processor, as vLLM does by default).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


MAX_LOGPROBS = 20          # the OpenAI API's top_logprobs limit


@dataclass
class SamplingParams:
    """How one request samples. Invalid values raise ValueError naming the field, the value and what
    was expected; `Engine.add_request` validates before it takes anything, so a bad request never
    disturbs the others.

    stop: strings that end the completion (they and what follows are cut from the text; needs the
    engine's tokenizer). stop_token_ids: ids that end it (kept in the output ids). The model's
    eos_token_id ends it too unless ignore_eos. seed: a per-request generator; None draws a seed
    from the engine's generator."""
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Optional[int] = None
    n: int = 1
    stop: Sequence[str] = field(default_factory=tuple)
    stop_token_ids: Sequence[int] = field(default_factory=tuple)
    ignore_eos: bool = False
    seed: Optional[int] = None
    logprobs: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    allowed_tokens: Optional[Callable] = None   # output ids -> (V,) bool mask of the tokens allowed next (json_mode.py)

    def __post_init__(self) -> None:
        def fail(name: str, expected: str) -> None:
            raise ValueError(f"SamplingParams.{name}={getattr(self, name)!r}: expected {expected}")

        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            fail("max_tokens", "an integer >= 1")
        if not _is_num(self.temperature) or self.temperature < 0:
            fail("temperature", "a number >= 0 (0 = greedy)")
        if not _is_num(self.top_p) or not 0 < self.top_p <= 1:
            fail("top_p", "a number in (0, 1]")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            fail("top_k", "None or an integer >= 1")
        if not _is_int(self.n) or self.n < 1:
            fail("n", "an integer >= 1")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            fail("stop", "a non-empty string or a list of them")
        self.stop = tuple(self.stop)
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
                _is_int(i) and i >= 0 for i in self.stop_token_ids):
            fail("stop_token_ids", "a list of token ids >= 0")
        self.stop_token_ids = tuple(self.stop_token_ids)
        if not isinstance(self.ignore_eos, bool):
            fail("ignore_eos", "True or False")
        if self.seed is not None and not _is_int(self.seed):
            fail("seed", "None or an integer")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            fail("logprobs", f"None or an integer in [0, {MAX_LOGPROBS}]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not _is_num(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                fail(name, "a number in [-2, 2]")
        if not _is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            fail("repetition_penalty", "a number > 0 (1.0 = no penalty)")
        if self.allowed_tokens is not None and not callable(self.allowed_tokens):
            fail("allowed_tokens", "None or a callable: output ids -> (V,) bool mask")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        """Anything that reads the sequence's own history per step (penalties, a token constraint):
        such rows are processed one by one and never speculate."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.allowed_tokens is not None)


ParamsArg = Union[SamplingParams, Sequence[SamplingParams], None]
