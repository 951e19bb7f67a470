"""Batch-1 greedy decode in llama.cpp (llama-cpp-python), run by bench_engine.py in the environment
where that package is installed (it needs nothing else):

    python llama_cpp_worker.py MODEL.gguf '{"prompt": [ids...], "n": 128, "threads": 2, "repeats": 3}'

Prints one JSON line: the greedy token ids and the wall time of each repeat (prompt eval + n tokens).
"""
from __future__ import annotations

import json
import sys
import time


def main() -> None:
    from llama_cpp import Llama
    path, spec = sys.argv[1], json.loads(sys.argv[2])
    llm = Llama(model_path=path, n_ctx=1024, n_threads=spec["threads"], n_threads_batch=spec["threads"],
                n_batch=512, verbose=False)
    times, tokens = [], []
    for r in range(spec["repeats"] + 1):                      # the first run is a warm-up
        llm.reset()
        out = []
        start = time.perf_counter()
        for token in llm.generate(spec["prompt"], top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(int(token))
            if len(out) == spec["n"]:
                break
        if r:
            times.append(time.perf_counter() - start)
        tokens = out
    print(json.dumps({"tokens": tokens, "times": times}))


if __name__ == "__main__":
    main()
