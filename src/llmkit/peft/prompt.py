"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning").

p trained virtual token embeddings P ∈ R^{p×d} are prepended to the input embeddings,

    [P; E(x_1), ..., E(x_T)]  ->  the frozen stack,

through the stack's `input_prompt` slot (model/transformer.py handles the attention mask, the
positions 0..p-1, the KV cache, and cuts the p positions from the output). P starts as:
- init="random": N(0, σ²) with σ the token embedding table's standard deviation;
- init="vocab": p rows of the embedding table drawn at random (the paper's sampled-vocabulary init);
- init="text": the embeddings of `init_text` tokenized (repeated / cut to p tokens, as HF peft
  does), with `tokenizer=` an llmkit or `tokenizers` tokenizer; the token ids are kept in the
  config (`init_token_ids`) so a saved adapter rebuilds without it.
An encoder-decoder gets the prompt on its encoder. Trainable parameters: p · d.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from .errors import PeftError
from .registry import AdapterConfig, Method, register

INITS = ("random", "vocab", "text")


def check_virtual_tokens(n) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise PeftError(f"num_virtual_tokens={n!r}: expected a positive integer")


@dataclass
class PromptTuningConfig(AdapterConfig):
    num_virtual_tokens: int = 20
    init: str = "random"
    init_text: Optional[str] = None
    init_token_ids: Optional[list[int]] = None
    tokenizer: Any = field(default=None, repr=False)      # only to encode init_text; not saved

    def __post_init__(self) -> None:
        super().__post_init__()
        check_virtual_tokens(self.num_virtual_tokens)
        if self.init not in INITS:
            raise PeftError(f"init={self.init!r}: expected one of {list(INITS)}")
        if self.init == "text" and self.init_token_ids is None:
            if not self.init_text or self.tokenizer is None:
                raise PeftError("init='text': give init_text= and tokenizer= (or init_token_ids=)")
            encoded = self.tokenizer.encode(self.init_text)
            self.init_token_ids = list(getattr(encoded, "ids", encoded))
        if self.init == "text" and not self.init_token_ids:
            raise PeftError(f"init_text={self.init_text!r}: encodes to no tokens")


class PromptEmbedding(nn.Module):
    """forward(x) -> P expanded to x's batch: (B, p, d)."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.length = init.shape[0]
        self.prompt = nn.Parameter(init.clone())                                   # (p, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prompt.unsqueeze(0).expand(x.shape[0], -1, -1)                 # (B, p, d)


def embedding_table(stack: nn.Module, what: str) -> torch.Tensor:
    """The token embedding weight a stack's inputs come from (BART's stacks share their parent's)."""
    for module in (stack, getattr(stack, "_shared_embedding", None)):
        table = getattr(module, "embed_tokens", None)
        if table is not None:
            return getattr(table, "base_layer", table).weight
    raise PeftError(f"{what}: the stack has no token embedding to size or initialise the prompt from")


@register
class PromptTuning(Method):
    name = "prompt_tuning"
    config_class = PromptTuningConfig
    placement, slot, default_targets = "slot", "input_prompt", None

    def narrow(self, names: list[str]) -> list[str]:
        return names[:1]

    def make_adapter(self, stack: nn.Module, config: PromptTuningConfig) -> nn.Module:
        table = embedding_table(stack, self.name).detach()                         # (V, d)
        p, scale = config.num_virtual_tokens, getattr(stack, "embed_scale", 1.0)
        if config.init == "text":
            ids = torch.tensor((config.init_token_ids * p)[:p])
            if int(ids.max()) >= table.shape[0]:
                raise PeftError(f"init_token_ids: id {int(ids.max())} is outside the vocabulary of {table.shape[0]}")
            init = table[ids] * scale
        elif config.init == "vocab":
            init = table[torch.randint(0, table.shape[0], (p,))] * scale
        else:
            init = torch.randn(p, table.shape[1], dtype=table.dtype) * table.float().std().item() * scale
        return PromptEmbedding(init.to(device=table.device, dtype=table.dtype))

    def trainable_count(self, stack: nn.Module, config: PromptTuningConfig) -> int:
        return config.num_virtual_tokens * stack.config.d_model
