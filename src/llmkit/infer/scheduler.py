"""Continuous batching: which sequences run in the next step, and how many of their tokens.

The policy is vLLM's (Kwon et al. 2023; Agrawal et al. 2024, "Sarathi-Serve", for chunked prefill):
- a token budget per step (`max_num_batched_tokens`) and a cap on running sequences (`max_num_seqs`);
- running sequences are scheduled first, in arrival order: each gets the tokens it still has to
  compute (1 for a decode, the rest of its prompt for a prefill), cut to the budget left, so a long
  prompt is prefilled in chunks beside the decodes of the others (one forward for both);
- then waiting sequences, first come first served, while budget, sequence slots and KV blocks
  last; the head of the queue is never skipped (no starvation);
- when a running sequence needs a block and none is free, the most recently admitted running
  sequence is preempted *by recompute*: its blocks are freed and it goes back to the front of the
  queue with its tokens so far (prompt + output) as its new prompt. Readmitted, it prefills them
  again (prefix-cache hits make that cheap) and continues exactly where it was. No sequence is
  admitted in a step that preempted.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Hashable, Optional

import torch

from .blocks import BlockPool
from .params import SamplingParams


@dataclass(eq=False)                             # identity: queues find a sequence by itself, not its fields
class Sequence:
    """One sample of one request (a request with n > 1 has n of them)."""
    seq_id: int
    request_id: Hashable
    index: int                                   # which of the request's n samples
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    adapter: Optional[str] = None
    output: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    num_computed: int = 0                        # tokens whose keys and values are in the cache
    num_cached: int = 0                          # prompt tokens served by the prefix cache (first admission)
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    text: str = ""
    preemptions: int = 0
    admitted: bool = False

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Scheduled:
    seq: Sequence
    num_new: int                                 # tokens computed this step
    samples: bool                                # the step ends its known tokens: sample the next one


class Scheduler:
    def __init__(self, pool: BlockPool, *, max_num_seqs: int, max_num_batched_tokens: int):
        self.pool = pool
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}       # seq_id -> sequence, in admission order
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """A finished or cancelled sequence: out of the queues, its blocks freed at once."""
        if self.running.pop(seq.seq_id, None) is None and seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.free_request(seq.seq_id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        del self.running[seq.seq_id]
        self.pool.free_request(seq.seq_id)
        seq.num_computed, seq.admitted = 0, False
        seq.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _reserve(self, seq: Sequence, upto: int) -> bool:
        """Slots for the sequence's first `upto` tokens."""
        have = self.pool.requests[seq.seq_id].num_tokens
        return upto <= have or self.pool.append(seq.seq_id, upto - have)

    def schedule(self) -> list[Scheduled]:
        budget = self.max_num_batched_tokens
        out: list[Scheduled] = []
        preempted = False
        for seq in list(self.running.values()):
            if budget == 0:
                break
            if seq.seq_id not in self.running:           # preempted below for an earlier sequence
                continue
            n = min(seq.num_tokens - seq.num_computed, budget)
            while not self._reserve(seq, seq.num_computed + n):
                victim = next(reversed(self.running.values()))   # the most recently admitted
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.seq_id not in self.running:
                continue
            out.append(Scheduled(seq, n, seq.num_computed + n == seq.num_tokens))
            budget -= n
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            cached = self.pool.allocate(seq.seq_id, seq.tokens, seq.adapter)
            if cached is None:                           # not enough free blocks now: wait, FCFS
                break
            self.waiting.popleft()
            if not seq.admitted and seq.preemptions == 0:
                seq.num_cached = cached
            seq.num_computed, seq.admitted = cached, True
            self.running[seq.seq_id] = seq
            n = min(seq.num_tokens - seq.num_computed, budget)
            out.append(Scheduled(seq, n, seq.num_computed + n == seq.num_tokens))
            budget -= n
        return out
