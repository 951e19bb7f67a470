"""The inference engine (issue 16): `engine.Engine` drives continuous batching (`scheduler.py`) over a
paged KV cache (`blocks.py` block tables, reference counts and prefix caching; `paged.py` block
storage; `batch.py` attention through the block tables), per-request sampling (`params.py`,
`sampler.py`), speculative decoding (`speculative.py` the rule, `speculate.py` the proposers),
multi-LoRA serving (`multi_lora.py`) and, under torchrun, tensor parallelism
(`tensor_parallel.shard_model`, imported on demand: it loads torch.distributed's tensor package).
`llmkit.generation.generate` stays beside the engine for one padded batch, with equal greedy output."""
from .blocks import Allocation, Block, BlockPool, KVBudgetError, block_hash
from .engine import CompletionOutput, Engine, RequestOutput
from .multi_lora import LoraBank
from .paged import PagedKV
from .params import SamplingParams

__all__ = ["Allocation", "Block", "BlockPool", "KVBudgetError", "block_hash", "PagedKV", "Engine",
           "SamplingParams", "RequestOutput", "CompletionOutput", "LoraBank"]
