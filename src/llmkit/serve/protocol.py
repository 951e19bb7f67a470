"""Request bodies of /v1/completions and /v1/chat/completions, and their checks.

Two layers of checking, as the OpenAI API does it:
- the shape (pydantic): a body that is not JSON, lacks a required field or has a value of the wrong
  JSON type is a 422 naming the field;
- the values (`sampling_params`): a temperature outside [0, 2], a max_tokens past the context, an
  unsupported option is a 400 naming the parameter, the value and what was expected.

Unknown fields are ignored (clients send new ones all the time). vLLM's extras are accepted too:
top_k, ignore_eos, repetition_penalty.
"""
from __future__ import annotations

from typing import Optional, Union

from pydantic import BaseModel, ConfigDict

from ..infer.params import MAX_LOGPROBS, SamplingParams
from .errors import APIError, bad_request


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: Optional[str] = None                  # None: the base model
    n: int = 1
    temperature: Optional[float] = None          # None: 1.0, as OpenAI
    top_p: Optional[float] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None                   # accepted and ignored (OpenAI uses it for abuse monitoring)
    logit_bias: Optional[dict[str, float]] = None
    # vLLM's extras
    top_k: Optional[int] = None
    ignore_eos: bool = False
    repetition_penalty: Optional[float] = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = None             # None: 16, as OpenAI (less if the context is shorter)
    logprobs: Optional[int] = None
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None


class TextPart(_Body):
    type: str
    text: Optional[str] = None


class ChatMessage(_Body):
    role: str
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[dict]] = None
    tool_call_id: Optional[str] = None


class ResponseFormat(_Body):
    type: str


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None  # OpenAI's newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[dict]] = None
    tool_choice: Union[str, dict, None] = None


def _number(req, name: str, low: float, high: float, *, low_open: bool = False) -> None:
    value = getattr(req, name)
    if value is None:
        return
    if value != value or value < low or value > high or (low_open and value == low):   # value != value: NaN
        bracket = "(" if low_open else "["
        raise bad_request(name, f"{name}={value!r}: expected a number in {bracket}{low:g}, {high:g}]")


def check_common(req: _Sampling) -> None:
    """The value checks every endpoint shares (400 naming the parameter)."""
    _number(req, "temperature", 0, 2)
    _number(req, "top_p", 0, 1, low_open=True)
    _number(req, "presence_penalty", -2, 2)
    _number(req, "frequency_penalty", -2, 2)
    if req.repetition_penalty is not None and not req.repetition_penalty > 0:
        raise bad_request("repetition_penalty", f"repetition_penalty={req.repetition_penalty!r}: "
                                                "expected a number > 0 (1 = none)")
    if req.n < 1:
        raise bad_request("n", f"n={req.n!r}: expected an integer >= 1")
    if req.top_k is not None and req.top_k != -1 and req.top_k < 1:
        raise bad_request("top_k", f"top_k={req.top_k!r}: expected an integer >= 1, or -1 (no top-k)")
    stops = [req.stop] if isinstance(req.stop, str) else req.stop or []
    if any(not s for s in stops):
        raise bad_request("stop", f"stop={req.stop!r}: expected non-empty strings")
    if req.logit_bias:
        raise bad_request("logit_bias", "logit_bias is not supported by this server: expected none or {}")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options", "stream_options is only allowed with stream=true")


def check_completion(req: CompletionRequest) -> None:
    check_common(req)
    if req.suffix:
        raise bad_request("suffix", "suffix (insertion) is not supported by this server: expected none")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of", f"best_of={req.best_of!r}: expected none or equal to n={req.n} "
                                     "(this server does not rank samples)")
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
        raise bad_request("logprobs", f"logprobs={req.logprobs!r}: expected an integer in [0, {MAX_LOGPROBS}]")
    if req.echo and req.logprobs is not None:
        raise bad_request("echo", "echo=true with logprobs: the prompt's log-probabilities are not computed by "
                                  "this server; expected echo or logprobs, not both")
    if isinstance(req.prompt, list) and not req.prompt:
        raise bad_request("prompt", "prompt=[]: expected a string, a list of strings or of token ids")


def check_chat(req: ChatCompletionRequest) -> None:
    check_common(req)
    if not req.messages:
        raise bad_request("messages", "messages=[]: expected at least one message")
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise bad_request("top_logprobs", "top_logprobs needs logprobs=true")
        if not 0 <= req.top_logprobs <= MAX_LOGPROBS:
            raise bad_request("top_logprobs", f"top_logprobs={req.top_logprobs!r}: expected an integer in "
                                              f"[0, {MAX_LOGPROBS}]")
    if req.response_format is not None and req.response_format.type not in ("text", "json_object"):
        raise bad_request("response_format", f"response_format.type={req.response_format.type!r}: expected 'text' "
                                             "or 'json_object' (JSON schemas are not supported)")
    if req.tools:
        raise bad_request("tools", "tools (function calling) are not supported by this server: expected none")


def max_new_tokens(requested: Optional[int], prompt_len: int, context: int, default: Optional[int],
                   name: str = "max_tokens") -> int:
    """The completion budget: the request's, checked against the context; else `default` (None: all
    that is left of the context), cut to what is left."""
    room = context - prompt_len
    if requested is None:
        return max(1, room if default is None else min(default, room))
    if requested < 1:
        raise bad_request(name, f"{name}={requested!r}: expected an integer >= 1")
    if requested > room:
        raise bad_request(name, f"This model's maximum context length is {context} tokens. However, you "
                                f"requested {prompt_len + requested} tokens ({prompt_len} in the prompt, "
                                f"{requested} for the completion). Expected {name} <= {max(room, 0)}.")
    return requested


def sampling_params(req: _Sampling, max_tokens: int, logprobs: Optional[int], allowed_tokens=None) -> SamplingParams:
    """The engine's SamplingParams for a checked request (allowed_tokens: JSON mode's constraint)."""
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=None if req.top_k in (None, -1) else req.top_k,
            n=req.n, stop=req.stop or (), seed=req.seed, logprobs=logprobs, ignore_eos=req.ignore_eos,
            presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            allowed_tokens=allowed_tokens)
    except ValueError as exc:           # "SamplingParams.<field>=...": the field is the parameter
        message = str(exc)
        param = message.split("=", 1)[0].removeprefix("SamplingParams.") if message.startswith("SamplingParams.") \
            else None
        raise APIError(400, message, param=param) from exc

