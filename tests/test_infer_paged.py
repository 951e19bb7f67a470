"""Paged KV storage (issue 16, part): keys and values written through block tables and read back
equal a contiguous cache, and attention over them equals contiguous attention."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llmkit.infer import BlockPool
from llmkit.infer.paged import PagedKV


def test_paged_attention_equals_contiguous_attention_for_interleaved_requests():
    torch.manual_seed(0)
    n_kv, hd, bs = 2, 8, 4
    pool = BlockPool(num_blocks=16, block_size=bs, prefix_caching=False)
    kv = PagedKV(n_layers=1, num_blocks=16, block_size=bs, n_kv_heads=n_kv, head_dim=hd)
    lengths = {"a": 11, "b": 6}
    full = {r: (torch.randn(n_kv, n, hd), torch.randn(n_kv, n, hd)) for r, n in lengths.items()}
    written = {"a": 0, "b": 0}
    pool.allocate("a", [0] * 3)
    pool.allocate("b", [0] * 2)
    for r, n in (("a", 3), ("b", 2)):            # prefills
        kv.write(0, pool.table(r), torch.arange(n), full[r][0][:, :n], full[r][1][:, :n])
        written[r] = n
    while any(written[r] < lengths[r] for r in lengths):   # decode steps, interleaved, blocks taken as they fill
        for r in lengths:
            t = written[r]
            if t < lengths[r]:
                assert pool.append(r)
                kv.write(0, pool.table(r), torch.tensor([t]), full[r][0][:, t:t + 1], full[r][1][:, t:t + 1])
                written[r] += 1
    for r, n in lengths.items():
        k, v = kv.gather(0, pool.table(r), n)
        assert torch.equal(k, full[r][0]) and torch.equal(v, full[r][1])
        q = torch.randn(n_kv, 1, hd)
        torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v),
                                   F.scaled_dot_product_attention(q, *full[r]))
    # the two requests' blocks interleave in the shared tensor: neither table is one contiguous run
    a, b = pool.table("a"), pool.table("b")
    assert not set(a) & set(b) and (max(a) > min(b) and max(b) > min(a))
