"""Task models: a stack from transformer.py plus the head a task needs.

Every model is called as `model(input_ids, attention_mask=None, ...)` and returns `ModelOutput`:
`.logits` for LM, MLM and classification heads, `.last_hidden_state` always.

| class               | stack          | head                        | HF counterpart                 |
|---------------------|----------------|-----------------------------|--------------------------------|
| CausalLM            | Transformer    | lm_head                     | GPT2LMHeadModel, LlamaForCausalLM |
| MaskedLM            | bidirectional  | mlm_head (+ pooler, nsp)    | BertForMaskedLM / ForPreTraining |
| EncoderModel        | bidirectional  | optional pooler             | BertModel                      |
| Seq2SeqLM           | EncoderDecoder | lm_head + final_logits_bias | BartForConditionalGeneration   |
| SequenceClassifier  | any            | pooled -> n labels          | *ForSequenceClassification     |
| TokenClassifier     | any            | per token -> n labels       | *ForTokenClassification        |
| ValueModel          | any            | scalar per token            | reward / value models          |
| ProjectionModel     | any            | pooled -> embedding         | sentence encoders              |
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..config import ModelConfig
from .heads import ClassificationHead, MLMHead, Pooler, ProjectionHead, ValueHead, last_token_index, pool
from .transformer import EncoderDecoder, ModelOutput, Transformer


class LlmkitModel(nn.Module):
    """Shared behaviour: weight init, tying, parameter counts, and the layout PEFT reads:
    `head_names` (the output head modules, the task head first) and `blocks()`."""

    config: ModelConfig
    head_names: tuple[str, ...] = ()
    tied_head: str = ""                    # the Linear that may share the token embedding

    def blocks(self) -> list[nn.Module]:
        """The transformer blocks in order; block i is what `layers=[i]` selects."""
        return list(self.transformer.layers)

    def init_weights(self) -> None:
        """N(0, init_std) for linear and embedding weights, zero biases, unit norms; residual
        output projections scaled by 1/sqrt(2 * n_layers) (GPT-2, Radford et al., 2019)."""
        std = self.config.init_std
        n_res = 2 * (self.config.n_layers + (self.config.decoder_layers if self.config.is_encoder_decoder else 0))
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scale = 1 / (n_res ** 0.5) if name.endswith(("o_proj", "down_proj")) else 1.0
                nn.init.normal_(module.weight, std=std * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif hasattr(module, "weight") and module.__class__.__name__ in ("LayerNorm", "RMSNorm"):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Make the `tied_head` weight share the token embedding where the config asks for it."""
        if self.tied_head and self.config.tie_word_embeddings:
            self.get_submodule(self.tied_head).weight = self.transformer.embed_tokens.weight

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)   # tied once


class CausalLM(LlmkitModel):
    """Decoder-only language model: P(x_t | x_<t) = softmax(lm_head(h_t))."""
    head_names, tied_head = ("lm_head",), "lm_head"

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=config.lm_head_bias)
        self.init_weights()

    def forward(self, input_ids=None, attention_mask=None, *, logits_to_keep: int = 0, logits_index=None,
                **kwargs) -> ModelOutput:
        """logits_to_keep=n > 0 computes logits for the last n positions only (decoding needs 1;
        the (B, T, V) projection of a long prompt is otherwise the largest tensor of a step).
        logits_index, an index of the (B, T) positions (a bool mask (B, T)), computes them only
        there: logits (N, V) = lm_head(h[logits_index]), e.g. at the tokens a loss scores."""
        out = self.transformer(input_ids, attention_mask, **kwargs)
        hidden = out.last_hidden_state                                                 # (B, T, d)
        if logits_index is not None:
            hidden = hidden[logits_index]                                              # (N, d)
        elif logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]                                       # (B, n, d)
        out.logits = self.lm_head(hidden)                                              # (B, T | n, V) or (N, V)
        return out


class MaskedLM(LlmkitModel):
    """Bidirectional encoder with BERT's MLM head and, with `nsp=True`, the pooler + NSP head."""
    head_names, tied_head = ("mlm_head", "nsp_head", "pooler"), "mlm_head.decoder"

    def __init__(self, config: ModelConfig, *, nsp: bool = False):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config, causal=False)
        self.mlm_head = MLMHead(config)
        self.pooler = Pooler(config) if nsp else None
        self.nsp_head = ClassificationHead(config.d_model, 2) if nsp else None
        self.init_weights()

    def forward(self, input_ids=None, attention_mask=None, **kwargs) -> ModelOutput:
        out = self.transformer(input_ids, attention_mask, **kwargs)
        out.logits = self.mlm_head(out.last_hidden_state)                              # (B, T, V)
        if self.pooler is not None:
            out.pooler_output = self.pooler(out.last_hidden_state)                     # (B, d)
            out.nsp_logits = self.nsp_head(out.pooler_output)                          # (B, 2)
        return out


class EncoderModel(LlmkitModel):
    """A bare bidirectional encoder: hidden states, plus BERT's pooled [CLS] vector if pooler."""
    head_names = ("pooler",)

    def __init__(self, config: ModelConfig, *, pooler: bool = True):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config, causal=False)
        self.pooler = Pooler(config) if pooler else None
        self.init_weights()

    def forward(self, input_ids=None, attention_mask=None, **kwargs) -> ModelOutput:
        out = self.transformer(input_ids, attention_mask, **kwargs)
        if self.pooler is not None:
            out.pooler_output = self.pooler(out.last_hidden_state)
        return out


