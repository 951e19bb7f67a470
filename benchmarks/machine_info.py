"""The machine a benchmark ran on, and how fast it can multiply: the denominator of MFU.

Model FLOPs utilisation (Chowdhery et al. 2022, PaLM, appendix B) = achieved model FLOP/s divided by
the machine's peak. The peak here is measured, not taken from a data sheet: the best of N large
square matmuls (torch.mm, n x n by n x n = 2 n^3 FLOPs) in the dtype of the run, on the thread
count the benchmark uses. A training step of a decoder costs, per token,
    6 N + 12 L d T      FLOPs    (N: parameters in matmuls, L layers, width d, context T),
the forward (2 N) and backward (4 N) of every weight plus the attention scores and their weighted
sums (QK^T and AV: 2 * 2 L d T forward, twice that backward), as in PaLM and nanoGPT's estimate_mfu.
"""
from __future__ import annotations

import functools
import os
import platform
import time
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_line() -> str:
    """e.g. 'Intel(R) Xeon(R) ..., 2 cores, torch 2.13.0+cpu'."""
    import torch
    return f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}"


@functools.lru_cache(maxsize=None)
def matmul_peak(dtype: str = "fp32", n: int = 2048, repeats: int = 8, threads: int | None = None) -> float:
    """Best-of-`repeats` FLOP/s of an (n x n) @ (n x n) matmul in `dtype` ("fp32" or "bf16")."""
    import torch
    if threads is not None:
        torch.set_num_threads(threads)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dt)
    b = torch.randn(n, n, generator=gen).to(dt)
    out = torch.empty(n, n, dtype=dt)
    torch.mm(a, b, out=out)                                   # warm-up: kernel selection, page faults
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def train_flops_per_token(n_params: int, n_layers: int, d_model: int, seq_len: int) -> float:
    """6 N + 12 L d T: a training step's FLOPs per token (forward + backward; see the module doc)."""
    return 6 * n_params + 12 * n_layers * d_model * seq_len


def mfu(flops_per_token: float, tokens_per_second: float, peak_flops: float) -> float:
    """Model FLOPs utilisation in [0, 1]: achieved model FLOP/s over the measured peak."""
    return flops_per_token * tokens_per_second / peak_flops


if __name__ == "__main__":
    import torch
    threads = torch.get_num_threads()
    print(machine_line(), f"({threads} threads)")
    for dtype in ("fp32", "bf16"):
        print(f"{dtype} matmul peak: {matmul_peak(dtype) / 1e9:.1f} GFLOP/s")
