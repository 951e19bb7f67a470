"""The paged KV cache's block pool (issue 16, first part): block tables, reference counts, prefix
caching by chained hashes (adapter in the hash), LRU eviction of freed blocks, and the budget."""
from __future__ import annotations

import pytest

from llmkit.infer import BlockPool, KVBudgetError, block_hash


def test_tables_grow_a_block_at_a_time_and_free_returns_to_the_baseline():
    pool = BlockPool(num_blocks=8, block_size=4)
    assert pool.allocate("a", list(range(6))) == 0            # 6 tokens: 2 blocks
    assert len(pool.table("a")) == 2 and pool.blocks_in_use == 2
    assert pool.append("a", 2) and len(pool.table("a")) == 2    # 8 tokens still fit in 2 blocks
    assert pool.append("a") and len(pool.table("a")) == 3       # the 9th takes a third
    assert pool.slot("a", 8) == (pool.table("a")[2], 0)
    assert pool.allocate("b", [1, 2, 3]) == 0
    pool.free_request("a")
    pool.free_request("b")
    assert pool.blocks_in_use == 0 and pool.num_free == 8


def test_a_shared_prefix_is_computed_once_and_counted_by_reference():
    pool = BlockPool(num_blocks=8, block_size=4)
    system = [9, 8, 7, 6, 5, 4, 3, 2]                           # two full blocks
    assert pool.allocate("a", system + [1]) == 0
    pool.commit("a", system + [1])                              # its two full blocks are registered
    assert pool.allocate("b", system + [0, 0]) == 8             # both hit
    ta, tb = pool.table("a"), pool.table("b")
    assert ta[:2] == tb[:2] and ta[2] != tb[2]
    assert [pool.blocks[i].ref_count for i in ta[:2]] == [2, 2]
    assert pool.blocks_in_use == 4
    pool.free_request("a")
    assert [pool.blocks[i].ref_count for i in tb[:2]] == [1, 1] and pool.blocks_in_use == 3
    pool.free_request("b")
    assert pool.blocks_in_use == 0


def test_at_least_one_prompt_token_is_left_to_compute():
    pool = BlockPool(num_blocks=8, block_size=4)
    prompt = list(range(8))
    pool.allocate("a", prompt)
    pool.commit("a", prompt)
    assert pool.allocate("b", prompt) == 4                      # the last block is recomputed, not hit


def test_the_adapter_is_part_of_the_hash():
    pool = BlockPool(num_blocks=8, block_size=2)
    prompt = [1, 2, 3]
    pool.allocate("a", prompt, adapter="sql")
    pool.commit("a", prompt)
    assert pool.allocate("b", prompt, adapter=None) == 0
    assert pool.allocate("c", prompt, adapter="sql") == 2
    assert block_hash(None, [1, 2], "sql") != block_hash(None, [1, 2], None)
    assert block_hash(block_hash(None, [1, 2]), [3, 4]) != block_hash(None, [3, 4])   # chained: the prefix counts


def test_freed_blocks_stay_hittable_until_evicted_least_recently_freed_first():
    pool = BlockPool(num_blocks=4, block_size=2)
    pool.allocate("a", [1, 2, 3]); pool.commit("a", [1, 2, 3]); pool.free_request("a")       # noqa: E702
    pool.allocate("b", [5, 6, 7]); pool.commit("b", [5, 6, 7]); pool.free_request("b")       # noqa: E702
    assert pool.blocks_in_use == 0 and len(pool.cached) == 2
    assert pool.allocate("c", [1, 2, 9]) == 2                   # a's block, freed, still hits
    pool.free_request("c")
    # the pool now needs 4 fresh blocks: every cached block is evicted, least recently freed first
    order = list(pool.free)
    assert pool.allocate("d", [0] * 8) == 0 and pool.table("d") == order
    assert pool.cached == {}
    pool.free_request("d")
    assert pool.allocate("e", [1, 2, 3]) == 0                   # evicted: a miss


def test_out_of_blocks_now_is_none_and_never_fitting_is_a_clear_error():
    pool = BlockPool(num_blocks=3, block_size=4)
    assert pool.allocate("a", list(range(9))) == 0              # 3 blocks
    assert pool.allocate("b", [1]) is None and "b" not in pool.requests and pool.blocks_in_use == 3
    assert pool.append("a", 4) is False and len(pool.table("a")) == 3
    with pytest.raises(KVBudgetError, match=r"needs 13 KV slots = 4 blocks of 4, but the pool has 3 blocks"):
        pool.allocate("c", list(range(13)))
    pool.free_request("a")
    assert pool.allocate("b", [1]) == 0                         # freed: fits now
    with pytest.raises(ValueError, match="num_blocks=0"):
        BlockPool(num_blocks=0)


def test_a_hit_on_a_free_block_is_not_also_handed_out_as_a_fresh_one():
    pool = BlockPool(num_blocks=3, block_size=2)
    pool.allocate("a", [1, 2, 3]); pool.commit("a", [1, 2, 3]); pool.free_request("a")       # noqa: E702
    assert pool.allocate("b", [1, 2, 3, 4, 5]) == 2             # hit 1 free block + 2 fresh = the whole pool
    table = pool.table("b")
    assert len(set(table)) == 3 and pool.num_free == 0
    assert pool.allocate("c", [7]) is None
