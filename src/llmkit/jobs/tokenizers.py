"""The one tokenizer set-up of every job: train a character or byte-level BPE tokenizer on the
job's texts, or load one from a folder / tokenizer.json.

`roles` adds the special tokens an objective needs ({"mask": "[MASK]", ...}); a loaded tokenizer
must already have them. Trained tokenizers get `<pad>` and `<|endoftext|>` (EOS).
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

from ..recipes import RecipeError
from ..tokenizer import Tokenizer, load_tokenizer, train_bpe, train_char

TRAINED = ("char", "bpe")


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """A prompt's ids for generation (no special tokens added); an empty prompt starts from the
    end-of-text token, as OpenAI's API does. RecipeError (a ValueError) if it is empty and there is none."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if ids:
        return ids
    if tokenizer.eos_token_id is None:
        raise RecipeError("the prompt is empty and the tokenizer has no end-of-text token to start from: "
                         "expected a non-empty prompt")
    return [tokenizer.eos_token_id]


def setup_tokenizer(spec: str, texts: Callable[[], Iterable[str]], *, roles: Optional[dict] = None,
                    vocab_size: int = 4096, field: str = "tokenizer") -> Tokenizer:
    """`spec` is char | bpe | a path; `texts()` is called only when a tokenizer is trained."""
    roles = roles or {}
    if spec not in TRAINED:
        tokenizer = load_tokenizer(spec)
        missing = [f"{role}_token" for role in roles if getattr(tokenizer, f"{role}_token_id") is None]
        if missing:
            raise RecipeError(f"{field}={spec!r} has no {', '.join(missing)}: expected the special tokens "
                              "the objective needs")
        return tokenizer
    if spec == "char":
        tokenizer = train_char(texts=list(texts()), special_tokens=("<pad>", "<|endoftext|>", *roles.values()),
                               pad_token="<pad>")
    else:
        tokenizer = train_bpe(texts=texts(), vocab_size=vocab_size,
                              special_tokens=("<|endoftext|>", "<pad>", *roles.values()), pad_token="<pad>")
    return Tokenizer(tokenizer.backend, {**tokenizer.special_tokens, **roles}) if roles else tokenizer
