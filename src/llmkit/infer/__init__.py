"""Inference engine (issue 16, in progress): so far the paged KV cache's block pool with prefix
caching (`blocks.py`) and the paged storage it indexes (`paged.py`). The Engine (continuous batching over these blocks), speculative decoding,
multi-LoRA serving and tensor parallelism are still to come; `llmkit.generation.generate` is the
decoding path until then."""
from .blocks import Allocation, Block, BlockPool, KVBudgetError, block_hash
from .paged import PagedKV

__all__ = ["Allocation", "Block", "BlockPool", "KVBudgetError", "block_hash", "PagedKV"]
