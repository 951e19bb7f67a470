"""/metrics in the Prometheus text format (version 0.0.4), from the engine thread's last snapshot.

Names follow vLLM's (`vllm:num_requests_running` -> `llmkit_num_requests_running`): sequences
running and waiting in the engine, requests in flight at the server (what `max_pending` bounds),
KV-cache usage, prefix-cache hit rate, generated tokens per second over the last window, and
counters of tokens, finished requests by reason, refused requests by reason and failed steps."""
from __future__ import annotations

GAUGES = (
    ("num_requests_running", "running", "Sequences decoding in the engine (a request with n samples counts n)."),
    ("num_requests_waiting", "waiting", "Sequences waiting for their first schedule or after preemption."),
    ("num_requests_pending", "pending", "Requests in flight at the server (bounded by max_pending)."),
    ("kv_cache_usage_ratio", "kv_usage", "Fraction of KV blocks held by live requests."),
    ("kv_cache_blocks_in_use", "kv_blocks_in_use", "KV blocks held by live requests."),
    ("kv_cache_blocks_total", "kv_blocks_total", "KV blocks in the pool."),
    ("prefix_cache_hit_rate", "prefix_cache_hit_rate", "Prompt blocks served from the prefix cache."),
    ("generation_tokens_per_second", "tokens_per_s", "Tokens generated per second over the last window."),
)
COUNTERS = (
    ("prompt_tokens_total", "prompt_tokens", "Prompt tokens computed (prefix-cache hits excluded)."),
    ("generation_tokens_total", "generated_tokens", "Tokens generated."),
    ("num_preemptions_total", "preemptions", "Sequences preempted (recomputed later) for KV space."),
    ("engine_steps_total", "steps", "Engine steps run."),
)


def _number(value) -> str:
    return repr(float(value)) if isinstance(value, float) else str(int(value))


def render(bridge) -> str:
    m = bridge.metrics()
    lines = []

    def family(name: str, kind: str, help_text: str, samples):
        lines.append(f"# HELP llmkit_{name} {help_text}")
        lines.append(f"# TYPE llmkit_{name} {kind}")
        for labels, value in samples:
            lines.append(f"llmkit_{name}{labels} {_number(value)}")

    for name, key, help_text in GAUGES:
        family(name, "gauge", help_text, [("", m[key])])
    for name, key, help_text in COUNTERS:
        family(name, "counter", help_text, [("", m[key])])
    family("request_success_total", "counter", "Requests finished, by finish reason.",
           [(f'{{finish_reason="{r}"}}', c) for r, c in sorted(bridge.finished.items())] or [("", 0)])
    family("request_rejected_total", "counter", "Requests refused before the engine (queue_full: 429, "
           "shutting_down: 503).", [(f'{{reason="{r}"}}', c) for r, c in sorted(bridge.rejected.items())] or [("", 0)])
    family("engine_step_failures_total", "counter", "Engine steps that raised (their requests failed).",
           [("", bridge.step_failures)])
    return "\n".join(lines) + "\n"
