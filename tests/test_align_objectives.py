"""llmkit.align objectives on a tiny llama: one forward, the three references, LoRA, reward model."""
import math

import pytest
import torch

import llmkit
from llmkit.align import (DPOObjective, IPOObjective, KTOObjective, ORPOObjective, PreferenceBatches, RewardObjective,
                          causal_lm_logps, collate_pairs, collate_unpaired, frozen_copy, normalize_rows,
                          precompute_reference_logps, reward_model_from, sequence_logps, to_unpaired, tokenize_rows)
from llmkit.model import ValueModel
from llmkit.tokenizer import train_char
from llmkit.train import TrainConfig, Trainer


ROWS = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)} for a, b in
        [(1, 2), (12, 7), (30, 4), (5, 55), (8, 9), (41, 2), (3, 3), (20, 20)]]


pytestmark = pytest.mark.usefixtures("one_thread_module")     # tiny models: see conftest.torch_threads


@pytest.fixture(scope="module")
def tokenizer():
    return train_char(texts=["0123456789+=-"], special_tokens=("<pad>", "<|endoftext|>"), pad_token="<pad>")


def tiny_model(tokenizer, seed=0):
    torch.manual_seed(seed)
    config = llmkit.get_preset("llama-tiny", vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=2,
                               n_kv_heads=1, d_ff=64, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id)
    return llmkit.build_model(config)


def examples(tokenizer, rows=ROWS):
    return tokenize_rows(normalize_rows(rows), tokenizer, max_length=16, prefix_ids=[tokenizer.eos_token_id])


def test_causal_lm_logps_equals_sequence_logps_of_full_logits(tokenizer):
    model = tiny_model(tokenizer)
    batch = collate_pairs(examples(tokenizer)[:3], tokenizer.pad_token_id)
    ids, am, lm = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    full = sequence_logps(model(ids, attention_mask=am).logits, ids, lm, "mean")
    fast = causal_lm_logps(model, ids, am, lm, "mean")
    assert torch.allclose(full, fast, atol=1e-5) and full.shape == (6,)


def test_dpo_step1_is_exactly_ln2_with_copy_and_matches_precomputed(tokenizer):
    model, ex = tiny_model(tokenizer), examples(tokenizer)
    batch = collate_pairs(ex[:4], tokenizer.pad_token_id)
    loss, metrics = DPOObjective(frozen_copy(model), beta=0.1).loss(model, batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert metrics["rewards/margins"] == 0.0 and metrics["rewards/accuracies"] == 0.0
    pre = precompute_reference_logps(ex[:4], frozen_copy(model), tokenizer.pad_token_id, batch_size=3)
    loss_pre, _ = DPOObjective(None, beta=0.1).loss(model, collate_pairs(pre, tokenizer.pad_token_id))
    assert loss_pre.item() == pytest.approx(math.log(2), abs=1e-6)
    with pytest.raises(KeyError, match="precompute_reference_logps"):
        DPOObjective(None).loss(model, batch)


def test_every_method_trains_full_and_improves_its_loss(tokenizer, tmp_path):
    for method in ("dpo", "ipo", "kto", "orpo"):
        model = tiny_model(tokenizer)
        ex = examples(tokenizer, to_unpaired(normalize_rows(ROWS)) if method == "kto" else ROWS)
        ref = frozen_copy(model)
        objective = {"dpo": lambda: DPOObjective(ref, beta=0.5), "ipo": lambda: IPOObjective(ref, tau=0.5),
                     "kto": lambda: KTOObjective(ref, beta=0.5), "orpo": lambda: ORPOObjective(lam=0.5)}[method]()
        batches = PreferenceBatches(ex, 4, tokenizer.pad_token_id, seed=0)
        fixed = batches.fixed(2)
        before = sum(objective.loss(model, b)[0].item() for b in fixed)
        Trainer(model, objective.loss, batches, config=TrainConfig(out_dir=str(tmp_path / method), max_steps=15, lr=3e-3,
                                                              progress=False, tensorboard=False, plot=False)).fit()
        after, metrics = 0.0, {}
        for b in fixed:
            loss, metrics = objective.loss(model, b)
            after += loss.item()
        assert after < before, method
        assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"} <= set(metrics)
        assert ("rewards/accuracies" in metrics) == (method != "kto")       # KTO has no pairs to rank
        if method in ("dpo", "ipo"):
            assert metrics["rewards/margins"] > 0, method
        if method == "kto":
            assert "kl" in metrics and metrics["kl"] >= 0


def test_lora_reference_is_the_adapter_free_model(tokenizer, tmp_path):
    peft = pytest.importorskip("llmkit.peft")   # helper P's package; the contract is apply/disable/trainable_parameters
    model = tiny_model(tokenizer)
    handle = peft.apply(model, "lora", r=4, alpha=8, targets=["q_proj", "v_proj"])
    ex = examples(tokenizer)
    batch = collate_pairs(ex[:4], tokenizer.pad_token_id)
    objective = DPOObjective(handle, beta=0.1)
    loss, _ = objective.loss(model, batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)          # LoRA starts as the identity
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    Trainer(model, objective.loss, PreferenceBatches(ex, 4, tokenizer.pad_token_id),
            config=TrainConfig(out_dir=str(tmp_path), max_steps=10, lr=1e-2, progress=False, tensorboard=False,
                               plot=False)).fit()
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)   # base frozen
    loss_after, metrics = objective.loss(model, batch)
    assert loss_after.item() < math.log(2) and metrics["rewards/margins"] > 0
    with handle.disable():                                              # the reference is still the base model
        ids, am, lm = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
        ref_now = causal_lm_logps(model, ids, am, lm)
    assert torch.allclose(ref_now, causal_lm_logps(tiny_model(tokenizer), ids, am, lm), atol=1e-6)


