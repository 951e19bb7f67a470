"""The paged KV cache's bookkeeping: fixed-size blocks, a block table per request, reference counts
and prefix caching (Kwon et al. 2023, "Efficient Memory Management for Large Language Model Serving
with PagedAttention"; vLLM's automatic prefix caching).

The KV memory is `num_blocks` blocks of `block_size` token slots. A request owns a block table, the
list of block ids that hold its tokens in order: token t lives in block table[t // block_size], slot
t % block_size. Blocks are never copied; a request grows by taking one more block when its last is
full.

Prefix caching. A *full* block is named by a chained hash of its tokens,

    h_i = hash(h_{i-1}, tokens of block i, adapter)      (h_{-1} = None)

so equal hashes mean equal whole prefixes (and the same adapter: a LoRA changes the keys and
values). A new request walks its prompt's full blocks: while h_i is cached, it shares that block
(ref_count + 1) instead of computing it. At least one prompt token is always left to compute, since
the first new token needs the last prompt position's logits. A block whose ref_count drops to 0 goes
to the free queue but keeps its hash and contents: a later request can still hit it, until the pool
needs the block for new tokens; free blocks are reused least recently freed first (LRU), and a reused
block's old hash is forgotten (evicted).

`blocks_in_use` counts blocks with ref_count > 0: it returns to its baseline when every request has
finished or been cancelled.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Hashable, Optional, Sequence


class KVBudgetError(ValueError):
    """A request that the KV pool could never hold, even empty."""


@dataclass
class Block:
    id: int
    ref_count: int = 0
    hash: Optional[int] = None          # set once the block is full and registered


@dataclass
class Allocation:
    table: list[int] = field(default_factory=list)   # block ids, in token order
    num_tokens: int = 0                 # tokens whose slots are allocated
    num_hashed: int = 0                 # leading full blocks registered (or shared) in the prefix cache
    last_hash: Optional[int] = None     # h of the last hashed block
    adapter: Hashable = None


def block_hash(parent: Optional[int], tokens: Sequence[int], adapter: Hashable = None) -> int:
    """h_i = hash(h_{i−1}, tokens of block i, adapter)."""
    return hash((parent, tuple(tokens), adapter))


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int = 16, *, prefix_caching: bool = True):
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: expected an integer >= 1")
        self.block_size, self.prefix_caching = block_size, prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # LRU first
        self.cached: dict[int, int] = {}                  # hash -> block id
        self.requests: dict[Hashable, Allocation] = {}
        self.hits = self.queries = 0                      # prefix-cache block hits / lookups

    # ---- sizes --------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def blocks_in_use(self) -> int:
        return self.num_blocks - len(self.free)

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def check_fits(self, num_tokens: int, what: str = "request") -> None:
        """KVBudgetError when `num_tokens` could not fit even in the whole, empty pool."""
        need = self.blocks_for(num_tokens)
        if need > self.num_blocks:
            raise KVBudgetError(f"{what} needs {num_tokens} KV slots = {need} blocks of {self.block_size}, but the "
                                f"pool has {self.num_blocks} blocks ({self.num_blocks * self.block_size} slots) in all: "
                                "expected fewer tokens (or a larger KV budget)")

    # ---- one request ----------------------------------------------------------------------------
    def allocate(self, request_id: Hashable, prompt: Sequence[int], adapter: Hashable = None) -> Optional[int]:
        """Blocks for a new request's prompt: shared cached prefix blocks, then fresh ones.

        Returns the number of prompt tokens already in the cache (a multiple of block_size, always
        < len(prompt)), or None when the free blocks do not suffice now (nothing is taken: retry
        after others finish). KVBudgetError if the prompt could never fit."""
        if request_id in self.requests:
            raise ValueError(f"request {request_id!r} already holds blocks")
        if not prompt:
            raise ValueError(f"request {request_id!r}: an empty prompt; expected at least one token")
        self.check_fits(len(prompt), f"request {request_id!r}")
        bs = self.block_size
        hits, parent = [], None
        if self.prefix_caching:
            for i in range((len(prompt) - 1) // bs):       # full blocks, leaving >= 1 token to compute
                h = block_hash(parent, prompt[i * bs:(i + 1) * bs], adapter)
                self.queries += 1
                if h not in self.cached:
                    break
                hits.append(self.cached[h])
                parent = h
        fresh = self.blocks_for(len(prompt)) - len(hits)
        reusable = sum(1 for b in hits if self.blocks[b].ref_count == 0)   # hit blocks now in the free queue
        if fresh > self.num_free - reusable:
            return None
        self.hits += len(hits)
        alloc = Allocation(adapter=adapter)
        for b in hits:
            self._take(b)
        alloc.table = hits + [self._pop_free() for _ in range(fresh)]
        alloc.num_tokens, alloc.num_hashed, alloc.last_hash = len(prompt), len(hits), parent
        self.requests[request_id] = alloc
        return len(hits) * bs

    def append(self, request_id: Hashable, n: int = 1) -> bool:
        """Room for n more tokens of a running request; False (nothing taken) when blocks run out."""
        alloc = self.requests[request_id]
        need = self.blocks_for(alloc.num_tokens + n) - len(alloc.table)
        if need > self.num_free:
            return False
        alloc.table += [self._pop_free() for _ in range(need)]
        alloc.num_tokens += n
        return True

    def commit(self, request_id: Hashable, tokens: Sequence[int]) -> None:
        """Register the request's newly full blocks in the prefix cache; `tokens` are all its tokens
        so far (prompt + generated) whose keys and values are now written."""
        if not self.prefix_caching:
            return
        alloc, bs = self.requests[request_id], self.block_size
        while (alloc.num_hashed + 1) * bs <= len(tokens):
            i = alloc.num_hashed
            h = block_hash(alloc.last_hash, tokens[i * bs:(i + 1) * bs], alloc.adapter)
            block = self.blocks[alloc.table[i]]
            if h not in self.cached:                      # the first writer names it; a duplicate stays private
                block.hash = h
                self.cached[h] = block.id
            alloc.num_hashed, alloc.last_hash = i + 1, h

    def free_request(self, request_id: Hashable) -> None:
        """Release a finished, cancelled or preempted request's blocks (cached ones stay hittable)."""
        alloc = self.requests.pop(request_id, None)
        if alloc is None:
            return
        for b in reversed(alloc.table):                   # the tail first: it is the least likely to be shared
            block = self.blocks[b]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[b] = None                       # most recently freed: evicted last

    def table(self, request_id: Hashable) -> list[int]:
        return list(self.requests[request_id].table)

    def slot(self, request_id: Hashable, position: int) -> tuple[int, int]:
        """(block id, offset) of token `position` of a request."""
        alloc = self.requests[request_id]
        return alloc.table[position // self.block_size], position % self.block_size

    # ---- internals ------------------------------------------------------------------------------
    def _take(self, b: int) -> None:
        block = self.blocks[b]
        if block.ref_count == 0:
            del self.free[b]
        block.ref_count += 1

    def _pop_free(self) -> int:
        b, _ = self.free.popitem(last=False)              # least recently freed
        block = self.blocks[b]
        if block.hash is not None:                        # evict its old contents from the prefix cache
            if self.cached.get(block.hash) == b:
                del self.cached[block.hash]
            block.hash = None
        block.ref_count = 1
        return b
