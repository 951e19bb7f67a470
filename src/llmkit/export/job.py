"""`llmkit export gguf model=DIR out=FILE type=f32|f16|q8_0|q4_0`: a saved model folder as one GGUF file
that llama.cpp (llama-cli, llama-server, llama-cpp-python) loads.

The folder is read with `jobs.load_artifacts` (any save_artifacts output, HF or llmkit checkpoint), so
its tokenizer goes into the file too. The file is written to a temporary name beside `out` and renamed
into place (os.replace), so a crash or a refused model never leaves a half-written `out`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ExportError
from .gguf import GGUF_TYPES


@dataclass
class ExportGGUFRecipe:
    model: str = ""                      # a model folder (save_artifacts output, HF or llmkit checkpoint)
    out: str = ""                        # the .gguf file to write
    type: str = "f16"                    # f32 | f16 | q8_0 | q4_0: the storage of the 2-D weights

    def __post_init__(self):
        if self.type not in GGUF_TYPES:
            raise ExportError(f"export gguf: type={self.type!r}: expected one of {', '.join(GGUF_TYPES)}")
        if not self.model:
            raise ExportError(f"export gguf: model={self.model!r}: expected a model folder")
        if not self.out:
            raise ExportError(f"export gguf: out={self.out!r}: expected the path of the .gguf file to write")


def run_export_gguf(recipe: ExportGGUFRecipe) -> Path:
    """Load, export to a temporary file beside `out`, rename; print the size and bits per weight."""
    from ..jobs.artifacts import load_artifacts
    from .gguf import export_gguf, gguf_bits_per_weight
    artifacts = load_artifacts(recipe.model)
    out = Path(recipe.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        export_gguf(artifacts.model, tmp, type=recipe.type, tokenizer=artifacts.tokenizer)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    size = out.stat().st_size
    print(f"wrote {out} ({recipe.type}): {size / 2**20:.2f} MiB, "
          f"{gguf_bits_per_weight(out):.3f} bits per weight")
    return out
