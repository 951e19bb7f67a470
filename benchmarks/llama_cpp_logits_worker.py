"""llama.cpp's side of benchmarks/llama_cpp_check.py, run in the environment where llama-cpp-python is
installed (it needs that package and numpy, nothing of llmkit). One GGUF file per process, so a file
that crashes llama.cpp (a segfault) fails alone and is reported with its exit status.

    python llama_cpp_logits_worker.py run MODEL.gguf '{"prompt": [ids], "n": 16, "windows": [[ids], ...],
                                                      "threads": 2, "logits_out": "FILE.npy"}'
        greedy continuation of `prompt` (n tokens, temperature 0) and, with logits_all=True, the
        full-vocabulary logits at every position of each window, saved as float32 (windows, T, V);
        with "text", also llama.cpp's own tokenization of it (the file's tokenizer metadata at work)
    python llama_cpp_logits_worker.py quantize SRC.gguf '{"out": "DST.gguf", "ftype": "Q4_K_M", "threads": 2}'
        llama.cpp's own quantizer (llama_model_quantize with llama_model_quantize_default_params())

Prints one JSON line.
"""
from __future__ import annotations

import json
import sys


def run(path: str, spec: dict) -> dict:
    import numpy as np
    from llama_cpp import Llama
    n_ctx = max([len(spec["prompt"]) + spec["n"]] + [len(w) for w in spec["windows"]])
    llm = Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=spec["threads"],
                n_threads_batch=spec["threads"], logits_all=True, verbose=False)
    tokens = []
    for token in llm.generate(spec["prompt"], top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        tokens.append(int(token))
        if len(tokens) == spec["n"]:
            break
    logits = []
    for window in spec["windows"]:
        llm.reset()
        llm.eval(window)
        logits.append(np.array(llm.scores[:len(window)], dtype=np.float32))     # (T, V)
    np.save(spec["logits_out"], np.stack(logits))                                # (windows, T, V)
    text_ids = llm.tokenize(spec["text"].encode(), add_bos=False, special=True) if spec.get("text") else None
    return {"tokens": tokens, "n_vocab": llm.n_vocab(), "text_ids": text_ids}


def quantize(path: str, spec: dict) -> dict:
    import ctypes
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{spec['ftype']}")
    params.nthread = spec["threads"]
    status = llama_cpp.llama_model_quantize(path.encode(), spec["out"].encode(), ctypes.byref(params))
    return {"status": int(status)}


def main() -> None:
    mode, path, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    print(json.dumps({"run": run, "quantize": quantize}[mode](path, spec)))


if __name__ == "__main__":
    main()