def test_reward_model_scores_last_real_token_and_learns(tokenizer, tmp_path):
    backbone = tiny_model(tokenizer)
    model = reward_model_from(backbone)
    assert isinstance(model, ValueModel) and model.transformer is backbone.transformer
    batch = collate_pairs(examples(tokenizer)[:2], tokenizer.pad_token_id)
    ids, am = batch["input_ids"], batch["attention_mask"]
    scores = model(ids, attention_mask=am).logits                       # (4,)
    last = am.sum(1) - 1
    alone = torch.stack([model(ids[i:i + 1, :last[i] + 1]).logits[0] for i in range(4)])
    assert torch.allclose(scores, alone, atol=1e-5)                     # padding never changes a score
    objective = RewardObjective()
    batches = PreferenceBatches(examples(tokenizer), 4, tokenizer.pad_token_id)
    loss_before = sum(objective.loss(model, b)[0].item() for b in batches.fixed())
    Trainer(model, objective.loss, batches, config=TrainConfig(out_dir=str(tmp_path), max_steps=30, lr=3e-3,
                                                          progress=False, tensorboard=False, plot=False)).fit()
    accuracy = sum(objective.loss(model, b)[1]["rewards/accuracies"] for b in batches.fixed()) / len(batches)
    loss_after = sum(objective.loss(model, b)[0].item() for b in batches.fixed())
    assert loss_after < loss_before and accuracy >= 0.75               # fits the 8 training pairs


def test_kto_needs_two_examples_and_a_reference(tokenizer):
    ex = examples(tokenizer, to_unpaired(normalize_rows(ROWS)))
    with pytest.raises(Exception, match="at least 2"):
        PreferenceBatches(ex, 1, tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="KTO"):
        KTOObjective(None)
    with pytest.raises(TypeError, match="reference"):
        DPOObjective("copy")


def test_nll_coef_adds_alpha_times_the_length_normalised_chosen_nll(tokenizer):
    """RPO (Pang et al., 2024): L = L_method + α · mean(−log π(y_w|x) / |y_w|) over chosen / desirable rows."""
    model, pad = tiny_model(tokenizer), tokenizer.pad_token_id
    ref = frozen_copy(model)
    paired = collate_pairs(examples(tokenizer)[:4], pad)
    unpaired = collate_unpaired(examples(tokenizer, to_unpaired(normalize_rows(ROWS)))[:6], pad)
    for make, batch in ((lambda a: DPOObjective(ref, beta=0.1, nll_coef=a), paired),
                        (lambda a: IPOObjective(ref, tau=0.5, nll_coef=a), paired),
                        (lambda a: KTOObjective(ref, beta=0.1, nll_coef=a), unpaired)):
        b = batch["input_ids"].shape[0] // 2
        mean_logps = causal_lm_logps(model, batch["input_ids"][:b], batch["attention_mask"][:b],
                                     batch["loss_mask"][:b], "mean")                      # (B,)
        good = batch["desirable"].bool() if "desirable" in batch else torch.ones(b, dtype=torch.bool)
        nll = -mean_logps[good].mean().item()
        plain, _ = make(0.0).loss(model, batch)
        loss, metrics = make(0.5).loss(model, batch)
        assert loss.item() == pytest.approx(plain.item() + 0.5 * nll, abs=1e-5)
        assert metrics["nll"] == pytest.approx(nll, abs=1e-5) and nll > 0
    assert plain.item() == pytest.approx(0.5, abs=1e-7)               # KTO at π = π_ref: 1 − σ(0)
    with pytest.raises(ValueError, match="nll_coef=-1"):
        DPOObjective(ref, nll_coef=-1)
