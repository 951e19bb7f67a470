"""`llmkit serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over `llmkit.infer.Engine`.

- `job.py`: the recipe (`ServeRecipe`), loading the model and adapters, uvicorn with graceful
  shutdown on SIGTERM.
- `app.py`: the FastAPI routes (/v1/models, /v1/completions, /v1/chat/completions, /health, /metrics),
  authentication and the error handlers.
- `bridge.py`: `EngineBridge`, the one thread that owns the engine; requests reach it through a
  command queue and their outputs come back to asyncio queues. Admission control (429) and
  draining live here.
- `protocol.py`: request bodies (pydantic; a malformed body is a 422) and their checks into
  SamplingParams (a bad value is a 400 naming the parameter).
- `chat.py`: messages (roles, text parts) through the tokenizer's chat template.
- `responses.py`: response objects, stream chunks, logprobs in the OpenAI shapes; `TextDelta` for
  streaming text that never shows what a stop string will cut.
- `errors.py`: `APIError` and the `{"error": {"message", "type", "param", "code"}}` body.
- `metrics.py`: the Prometheus text of /metrics.

Only `job.py` imports uvicorn; FastAPI is imported by `app.py`. Nothing here is imported by the rest
of llmkit except the CLI, which imports `job.py` on demand.
"""
