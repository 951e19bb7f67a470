"""`Engine`: continuous batching over a paged KV cache with prefix caching, for llmkit causal models.

    engine = Engine(model)                                   # defaults fit a small model on a CPU
    rid = engine.add_request(prompt_ids, SamplingParams(max_tokens=32))
    while engine.has_unfinished():
        for out in engine.step():                            # RequestOutputs that moved this step
            ...
    ids = engine.generate([p1, p2], SamplingParams(temperature=0))   # a batch, run to completion

The interface:
- `add_request(prompt_ids, params=None, *, request_id=None, adapter=None) -> request_id`. Requests
  may arrive between any two steps. Everything is validated before anything is taken: a prompt
  longer than the context, bad SamplingParams, an unknown adapter, or a request the KV budget could
  never hold raise ValueError (KVBudgetError for the last) naming the field, and the engine goes on
  serving the others as if the call never happened.
- `step() -> list[RequestOutput]`: schedules (scheduler.py), runs one forward over every scheduled
  token (prefill chunks and decodes together, flattened to (1, N)), samples, and returns one
  RequestOutput per request that got new tokens or finished in this step (each CompletionOutput has
  its `new_token_ids` of the step and everything so far). An empty list when there is no work.
- `stream(request_id, index=0)`: an iterator of new token ids (ints) of one sample; it runs
  `step()` itself when it has nothing buffered, and it may be read after the request finished
  (it then yields what is left). Other requests advance in the same steps.
- `cancel(request_id)`: ends the request ("abort") and frees its KV blocks at once.
- A request whose own post-processing raises (its detokenizing, its stop strings) ends with
  finish_reason "error" and the message in `CompletionOutput.error`; the others go on.
- `metrics()`: running / waiting sequences, KV usage, prefix-cache hit rate, token counts.
- `has_unfinished()`: any request waiting or running.
- `kv_blocks_in_use`: KV blocks held by live requests (freed prefix-cache blocks do not count);
  back at 0 once every request has finished or been cancelled.
- `output(request_id)`: the request's RequestOutput so far; `release(request_id)` forgets a
  finished request (generate and a finished stream release their own).

`generate()` in llmkit.generation stays beside the engine with identical greedy outputs (tested).
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import time
from dataclasses import dataclass, field
from typing import Hashable, Iterator, Optional, Sequence as Seq, Union

import torch

from ..config import alibi_slopes
from ..model.modes import eval_mode
from .batch import PagedBatch
from .blocks import BlockPool, KVBudgetError
from .multi_lora import LoraBank
from .params import ParamsArg, SamplingParams
from .paged import PagedKV
from .sampler import sample, warp_for
from .speculate import build_proposer, verify
from .scheduler import Scheduler, Sequence


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int]
    new_token_ids: list[int]
    text: Optional[str] = None                   # with a tokenizer: the decoded output, cut at a stop string
    logprobs: Optional[list[dict]] = None        # per token: {"token", "logprob", "top": [(id, lp), ...]}
    finish_reason: Optional[str] = None          # "stop" | "length" | "abort" | "error" | None while running
    error: Optional[str] = None                  # with finish_reason "error": what failed


@dataclass
class RequestOutput:
    request_id: Hashable
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0                   # prompt tokens the prefix cache served


@dataclass
class _Request:
    request_id: Hashable
    prompt: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    read: list[int] = field(default_factory=list)            # stream cursors, one per sample
    arrival: float = field(default_factory=time.perf_counter)
    first_token_time: Optional[float] = None

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)


def alibi_for(model) -> Optional[list[float]]:
    """The ALiBi slopes of the query heads this process computes (all, or a tensor-parallel rank's)."""
    if model.config.positional != "alibi":
        return None
    from .tensor_parallel import query_head_slice        # torch.distributed's import only for ALiBi models
    return alibi_slopes(model.config.n_heads)[query_head_slice(model)]


class Engine:
    def __init__(self, model, *, block_size: int = 16, num_blocks: Optional[int] = None,
                 max_num_seqs: int = 32, max_num_batched_tokens: int = 512, prefix_caching: bool = True,
                 tokenizer=None, seed: int = 0, max_model_len: Optional[int] = None,
                 speculative: Union[None, str, torch.nn.Module] = None, num_speculative_tokens: int = 4,
                 adapters: Optional[dict] = None, compile: bool = False):
        """model: an llmkit decoder (CausalLM) - built, trained here or loaded with `load_hf`.
        num_blocks: KV blocks of `block_size` tokens; by default enough for max_num_seqs sequences of
        max_model_len tokens, capped at 16,384 tokens in all (preemption handles the rest).
        speculative: a draft model (same vocabulary), or "ngram" for prompt lookup; each decoding
        sequence then gets up to `num_speculative_tokens` draft tokens verified per step
        (speculate.py). Output is unchanged in distribution (greedy: token for token).
        adapters: {name: LoRA adapter folder}, served per request (`add_request(..., adapter=name)`)
        in one batch with the base model run once (multi_lora.py); the adapter is part of the
        prefix-cache hash, since it changes the keys and values.
        compile: run the decode steps of a lone sequence through `torch.compile(model, dynamic=True)`,
        a compiled copy of the forward that leaves `model` as it is (the first such steps pay the
        compile time). Measured on 2 CPU cores (benchmarks/results/engine.md): ~1.5x faster at batch
        1, but 1.3-2x slower per step than eager once several sequences of mixed lengths decode
        together, so every other step (prefills, batches, multi-LoRA, speculative verification and
        the draft model) stays eager."""
        config = getattr(model, "config", None)
        if config is None or getattr(model, "transformer", None) is None or config.is_encoder_decoder \
                or not config.causal or not hasattr(model, "lm_head"):
            raise ValueError(f"Engine(model={type(model).__name__}): expected an llmkit decoder-only causal LM "
                             "(CausalLM)")
        for name, value, low in (("block_size", block_size, 1), ("max_num_seqs", max_num_seqs, 1),
                                 ("max_num_batched_tokens", max_num_batched_tokens, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"Engine({name}={value!r}): expected an integer >= {low}")
        stack = model.transformer
        if stack.input_prompt is not None or any(b.self_attn.kv_prefix is not None for b in stack.layers):
            raise ValueError("Engine: the model carries prompt / prefix-tuning adapters, which the paged "
                             "engine does not run; merge another adapter kind or use llmkit.generate")
        self.model, self.config, self.tokenizer = model, config, tokenizer
        self.lora = LoraBank(model, adapters) if adapters else None
        self._compiled = {id(model): torch.compile(model, dynamic=True)} if compile else {}
        self.max_model_len = max_model_len or config.max_seq_len
        if num_blocks is None:
            tokens = max(self.max_model_len, min(max_num_seqs * self.max_model_len, 16384))
            num_blocks = -(-tokens // block_size)
        self.pool = BlockPool(num_blocks, block_size, prefix_caching=prefix_caching)
        attn = stack.layers[0].self_attn                    # local head counts (tensor parallel shards)
        param = next(model.parameters())
        self.kv = PagedKV(len(stack.layers), num_blocks, block_size, attn.n_kv_heads, attn.head_dim,
                          dtype=param.dtype, device=param.device)
        self.device = param.device
        self.scheduler = Scheduler(self.pool, max_num_seqs=max_num_seqs,
                                   max_num_batched_tokens=max_num_batched_tokens)
        self.requests: dict[Hashable, _Request] = {}
        self.generator = torch.Generator().manual_seed(seed)
        self._ids = itertools.count()
        self._seq_ids = itertools.count()
        eos = config.eos_token_id
        self.eos_ids = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        self.stats = {"steps": 0, "prompt_tokens": 0, "cached_tokens": 0, "generated_tokens": 0,
                      "spec_proposed": 0, "spec_accepted": 0, "max_running": 0, "errors": 0,
                      # verification calls counted by (draft length γ, drafts kept): what the
                      # acceptance rate and the tokens per target call are computed from
                      "spec_calls": collections.Counter(),
                      # where step time goes: scheduling, the draft's forwards, the target's forward
                      # (batch layout, model, paged attention), sampling + stop checks + outputs
                      "schedule_s": 0.0, "draft_s": 0.0, "forward_s": 0.0, "sample_s": 0.0}
        self.num_speculative_tokens = num_speculative_tokens
        self.proposer = build_proposer(speculative, self, num_speculative_tokens)

    # ---- requests --------------------------------------------------------------------------------
    @property
    def kv_blocks_in_use(self) -> int:
        return self.pool.blocks_in_use

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def _check_prompt(self, prompt_ids) -> list[int]:
        if isinstance(prompt_ids, torch.Tensor):
            if prompt_ids.dim() != 1:
                raise ValueError(f"prompt_ids has shape {tuple(prompt_ids.shape)}: expected one 1-D sequence")
            prompt_ids = prompt_ids.tolist()
        if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt_ids):
            raise ValueError(f"prompt_ids={str(prompt_ids)[:60]}: expected a non-empty list of token ids")
        bad = [t for t in prompt_ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"prompt_ids holds token id {bad[0]}: expected ids in [0, {self.config.vocab_size})")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt_ids has {len(prompt_ids)} tokens: the context is {self.max_model_len} "
                             f"tokens, so expected at most {self.max_model_len - 1} (room for one new token)")
        return list(prompt_ids)

    def _adapter(self, adapter: Optional[str]) -> Optional[str]:
        if adapter is not None and (self.lora is None or adapter not in self.lora.names):
            known = self.lora.names if self.lora is not None else []
            raise ValueError(f"adapter={adapter!r}: expected None (the base model) or one of the served "
                             f"adapters {known}")
        return adapter

    def add_request(self, prompt_ids, params: Optional[SamplingParams] = None, *,
                    request_id: Optional[Hashable] = None, adapter: Optional[str] = None) -> Hashable:
        """Queue a request; returns its id. Raises (taking nothing) on bad input; see the module doc."""
        prompt = self._check_prompt(prompt_ids)
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params={params!r}: expected an llmkit.infer.SamplingParams or None")
        if params.stop and self.tokenizer is None:
            raise ValueError(f"SamplingParams.stop={list(params.stop)!r}: stop strings need the engine's "
                             "tokenizer (Engine(model, tokenizer=...)); expected stop_token_ids instead")
        adapter = self._adapter(adapter)
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request_id={request_id!r} is already in use: expected a new id")
        total = min(len(prompt) + params.max_tokens, self.max_model_len)
        self.pool.check_fits(total, f"request {request_id!r} ({len(prompt)} prompt + {params.max_tokens} new tokens)")
        if params.n > 1:                             # the n samples share the prompt's full blocks
            bs, shared = self.pool.block_size, len(prompt) // self.pool.block_size
            need = shared + params.n * self.pool.blocks_for(total - shared * bs)
            if need > self.pool.num_blocks:
                raise KVBudgetError(f"SamplingParams.n={params.n}: {params.n} samples of {total} tokens need "
                                    f"{need} KV blocks at once, but the pool has {self.pool.num_blocks}: "
                                    "expected a smaller n (or a larger KV budget)")
        seqs = []
        for i in range(params.n):
            if params.seed is None:
                seed = int(torch.randint(0, 2 ** 62, (1,), generator=self.generator))
            else:
                seed = params.seed + 7919 * i        # distinct streams for the n samples of one seed
            seqs.append(Sequence(next(self._seq_ids), request_id, i, list(prompt), params,
                                 torch.Generator().manual_seed(seed), adapter))
        self.requests[request_id] = _Request(request_id, prompt, params, seqs, read=[0] * params.n)
        for seq in seqs:
            self.scheduler.add(seq)
        return request_id

    def cancel(self, request_id: Hashable) -> None:
        """End a request now ("abort"); its KV blocks are free when this returns."""
        req = self._request(request_id)
        for seq in req.seqs:
            if not seq.finished:
                seq.finish_reason = "abort"
                self.scheduler.remove(seq)

    def release(self, request_id: Hashable) -> None:
        """Forget a request (cancelling it first if it still runs)."""
        if request_id in self.requests:
            self.cancel(request_id)
            del self.requests[request_id]

    def _request(self, request_id: Hashable) -> _Request:
        if request_id not in self.requests:
            raise KeyError(f"request_id={request_id!r}: no such request (finished requests are released "
                           "by generate() and by a stream read to the end)")
        return self.requests[request_id]

    def output(self, request_id: Hashable, new: Optional[dict] = None) -> RequestOutput:
        req = self._request(request_id)
        outs = [CompletionOutput(s.index, list(s.output), (new or {}).get(s.index, []),
                                 s.text if self.tokenizer is not None else None,
                                 list(s.logprobs) if s.params.logprobs is not None else None, s.finish_reason,
                                 s.error)
                for s in req.seqs]
        return RequestOutput(request_id, list(req.prompt), outs, req.finished, req.seqs[0].num_cached)

    # ---- one step --------------------------------------------------------------------------------
    def _run(self, model, kv: PagedKV, rows) -> torch.Tensor:
        """One forward of `model` over rows (seq, start, tokens, sample flags) flattened to (1, N),
        through `kv`'s blocks at the sequences' block tables; logits (S, V) where a flag is set."""
        ids, positions, flags = [], [], []
        for seq, start, tokens, sample_at in rows:
            ids += tokens
            positions += range(start, start + len(tokens))
            flags += sample_at
        dev = self.device
        # every token sampled (a pure decode step): all N logits, no boolean gather
        index = None if all(flags) else torch.tensor([flags], dtype=torch.bool, device=dev)   # (1, N)
        run = model
        if len(ids) == 1 and id(model) in self._compiled and (self.lora is None or model is not self.model):
            run = self._compiled[id(model)]                              # one sequence decoding
        attn = model.transformer.layers[0].self_attn
        batch = PagedBatch(kv, [self.pool.requests[row[0].seq_id].table for row in rows],
                           [row[1] for row in rows], [len(row[2]) for row in rows], heads=attn.n_heads,
                           dtype=next(model.parameters()).dtype, sliding_window=model.transformer.sliding_window,
                           alibi=alibi_for(model), cut_single=run is model, device=dev)
        input_ids = torch.tensor([ids], dtype=torch.long, device=dev)              # (1, N)
        position_ids = torch.tensor([positions], dtype=torch.long, device=dev)     # (1, N)
        context = contextlib.nullcontext()
        if self.lora is not None and model is self.model:       # each token gets its request's adapter
            adapter = torch.tensor([[self.lora.index(row[0].adapter) for row in rows for _ in row[2]]],
                                   dtype=torch.long, device=dev)                   # (1, N), -1 = none
            context = self.lora.rows(adapter, logits_index=index)
        with context:
            out = run(input_ids, position_ids=position_ids, cache=batch, logits_index=index)
        return out.logits if index is not None else out.logits[0]                  # (S, V)

    def _warp_verified(self, scheduled, proposals, logits) -> dict[int, torch.Tensor]:
        """The target's warped distributions for every sampled sequence with a draft, in one call:
        {seq_id: (γ+1, V)} (greedy ones need none)."""
        rows, params, spans, at = [], [], {}, 0
        for item in scheduled:
            if not item.samples:
                continue
            draft = proposals.get(item.seq.seq_id, ([], None))[0]
            if draft and not item.seq.params.greedy:
                spans[item.seq.seq_id] = (len(rows), len(rows) + len(draft) + 1)
                rows += range(at, at + len(draft) + 1)
                params += [item.seq.params] * (len(draft) + 1)
            at += len(draft) + 1
        if not rows:
            return {}
        p = warp_for(logits[rows], params)                                          # (Σ γ+1, V)
        return {sid: p[a:b] for sid, (a, b) in spans.items()}

    def _gammas(self, scheduled) -> dict[int, int]:
        """Draft lengths for the decoding sequences that can speculate this step (slots reserved)."""
        gammas = {}
        for item in scheduled:
            seq, p = item.seq, item.seq.params
            if not (item.samples and item.num_new == 1) or p.penalised or p.logprobs is not None:
                continue
            g = min(self.num_speculative_tokens, p.max_tokens - len(seq.output) - 1,
                    self.max_model_len - seq.num_tokens - 1)
            if g > 0 and self.scheduler._reserve(seq, seq.num_computed + 1 + g):
                gammas[seq.seq_id] = g
        return gammas

    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        start = time.perf_counter()
        self.stats["schedule_s"] += start - t0
        with torch.inference_mode(), eval_mode(self.model):
            proposals = {}
            if self.proposer is not None:
                proposals = self.proposer.propose(self, scheduled, self._gammas(scheduled))
                self.stats["draft_s"] += time.perf_counter() - start
                start = time.perf_counter()
            rows = []
            for item in scheduled:
                seq, n = item.seq, item.num_new
                draft = proposals.get(seq.seq_id, ([], None))[0]
                rows.append((seq, seq.num_computed, seq.tokens[seq.num_computed:seq.num_computed + n] + draft,
                             [False] * (n - 1) + [item.samples] + [True] * len(draft)))
            logits = self._run(self.model, self.kv, rows)                           # (S, V)
        t_sample = time.perf_counter()
        self.stats["forward_s"] += t_sample - start
        self.stats["steps"] += 1
        self.stats["max_running"] = max(self.stats["max_running"], len(self.scheduler.running))
        plain, plain_logits, emitted, at = [], [], {}, 0
        warped = self._warp_verified(scheduled, proposals, logits)
        for item in scheduled:
            seq = item.seq
            if seq.num_computed < len(seq.prompt):
                self.stats["prompt_tokens"] += min(item.num_new, len(seq.prompt) - seq.num_computed)
            seq.num_computed += item.num_new
            if not item.samples:
                continue
            draft, q = proposals.get(seq.seq_id, ([], None))
            if draft:
                n_acc, nxt = verify(logits[at:at + len(draft) + 1], draft, q, seq, warped.get(seq.seq_id))
                seq.num_computed += n_acc                       # the accepted drafts' KV is written
                emitted[seq.seq_id] = draft[:n_acc] + [nxt]
                self.stats["spec_proposed"] += len(draft)
                self.stats["spec_accepted"] += n_acc
                self.stats["spec_calls"][(len(draft), n_acc)] += 1
            else:
                plain.append(seq)
                plain_logits.append(logits[at:at + 1])
            at += len(draft) + 1
        if plain:
            tokens, entries = sample(torch.cat(plain_logits), plain)
            for seq, token, entry in zip(plain, tokens, entries):
                emitted[seq.seq_id] = [(token, entry)]
        new: dict[Hashable, dict[int, list[int]]] = {}
        for item in scheduled:
            seq = item.seq
            self.pool.commit(seq.seq_id, seq.tokens[:seq.num_computed])
            if self.proposer is not None:
                self.proposer.settle(seq)
            for token in emitted.get(seq.seq_id, []):
                token, entry = token if isinstance(token, tuple) else (token, None)
                new.setdefault(seq.request_id, {}).setdefault(seq.index, []).append(token)
                try:
                    self._append(seq, token, entry)
                except Exception as exc:          # this request's own post-processing (e.g. its detokenizing)
                    self._fail(seq, exc)          # fails it alone; the batch goes on
                if seq.finished:
                    break
        outputs = [self.output(rid, tokens_by_index) for rid, tokens_by_index in new.items()]
        self.stats["sample_s"] += time.perf_counter() - t_sample
        return outputs

    def _append(self, seq: Sequence, token: int, entry: Optional[dict]) -> None:
        req = self.requests[seq.request_id]
        if req.first_token_time is None:
            req.first_token_time = time.perf_counter()
        if not seq.output and seq.preemptions == 0:
            self.stats["cached_tokens"] += seq.num_cached
        seq.output.append(token)
        self.stats["generated_tokens"] += 1
        if entry is not None:
            seq.logprobs.append(entry)
        p = seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids):
            seq.finish_reason = "stop"
        elif self.tokenizer is not None:
            seq.text = self.tokenizer.decode(seq.output)
            for s in p.stop:
                at = seq.text.find(s, max(0, len(seq.text) - len(s) - 32))   # only the tail can hold a new match
                if at >= 0:
                    seq.text, seq.finish_reason = seq.text[:at], "stop"
                    break
        if seq.finish_reason is None and (len(seq.output) >= p.max_tokens or seq.num_tokens >= self.max_model_len):
            seq.finish_reason = "length"
        if seq.finished:
            self.scheduler.remove(seq)

    def _fail(self, seq: Sequence, exc: Exception) -> None:
        seq.finish_reason, seq.error = "error", f"{type(exc).__name__}: {exc}"
        self.stats["errors"] += 1
        self.scheduler.remove(seq)

    def metrics(self) -> dict:
        """A snapshot for monitoring (a server's /metrics): queue sizes, KV usage, token counts."""
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "kv_blocks_in_use": self.kv_blocks_in_use, "kv_blocks_total": self.pool.num_blocks,
                "kv_usage": self.kv_blocks_in_use / self.pool.num_blocks,
                "prefix_cache_hit_rate": self.pool.hits / self.pool.queries if self.pool.queries else 0.0,
                "preemptions": self.scheduler.num_preemptions,
                **{k: self.stats[k] for k in ("steps", "prompt_tokens", "cached_tokens", "generated_tokens",
                                              "errors")}}

    # ---- conveniences ----------------------------------------------------------------------------
    def speculation_summary(self) -> dict:
        """Acceptance and tokens per target call of the verification calls so far.

        With each draft token kept with probability α independently (Leviathan et al. 2023), a call
        with γ drafts emits E = (1 − α^{γ+1}) / (1 − α) tokens. α is estimated from the calls as
        kept / (kept + rejections) (a call stops at its first rejection), and `predicted` sums that E
        over the calls' own γ, to compare with the `measured` tokens per call."""
        calls = self.stats["spec_calls"]
        n = sum(calls.values())
        if not n:
            return {"calls": 0}
        kept = sum(a * c for (g, a), c in calls.items())
        rejections = sum(c for (g, a), c in calls.items() if a < g)
        alpha = kept / (kept + rejections) if kept + rejections else 1.0
        expect = (lambda g: g + 1) if alpha == 1.0 else (lambda g: (1 - alpha ** (g + 1)) / (1 - alpha))
        return {"calls": n, "alpha": alpha, "acceptance": kept / sum(g * c for (g, a), c in calls.items()),
                "measured": sum((a + 1) * c for (g, a), c in calls.items()) / n,
                "predicted": sum(expect(g) * c for (g, a), c in calls.items()) / n}

    def stream(self, request_id: Hashable, index: int = 0) -> Iterator[int]:
        """Yield sample `index`'s new token ids as they come, stepping the engine when needed."""
        req = self._request(request_id)
        if not 0 <= index < len(req.seqs):
            raise ValueError(f"index={index!r}: request {request_id!r} has {len(req.seqs)} samples")
        seq = req.seqs[index]
        while True:
            while req.read[index] < len(seq.output):
                req.read[index] += 1
                yield seq.output[req.read[index] - 1]
            if seq.finished:
                if all(r >= len(s.output) for r, s in zip(req.read, req.seqs)) and req.finished:
                    self.requests.pop(request_id, None)
                return
            self.step()

    def generate(self, prompts: Seq, params: ParamsArg = None, *, adapters: Optional[Seq] = None,
                 return_outputs: bool = False) -> Union[list, list[RequestOutput]]:
        """Run a batch to completion. `params`: one SamplingParams for all or one per prompt.
        Returns per prompt its generated ids (a list of n lists when n > 1), or the RequestOutputs
        with `return_outputs=True`. Every request is validated before any is queued."""
        prompts = list(prompts)
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"params has {len(plist)} entries for {len(prompts)} prompts: expected one or one each")
        alist = list(adapters) if adapters is not None else [None] * len(prompts)
        if len(alist) != len(prompts):
            raise ValueError(f"adapters has {len(alist)} entries for {len(prompts)} prompts: expected one each")
        for p, sp, a in zip(prompts, plist, alist):          # validate all first: all or nothing
            self._check_prompt(p)
            self._adapter(a)
            if sp is not None and not isinstance(sp, SamplingParams):
                raise ValueError(f"params entry {sp!r}: expected an llmkit.infer.SamplingParams or None")
        ids = [self.add_request(p, sp, adapter=a) for p, sp, a in zip(prompts, plist, alist)]
        while any(not self.requests[i].finished for i in ids):
            self.step()
        outs = [self.output(i) for i in ids]
        for i in ids:
            del self.requests[i]
        if return_outputs:
            return outs
        return [o.outputs[0].token_ids if len(o.outputs) == 1 else [c.token_ids for c in o.outputs] for o in outs]
