"""Tensor-parallel inference (Megatron splits, infer/tensor_parallel.py): 2 gloo CPU ranks under
torchrun give one process's logits and greedy tokens, hold 1/W of each split weight, and issue one
all-reduce per sublayer; bad splits raise a clear error."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llmkit
import tp_worker
from llmkit.generation import generate
from llmkit.infer.tensor_parallel import check_shardable, local_kv_heads, query_head_slice, shard_model

WORKER = Path(__file__).with_name("tp_worker.py")
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict:
    """One torchrun launch for all models (gpt2-tiny, llama-tiny with GQA, GPT-2 with ALiBi)."""
    out = tmp_path_factory.mktemp("tp")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(WORKER), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LLMKIT_NO_PROGRESS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return torch.load(out / "tp.pt", weights_only=True)


@pytest.mark.parametrize("name", sorted(tp_worker.MODELS))
def test_two_ranks_give_one_process_logits_and_greedy_tokens(ranks, name):
    model, b = tp_worker.build(name), tp_worker.batch()
    with torch.no_grad():
        logits = model(b["input_ids"]).logits
        padded = model(b["input_ids"], b["attention_mask"]).logits
    result = ranks[name]
    assert result["logits"]["same_on_all_ranks"]
    torch.testing.assert_close(result["logits"]["logits"], logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(result["logits"]["padded_logits"], padded, atol=1e-5, rtol=0)
    assert torch.equal(result["generate"]["tokens"], generate(model, b["input_ids"], max_new_tokens=8))
    assert torch.equal(result["generate"]["padded_tokens"],
                       generate(model, b["input_ids"], attention_mask=b["attention_mask"], max_new_tokens=8))


@pytest.mark.parametrize("name", sorted(tp_worker.MODELS))
def test_the_engine_on_two_ranks_gives_the_single_process_engine_tokens(ranks, name):
    from llmkit.infer import Engine, SamplingParams
    result = ranks[name]["engine"]
    single = Engine(tp_worker.build(name)).generate(result["prompts"], SamplingParams(max_tokens=8, temperature=0.0))
    assert result["tokens"] == single and all(len(t) == 8 for t in single)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_each_rank_holds_its_slice_and_one_all_reduce_per_sublayer(ranks, name):
    model = tp_worker.build(name)
    config, full = model.config, dict(model.named_parameters())
    hd = config.dim_per_head
    per_rank = ranks[name]["shards"]["ranks"]
    assert len(per_rank) == WORLD
    q = model.transformer.layers[0].self_attn.q_proj.weight
    for rank, local in enumerate(per_rank):
        rows = config.n_heads * hd // WORLD
        assert local["q_proj"].shape == (rows, config.d_model)
        torch.testing.assert_close(local["q_proj"], q[rank * rows:(rank + 1) * rows], atol=0, rtol=0)
        assert local["heads"] == [(config.n_heads // WORLD, config.kv_heads // WORLD)] * config.n_layers
        h = config.n_heads // WORLD
        assert local["query_heads"] == (rank * h, (rank + 1) * h)        # the slice, saved as (start, stop)
        for pname, shape in local["shapes"].items():
            whole = tuple(full[pname].shape)
            leaf = pname.split(".")[-2]
            if leaf in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):        # column split
                assert shape == (whole[0] // WORLD, *whole[1:]), pname
            elif leaf in ("o_proj", "down_proj") and pname.endswith("weight"):       # row split
                assert shape == (whole[0], whole[1] // WORLD), pname
            else:                                           # row-split biases, norms, embeddings, head
                assert shape == whole, pname
    assert torch.equal(torch.cat([local["q_proj"] for local in per_rank]), q.detach())
    # exactly one all-reduce after o_proj and one after down_proj in every block, nothing else
    assert ranks[name]["shards"]["comm_counts"] == {"c10d_functional.all_reduce": 2 * config.n_layers}


def test_splits_that_do_not_divide_are_a_clear_error_on_real_ranks(ranks):
    errors = ranks["errors"]
    assert "n_kv_heads=1 is not divisible" in errors["n_kv_heads"] and "multiple of 2" in errors["n_kv_heads"]
    assert "d_ff=175 is not divisible" in errors["d_ff"]


def test_check_shardable_names_field_value_and_expected():
    torch.manual_seed(0)
    llama = llmkit.build_model(llmkit.get_preset("llama-tiny"))                  # 4 heads, 2 kv, d_ff 176
    check_shardable(llama, 2)
    with pytest.raises(ValueError, match=r"n_heads=4 is not divisible .* world size 3: expected a multiple of 3"):
        check_shardable(llama, 3)
    with pytest.raises(ValueError, match=r"n_kv_heads=2 is not divisible .* world size 4"):
        check_shardable(llama, 4)
    with pytest.raises(ValueError, match=r"d_ff=176 is not divisible .* world size 32"):
        check_shardable(llmkit.build_model(llmkit.get_preset("llama-tiny", n_heads=32, n_kv_heads=32, d_model=64)), 32)
    assert local_kv_heads(llama) == 2 and query_head_slice(llama) == slice(0, 4)      # unsharded: all heads


@pytest.mark.parametrize("preset", ["bert-tiny", "bart-tiny"])
def test_a_model_that_is_not_a_decoder_causal_lm_is_refused_before_any_distributed_setup(preset, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    model = llmkit.build_model(llmkit.get_preset(preset))
    with pytest.raises(ValueError, match=r"model=\w+: expected a decoder CausalLM"):
        shard_model(model)
    assert not torch.distributed.is_initialized()


def test_without_torchrun_or_a_mesh_shard_model_says_so(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match="launch with torchrun or pass a DeviceMesh"):
        shard_model(llmkit.build_model(llmkit.get_preset("gpt2-tiny")))