class Seq2SeqLM(LlmkitModel):
    """Encoder-decoder LM (BART): P(y_t | y_<t, x) with a tied head and a fixed logit bias."""
    head_names, tied_head = ("lm_head",), "lm_head"

    def blocks(self) -> list[nn.Module]:
        """The encoder's blocks, then the decoder's."""
        return [*self.transformer.encoder.layers, *self.transformer.decoder.layers]

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.transformer = EncoderDecoder(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.register_buffer("final_logits_bias", torch.zeros(1, config.vocab_size))
        self.init_weights()

    def forward(self, input_ids=None, attention_mask=None, *, decoder_input_ids=None,
                decoder_attention_mask=None, encoder_hidden_states=None, cache=None) -> ModelOutput:
        out = self.transformer(input_ids, attention_mask, decoder_input_ids=decoder_input_ids,
                               decoder_attention_mask=decoder_attention_mask,
                               encoder_hidden_states=encoder_hidden_states, cache=cache)
        out.logits = self.lm_head(out.last_hidden_state) + self.final_logits_bias      # (B, T, V)
        return out


class _PooledTaskModel(LlmkitModel):
    def __init__(self, config: ModelConfig, pooling: Optional[str]):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        # Decoders summarise a sequence in its last real token; encoders in [CLS].
        self.pooling = pooling or ("last" if config.causal else "cls")


class SequenceClassifier(_PooledTaskModel):
    """logits = W pool(h) + b over `n_labels` classes."""
    head_names = ("classifier", "pooler")

    def __init__(self, config: ModelConfig, n_labels: int, *, pooling: Optional[str] = None,
                 bert_pooler: bool = False):
        super().__init__(config, pooling)
        self.pooler = Pooler(config) if bert_pooler else None
        self.classifier = ClassificationHead(config.d_model, n_labels, config.dropout)
        self.init_weights()

    def forward(self, input_ids=None, attention_mask=None, **kwargs) -> ModelOutput:
        out = self.transformer(input_ids, attention_mask, **kwargs)
        pooled = (self.pooler(out.last_hidden_state) if self.pooler is not None
                  else pool(out.last_hidden_state, attention_mask, self.pooling))
        out.pooler_output = pooled
        out.logits = self.classifier(pooled)                                           # (B, n_labels)
        return out


class TokenClassifier(_PooledTaskModel):
    """logits_t = W h_t + b for every token (NER, tagging)."""
    head_names = ("classifier",)

    def __init__(self, config: ModelConfig, n_labels: int):
        super().__init__(config, None)
        self.classifier = ClassificationHead(config.d_model, n_labels, config.dropout)
        self.init_weights()

    def forward(self, input_ids=None, attention_mask=None, **kwargs) -> ModelOutput:
        out = self.transformer(input_ids, attention_mask, **kwargs)
        out.logits = self.classifier(out.last_hidden_state)                            # (B, T, n_labels)
        return out


class ValueModel(_PooledTaskModel):
    """A scalar per token (`values`, B x T) and the sequence score at the last real token (`logits`, B)."""
    head_names = ("value_head",)

    def __init__(self, config: ModelConfig):
        super().__init__(config, "last")
        self.value_head = ValueHead(config.d_model)
        self.init_weights()

    def forward(self, input_ids=None, attention_mask=None, **kwargs) -> ModelOutput:
        out = self.transformer(input_ids, attention_mask, **kwargs)
        h = out.last_hidden_state
        out.values = self.value_head(h)                                                # (B, T)
        idx = last_token_index(attention_mask, h.shape[0], h.shape[1], h.device)
        out.logits = out.values[torch.arange(h.shape[0], device=h.device), idx]        # (B,)
        return out


class ProjectionModel(_PooledTaskModel):
    """Sentence embeddings z = normalize(MLP(pool(h))) for contrastive objectives."""
    head_names = ("projection",)

    def __init__(self, config: ModelConfig, d_proj: int = 128, *, pooling: str = "mean",
                 normalize: bool = True):
        super().__init__(config, pooling)
        self.projection = ProjectionHead(config.d_model, d_proj, normalize=normalize)
        self.init_weights()

    def forward(self, input_ids=None, attention_mask=None, **kwargs) -> ModelOutput:
        out = self.transformer(input_ids, attention_mask, **kwargs)
        out.pooler_output = pool(out.last_hidden_state, attention_mask, self.pooling)
        out.embeddings = self.projection(out.pooler_output)                            # (B, d_proj)
        return out


TASKS = {
    "causal_lm": CausalLM,
    "masked_lm": MaskedLM,
    "pretraining": lambda config: MaskedLM(config, nsp=True),
    "encoder": EncoderModel,
    "seq2seq_lm": Seq2SeqLM,
}


def build_model(config: ModelConfig, task: Optional[str] = None) -> LlmkitModel:
    """Build the model for `task`; by default a causal LM, an MLM for encoders, seq2seq for enc-dec."""
    if task is None:
        task = "seq2seq_lm" if config.is_encoder_decoder else ("causal_lm" if config.causal else "masked_lm")
    if task not in TASKS:
        raise ValueError(f"task={task!r}: expected one of {sorted(TASKS)}")
    return TASKS[task](config)
