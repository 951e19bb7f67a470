"""Transformer stacks: `Transformer` (decoder-only or encoder) and `EncoderDecoder`.

A `Transformer` is embeddings (tokens, positions, token types, optional norm) followed by
`n_layers` blocks and an optional final norm. It returns hidden states; heads live in heads.py.
`EncoderDecoder` (BART) owns one token embedding shared by a bidirectional encoder and a causal
decoder with cross-attention.

Extension point for PEFT: `input_prompt` (an `AdapterSlot`, combine "prompt") returns p virtual
token embeddings (B, p, d) that are prepended to the input embeddings (prompt tuning, Lester et
al. 2021). They take positions 0..p-1, get token type 0 and an all-ones attention mask, go into
the KV cache with the prompt, and are cut from the returned hidden states, so heads, losses and
poolers see the T real positions only. A PEFT `kv_prefix` of P positions in the blocks acts as P
past tokens: every real position is shifted by P, as in HF peft.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..config import ModelConfig
from .block import Block
from .cache import KVCache
from .dropout import Dropout
from .masks import build_attention_mask, padding_mask
from .norms import build_norm
from .positions import RotaryEmbedding, sinusoidal_table
from .slots import virtual_length


@dataclass
class ModelOutput:
    """What every llmkit model returns; fields a model does not produce stay None."""
    logits: Optional[torch.Tensor] = None                 # (B, T, V) or (B, n_labels)
    last_hidden_state: Optional[torch.Tensor] = None      # (B, T, d)
    cache: Optional[KVCache] = None
    pooler_output: Optional[torch.Tensor] = None          # (B, d)
    nsp_logits: Optional[torch.Tensor] = None             # (B, 2)
    values: Optional[torch.Tensor] = None                 # (B, T) scalar per token
    embeddings: Optional[torch.Tensor] = None             # (B, d_proj)
    encoder_last_hidden_state: Optional[torch.Tensor] = None


class Transformer(nn.Module):
    adapter_slots = {"input_prompt": "prompt"}

    def __init__(self, config: ModelConfig, *, causal: Optional[bool] = None,
                 n_layers: Optional[int] = None, cross_attention: bool = False,
                 token_embedding: bool = True):
        super().__init__()
        self.config = config
        self.causal = config.causal if causal is None else causal
        self.sliding_window = config.sliding_window if self.causal else None
        d = config.d_model
        self.embed_tokens = nn.Embedding(config.vocab_size, d) if token_embedding else None
        self.embed_positions = None
        if config.positional == "learned":
            self.embed_positions = nn.Embedding(config.max_seq_len + config.position_offset, d)
        elif config.positional == "sinusoidal":
            self.register_buffer("sinusoids", sinusoidal_table(config.max_seq_len, d), persistent=False)
        self.rotary = RotaryEmbedding(config) if config.positional == "rope" else None
        self.embed_token_types = nn.Embedding(config.type_vocab_size, d) if config.type_vocab_size else None
        self.embed_norm = build_norm(config) if config.embed_norm else None
        self.embed_dropout = Dropout(config.dropout)
        self.embed_scale = math.sqrt(d) if config.scale_embedding else 1.0
        self.layers = nn.ModuleList(
            Block(config, cross_attention=cross_attention) for _ in range(n_layers or config.n_layers))
        for block in self.layers:               # what routed / gated adapters check (CoDA, APT)
            block.causal = block.self_attn.causal = self.causal
        self.final_norm = build_norm(config) if config.final_norm else None
        self.input_prompt: Optional[nn.Module] = None

    def _prompt(self, inputs_embeds, attention_mask, position_ids, token_type_ids, past: int):
        """Prepend the running prompt (first pass only; later passes find it in the cache) and
        widen the mask, positions and token types to match. Returns them and the p positions added."""
        p = virtual_length(self.input_prompt)
        if not p:
            return inputs_embeds, attention_mask, position_ids, token_type_ids, 0
        B = inputs_embeds.shape[0]
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(B, p), attention_mask], dim=1)
        if past:                                       # the prompt sits in the cache already
            return inputs_embeds, attention_mask, None if position_ids is None else position_ids + p, token_type_ids, 0
        prompt = self.input_prompt(inputs_embeds).to(inputs_embeds.dtype)              # (B, p, d)
        inputs_embeds = torch.cat([prompt, inputs_embeds], dim=1)                      # (B, p + T, d)
        if position_ids is not None:
            head = torch.arange(p, device=position_ids.device).expand(B, p)
            position_ids = torch.cat([head, position_ids + p], dim=1)
        if token_type_ids is not None:
            token_type_ids = torch.cat([token_type_ids.new_zeros(B, p), token_type_ids], dim=1)
        return inputs_embeds, attention_mask, position_ids, token_type_ids, p

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,         # (B, T)
        attention_mask: Optional[torch.Tensor] = None,    # (B, past + T), 1 = real token
        *,
        position_ids: Optional[torch.Tensor] = None,      # (B, T)
        token_type_ids: Optional[torch.Tensor] = None,    # (B, T)
        inputs_embeds: Optional[torch.Tensor] = None,     # (B, T, d) instead of input_ids
        cache: Optional[KVCache] = None,
        memory: Optional[torch.Tensor] = None,            # encoder states for cross-attention
        memory_attention_mask: Optional[torch.Tensor] = None,
        doc_ids: Optional[torch.Tensor] = None,           # (B, T) packed-document index: no cross-doc attention
    ) -> ModelOutput:
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("Transformer.forward: pass input_ids or inputs_embeds")
            if self.embed_tokens is None:
                raise ValueError("this stack has no token embedding; pass inputs_embeds")
            inputs_embeds = self.embed_tokens(input_ids) * self.embed_scale           # (B, T, d)
        past = cache.length if cache is not None else 0
        inputs_embeds, attention_mask, position_ids, token_type_ids, prompt_len = self._prompt(
            inputs_embeds, attention_mask, position_ids, token_type_ids, past)
        if prompt_len and doc_ids is not None:
            raise ValueError("a prompt (prompt tuning) cannot precede packed documents (doc_ids): every "
                             "document would need its own copy; set data.packing: false")
        B, T, _ = inputs_embeds.shape                  # T counts the prompt's p positions
        shift = max([0] + [virtual_length(block.self_attn.kv_prefix) for block in self.layers])
        paged = getattr(cache, "paged", False)          # the engine: (1, N) tokens of many sequences
        if paged and (prompt_len or shift or position_ids is None):
            raise ValueError("a paged cache needs explicit position_ids and no prompt / prefix adapters")
        if (not paged and shift + past + T > self.config.max_seq_len
                and self.config.positional in ("learned", "sinusoidal")):
            raise ValueError(f"sequence length {shift + past + T} (with {shift} prefix positions) exceeds "
                             f"max_seq_len={self.config.max_seq_len}")
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=inputs_embeds.device).unsqueeze(0).expand(B, T)
        if shift:
            position_ids = position_ids + shift

        x = inputs_embeds
        if self.embed_positions is not None:
            x = x + self.embed_positions(position_ids + self.config.position_offset)
        elif self.config.positional == "sinusoidal":
            x = x + self.sinusoids[position_ids].to(x.dtype)
        if self.embed_token_types is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(position_ids)
            x = x + self.embed_token_types(token_type_ids)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = self.embed_dropout(x)

        mask, is_causal = None, False                  # paged: the cache masks per sequence (infer/batch.py)
        if not paged:
            mask, is_causal = build_attention_mask(
                batch_size=B, q_len=T, past_len=past, attention_mask=attention_mask, causal=self.causal,
                sliding_window=self.sliding_window,
                alibi_heads=self.config.n_heads if self.config.positional == "alibi" else 0,
                dtype=x.dtype, device=x.device, doc_ids=doc_ids)
        rope = self.rotary(position_ids, x.dtype) if self.rotary is not None else None
        memory_mask = padding_mask(memory_attention_mask, x.dtype) if memory is not None else None
        for i, block in enumerate(self.layers):
            x = block(x, mask=mask, is_causal=is_causal, rope=rope, cache=cache, layer=i,
                      memory=memory, memory_mask=memory_mask)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return ModelOutput(last_hidden_state=x[:, prompt_len:] if prompt_len else x, cache=cache)


class EncoderDecoder(nn.Module):
    """A bidirectional encoder and a causal decoder with cross-attention, sharing token embeddings."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        self.encoder = Transformer(config, causal=False, token_embedding=False)
        self.decoder = Transformer(config, causal=True, n_layers=config.decoder_layers,
                                   cross_attention=True, token_embedding=False)
        # The stacks' input embedding, for PEFT prompts (a plain reference, not a submodule).
        for stack in (self.encoder, self.decoder):
            stack.__dict__["_shared_embedding"] = self

    def encode(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        embeds = self.embed_tokens(input_ids) * self.embed_scale                   # (B, S, d)
        return self.encoder(attention_mask=attention_mask, inputs_embeds=embeds).last_hidden_state

    def decode(self, decoder_input_ids, memory, memory_attention_mask=None,
               decoder_attention_mask=None, cache=None) -> ModelOutput:
        embeds = self.embed_tokens(decoder_input_ids) * self.embed_scale           # (B, T, d)
        return self.decoder(attention_mask=decoder_attention_mask, inputs_embeds=embeds, cache=cache,
                            memory=memory, memory_attention_mask=memory_attention_mask)

    def forward(self, input_ids, attention_mask=None, *, decoder_input_ids=None,
                decoder_attention_mask=None, encoder_hidden_states=None, cache=None) -> ModelOutput:
        if decoder_input_ids is None:
            decoder_input_ids = shift_tokens_right(input_ids, self.config)
        memory = encoder_hidden_states if encoder_hidden_states is not None else self.encode(input_ids, attention_mask)
        out = self.decode(decoder_input_ids, memory, attention_mask, decoder_attention_mask, cache)
        out.encoder_last_hidden_state = memory
        return out


def shift_tokens_right(input_ids: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Decoder inputs for teacher forcing: [start, x_0, ..., x_{T-2}], -100 labels become pad."""
    if config.decoder_start_token_id is None or config.pad_token_id is None:
        raise ValueError("shift_tokens_right needs ModelConfig.decoder_start_token_id and pad_token_id")
    shifted = input_ids.new_full(input_ids.shape, config.decoder_start_token_id)
    shifted[:, 1:] = input_ids[:, :-1]
    return shifted.masked_fill(shifted == -100, config.pad_token_id)
