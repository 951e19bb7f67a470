"""The inference engine (issue 16): continuous batching (`scheduler.py`) over a paged KV cache
(`blocks.py` block tables, reference counts and prefix caching; `paged.py` block storage;
`batch.py` attention through the block tables), per-request sampling (`params.py`, `sampler.py`),
all driven by `engine.Engine`. `llmkit.generation.generate` stays beside it for one padded batch."""
from .blocks import Allocation, Block, BlockPool, KVBudgetError, block_hash
from .engine import CompletionOutput, Engine, RequestOutput
from .paged import PagedKV
from .params import SamplingParams

__all__ = ["Allocation", "Block", "BlockPool", "KVBudgetError", "block_hash", "PagedKV", "Engine",
           "SamplingParams", "RequestOutput", "CompletionOutput"]
