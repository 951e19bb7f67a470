"""Tensor-parallel inference under torchrun: the script tests/test_infer_tensor_parallel.py runs.

    python -m torch.distributed.run --nproc_per_node 2 tests/tp_worker.py OUT [--models gpt2,llama]
        [--checks logits,generate]

Every rank builds the same seeded tiny model (`build`), shards it with `shard_model` and runs each
check of `CHECKS` on it; rank 0 saves {model: {check: result}} to OUT/tp.pt (torch.save). A check is
`check(model, ctx) -> dict` (ctx: rank, world size, group); to test more (the engine) on a sharded
model, add a function to CHECKS and name it in --checks.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor.debug import CommDebugMode

import llmkit
from llmkit.generation import generate
from llmkit.infer.tensor_parallel import local_shard, query_head_slice, shard_model

# name -> (preset, overrides); llama-tiny has GQA (4 query heads, 2 kv heads); "alibi" is a
# GPT-2 layout with ALiBi instead of learned positions (its mask is per head).
MODELS = {"gpt2": ("gpt2-tiny", {}),
          "llama": ("llama-tiny", {}),
          "alibi": ("gpt2-tiny", {"positional": "alibi"})}
SEED = 0
# shard_model's src_rank per model: llama-tiny is cut by each rank from its own (identical) copy,
# the others are scattered from rank 0 (the default).
SRC_RANK = {"llama": None}


def build(name: str) -> torch.nn.Module:
    preset, overrides = MODELS[name]
    torch.manual_seed(SEED)
    return llmkit.build_model(llmkit.get_preset(preset, max_seq_len=64, **overrides)).eval()


def batch() -> dict:
    """A fixed (2, 12) batch, the second row left-padded by 3."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0
    return {"input_ids": ids, "attention_mask": mask}


def check_logits(model, ctx) -> dict:
    b = batch()
    with torch.no_grad():
        plain = model(b["input_ids"]).logits
        padded = model(b["input_ids"], b["attention_mask"]).logits
    return {"logits": plain, "padded_logits": padded, "same_on_all_ranks": _agree(plain, ctx)}


def check_generate(model, ctx) -> dict:
    b = batch()
    tokens = generate(model, b["input_ids"], max_new_tokens=8)                       # KV-cached greedy
    padded = generate(model, b["input_ids"], attention_mask=b["attention_mask"], max_new_tokens=8)
    return {"tokens": tokens, "padded_tokens": padded}


def check_shards(model, ctx) -> dict:
    """Per rank (lists indexed by rank): the local shape of every parameter, layer 0's local q_proj
    weight, the local head counts; and the collectives one forward issues."""
    local = {"shapes": {name: tuple(local_shard(p).shape) for name, p in model.named_parameters()},
             "q_proj": local_shard(model.transformer.layers[0].self_attn.q_proj.weight).detach().clone(),
             "heads": [(b.self_attn.n_heads, b.self_attn.n_kv_heads) for b in model.transformer.layers],
             "query_heads": (query_head_slice(model).start, query_head_slice(model).stop)}
    gathered = [None] * ctx["world_size"]
    dist.all_gather_object(gathered, local)
    comm = CommDebugMode()
    with torch.no_grad(), comm, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)       # its module hooks on a ModelOutput-returning model
        model(batch()["input_ids"])
    counts = {str(op): n for op, n in comm.get_comm_counts().items()}
    return {"ranks": gathered, "comm_counts": counts}


def check_engine(model, ctx) -> dict:
    """Greedy completions of the paged engine on the sharded model."""
    from llmkit.infer import Engine, SamplingParams
    prompts = [list(range(5, 17)), list(range(30, 37))]
    return {"prompts": prompts,
            "tokens": Engine(model).generate(prompts, SamplingParams(max_tokens=8, temperature=0.0))}


CHECKS = {"logits": check_logits, "generate": check_generate, "shards": check_shards, "engine": check_engine}


def check_errors(ctx) -> dict:
    """The clear errors on real ranks: MQA (1 kv head) and d_ff = 175 do not split over 2."""
    out = {}
    for field, overrides in (("n_kv_heads", dict(n_kv_heads=1)), ("d_ff", dict(d_ff=175))):
        torch.manual_seed(SEED)
        model = llmkit.build_model(llmkit.get_preset("llama-tiny", **overrides))
        try:
            shard_model(model)
            out[field] = None
        except ValueError as error:
            out[field] = str(error)
    return out


def _agree(t: torch.Tensor, ctx) -> bool:
    gathered = [torch.empty_like(t) for _ in range(ctx["world_size"])]
    dist.all_gather(gathered, t.contiguous())
    return all(torch.equal(g, gathered[0]) for g in gathered)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--models", default="gpt2,llama,alibi")
    parser.add_argument("--checks", default="logits,generate,shards,engine")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    ctx = {"rank": dist.get_rank(), "world_size": dist.get_world_size()}
    results = {}
    for name in args.models.split(","):
        model = shard_model(build(name), src_rank=SRC_RANK.get(name, 0))
        results[name] = {check: CHECKS[check](model, ctx) for check in args.checks.split(",")}
    results["errors"] = check_errors(ctx)
    if ctx["rank"] == 0:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(results, out / "tp.pt")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
