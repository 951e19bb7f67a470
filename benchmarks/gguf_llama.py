"""The benchmarks' way to run the very same weights in llama.cpp (llama-cpp-python): a thin wrapper over
`llmkit.export.gguf` (what `llmkit export gguf` writes), kept for bench_engine.py and bench_serve.py.

    write_llama_gguf(model, path, tokenizer=None) -> path      an f32 GGUF of a Llama-family CausalLM

Without `tokenizer` the vocabulary is a placeholder (llama.cpp needs one to load; bench_engine feeds it
token ids); with an llmkit byte-level BPE Tokenizer its vocabulary, merges, eos and chat template go in
as llama.cpp's "gpt2" tokenizer, so llama.cpp's server tokenizes text as llmkit does (bench_serve).
"""
from __future__ import annotations

from pathlib import Path

from llmkit.export.gguf import export_gguf


def write_llama_gguf(model, path: Path, tokenizer=None) -> Path:
    return export_gguf(model, path, type="f32", tokenizer=tokenizer)
