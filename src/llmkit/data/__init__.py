"""llmkit.data: text sources, tokenized memmap shards, resumable batches, and synthetic tasks.

    texts  = iter_texts("corpus.jsonl", text_field="text")            # files, lists, HF datasets
    info   = build_shards("input.txt", tokenizer, "shards/")           # train_*.bin, val_*.bin, meta.json
    train  = RandomWindowBatches(load_shards("shards/", "train"), batch_size=12, block_size=64)
    val    = PackedBatches(load_shards("shards/", "val"), 12, 64, shuffle=False)   # val.iter_once()
    stream = StreamingBatches(lambda: iter_texts(paths), tokenizer, 8, 256)       # bigger than memory

Every batch loader yields {"input_ids", "targets"} (plus "position_ids"/"doc_ids" on request), takes
rank/world_size, and has state_dict()/load_state_dict() for exact resume.
"""
from .batches import PackedBatches, RandomWindowBatches, as_token_array, make_batch
from .errors import DataError
from .shards import ShardInfo, build_shards, load_shards
from .sources import describe_source, iter_texts, resolve_paths
from .streaming import StreamingBatches
from .synthetic import Example, SyntheticTasks, exact_match
from .tokens import ShardedTokens, token_dtype

__all__ = ["iter_texts", "resolve_paths", "describe_source", "build_shards", "load_shards", "ShardInfo",
           "ShardedTokens", "token_dtype", "RandomWindowBatches", "PackedBatches", "StreamingBatches",
           "make_batch", "as_token_array", "DataError", "SyntheticTasks", "Example", "exact_match"]
