"""Benchmark clients. `serving`: load-test an OpenAI-compatible server over HTTP (`llmkit bench serve`)."""
from .serving import BenchServeError, BenchServeRecipe, run_bench_serve, run_bench_serve_async
from .stats import arrival_offsets, percentile, summarize

__all__ = ["BenchServeError", "BenchServeRecipe", "run_bench_serve", "run_bench_serve_async",
           "arrival_offsets", "percentile", "summarize"]
