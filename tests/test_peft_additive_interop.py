"""Interop with HF peft for the additive methods, both ways: prompt tuning, prefix tuning (trained
directly or through its MLP) and (IA)³ saved by llmkit with format="peft" load in
peft.PeftModel.from_pretrained on the transformers model llmkit.save_hf wrote with the same logits,
and adapters made by peft's save_pretrained load into llmkit with the same logits (within 1e-4).

HF peft's prompt-tuning logits cover the p virtual tokens too, so theirs[:, p:] is compared. A
prefix acts as p past tokens in both: transformers' Llama, GPT-2 and BERT start the real tokens at
position p, as llmkit does (test_hf_starts_real_tokens_after_the_prefix). peft 0.21 refuses prefix
tuning on BertForSequenceClassification (its forward has no `past_key_values` argument), so the
BERT prefix cases feed peft's own get_prompt() to the transformers model by hand."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

import llmkit
import llmkit.peft as lpeft
from llmkit.io.errors import CheckpointError
from llmkit.model import SequenceClassifier
from llmkit.peft import PeftError

transformers = pytest.importorskip("transformers")
hf_peft = pytest.importorskip("peft")

P = 3                                             # virtual tokens
CAUSAL = {"llama-tiny": "LlamaForCausalLM", "gpt2-tiny": "GPT2LMHeadModel"}
OURS = {                                          # kind: (llmkit method, options)
    "prompt": ("prompt_tuning", dict(num_virtual_tokens=P)),
    "prefix": ("prefix_tuning", dict(num_virtual_tokens=P, projection=False)),
    "prefix_mlp": ("prefix_tuning", dict(num_virtual_tokens=P, projection=True, encoder_hidden_size=16)),
    "ia3": ("ia3", {}),
}


def theirs_config(kind: str, task: str):
    if kind == "prompt":
        return hf_peft.PromptTuningConfig(task_type=task, num_virtual_tokens=P)
    if kind.startswith("prefix"):
        return hf_peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=P, prefix_projection=kind == "prefix_mlp",
                                          encoder_hidden_size=16)
    return hf_peft.IA3Config(task_type=task)     # peft's defaults: k/v (+ c_attn) scaled, the FFN's down in


def _export(preset: str, path):
    torch.manual_seed(0)
    model = llmkit.build_model(llmkit.get_preset(preset)).eval()
    llmkit.save_hf(model, path)
    return model


def _hf(path, cls, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(transformers, cls).from_pretrained(path, attn_implementation="eager", **kw).eval()


def _ids():
    return torch.randint(3, 512, (2, 10), generator=torch.Generator().manual_seed(3))


def _randomize(parameters, seed=4):
    """Every trainable tensor off its init ((IA)³ ones, peft's zero-free but seeded defaults)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in parameters:
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def _peft(model, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf_peft.get_peft_model(model, config)


def _load_peft(model, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf_peft.PeftModel.from_pretrained(model, path).eval()


def _run(peft_model, x, kind):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logits = peft_model(input_ids=x).logits
    return logits[:, P:] if kind == "prompt" else logits


@pytest.mark.parametrize("kind", list(OURS))
@pytest.mark.parametrize("preset", list(CAUSAL))
def test_llmkit_adapter_loads_in_hf_peft(preset, kind, tmp_path):
    model = _export(preset, tmp_path / "base")
    method, options = OURS[kind]
    handle = lpeft.apply(model, method, **options)
    _randomize(model.parameters())
    x = _ids()
    with torch.no_grad():
        ours = model(x).logits
    handle.save(tmp_path / "adapter", format="peft")
    meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert meta["task_type"] == "CAUSAL_LM"
    if kind.startswith("prefix"):
        assert meta["prefix_projection"] is (kind == "prefix_mlp")        # the training form, folded file
    peft_model = _load_peft(_hf(tmp_path / "base", CAUSAL[preset]), tmp_path / "adapter")
    theirs = _run(peft_model, x, kind)
    with peft_model.disable_adapter(), torch.no_grad():
        base = peft_model(input_ids=x).logits
    assert (theirs - base).abs().max().item() > 1e-2                       # the adapter is really applied
    assert (theirs - ours).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind", list(OURS))
@pytest.mark.parametrize("preset", list(CAUSAL))
def test_hf_peft_adapter_loads_into_llmkit(preset, kind, tmp_path):
    _export(preset, tmp_path / "base")
    peft_model = _peft(_hf(tmp_path / "base", CAUSAL[preset]), theirs_config(kind, "CAUSAL_LM"))
    _randomize(peft_model.parameters(), seed=5)
    peft_model.save_pretrained(tmp_path / "adapter")
    x = _ids()
    theirs = _run(peft_model.eval(), x, kind)
    model = llmkit.load_hf(tmp_path / "base")
    handle = lpeft.load(model, tmp_path / "adapter")
    info = handle.adapters["default"]
    assert info.method == OURS[kind][0] and getattr(info.config, "projection", False) is False
    with torch.no_grad():
        ours = model(x).logits
        with handle.disable():
            base = model(x).logits
    assert (ours - base).abs().max().item() > 1e-2
    assert (ours - theirs).abs().max().item() <= 1e-4


def _bert_classifier(tmp_path):
    """A BERT base exported by llmkit, its transformers BertForSequenceClassification (saved, so
    every load has the same head) and a factory of the llmkit SequenceClassifier with its weights."""
    mlm = _export("bert-tiny", tmp_path / "mlm")
    torch.manual_seed(1)
    _hf(tmp_path / "mlm", "BertForSequenceClassification", num_labels=3).save_pretrained(tmp_path / "base")
    hf = _hf(tmp_path / "base", "BertForSequenceClassification")

    def ours():
        model = SequenceClassifier(mlm.config, 3, bert_pooler=True).eval()
        model.transformer.load_state_dict(mlm.transformer.state_dict())
        with torch.no_grad():
            for mine, its in ((model.pooler.dense, hf.bert.pooler.dense), (model.classifier.proj, hf.classifier)):
                mine.weight.copy_(its.weight), mine.bias.copy_(its.bias)
        return model
    return tmp_path / "base", ours


def _bert_logits(peft_model, x, kind):
    """peft's SEQ_CLS forward for IA3, and for a prefix where peft runs it on BERT (0.22); peft 0.21
    refuses BERT a prefix, so there its own prompt (get_prompt, the past key/values it would pass)
    goes to the transformers model directly."""
    if kind == "ia3":
        return _run(peft_model, x, kind)
    try:
        with torch.no_grad():
            return peft_model(input_ids=x).logits
    except ValueError as exc:
        if "past key values" not in str(exc):
            raise
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")              # BertModel: `past_key_values` is deprecated for `cache`
        return peft_model.get_base_model()(input_ids=x, past_key_values=peft_model.get_prompt(x.shape[0])).logits


@pytest.mark.parametrize("kind", ["ia3", "prefix"])
def test_bert_classifier_both_ways(kind, tmp_path):
    base, ours_model = _bert_classifier(tmp_path)
    x = _ids()
    method, options = OURS[kind]
    model = ours_model()
    handle = lpeft.apply(model, method, train_head=True, **options)       # the head trains too, as in peft
    _randomize(model.parameters())
    with torch.no_grad():
        ours = model(x).logits
    handle.save(tmp_path / "ours", format="peft")
    meta = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert meta["task_type"] == "SEQ_CLS" and meta["modules_to_save"] == ["classifier"]
    theirs = _bert_logits(_load_peft(_hf(base, "BertForSequenceClassification"), tmp_path / "ours"), x, kind)
    assert (theirs - ours).abs().max().item() <= 1e-4

    peft_model = _peft(_hf(base, "BertForSequenceClassification"), theirs_config(kind, "SEQ_CLS"))
    _randomize(peft_model.parameters(), seed=5)                             # the adapter and the head's copy
    peft_model.save_pretrained(tmp_path / "theirs")
    theirs = _bert_logits(peft_model.eval(), x, kind)
    model = ours_model()
    handle = lpeft.load(model, tmp_path / "theirs")
    assert handle.adapters["default"].saved                                  # peft's trained classifier
    with torch.no_grad():
        ours = model(x).logits
        with handle.disable():
            plain = model(x).logits
    assert (ours - plain).abs().max().item() > 1e-2
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("preset", ["llama-tiny", "gpt2-tiny", "bert-tiny"])
def test_hf_starts_real_tokens_after_the_prefix(preset, tmp_path):
    """With p past key/values, transformers puts the real tokens at positions p..p+T-1 (llmkit's
    choice for a prefix): explicit positions p.. give the default output, 0.. do not."""
    _export(preset, tmp_path / "base")
    cls = CAUSAL.get(preset, "BertForSequenceClassification")
    peft_model = _peft(_hf(tmp_path / "base", cls), theirs_config("prefix", "SEQ_CLS" if preset == "bert-tiny"
                                                                  else "CAUSAL_LM")).eval()
    _randomize(peft_model.parameters())
    model, x = peft_model.get_base_model(), _ids()
    T = x.shape[1]

    def run(**kw):
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return model(input_ids=x, past_key_values=peft_model.get_prompt(2), **kw).logits
    default = run()
    assert torch.allclose(default, run(position_ids=torch.arange(P, P + T).expand(2, T)), atol=1e-6)
    assert (default - run(position_ids=torch.arange(T).expand(2, T))).abs().max().item() > 1e-3


def test_bad_input_names_the_key_the_value_and_the_choices(tmp_path):
    _export("llama-tiny", tmp_path / "base")
    peft_model = _peft(_hf(tmp_path / "base", "LlamaForCausalLM"),
                       hf_peft.LoHaConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "loha")
    with pytest.raises(CheckpointError, match=r"'peft_type'.*IA3.*LORA.*PREFIX_TUNING.*PROMPT_TUNING.*'LOHA'"):
        lpeft.load(llmkit.load_hf(tmp_path / "base"), tmp_path / "loha")

    model = llmkit.load_hf(tmp_path / "base")
    lpeft.apply(model, "prompt_tuning", num_virtual_tokens=P).save(tmp_path / "prompt", format="peft")
    path = tmp_path / "prompt" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "num_transformer_submodules": 2}))
    with pytest.raises(CheckpointError, match=r"'num_transformer_submodules'.*'PROMPT_TUNING'.*expected 1.*found 2"):
        lpeft.load(llmkit.load_hf(tmp_path / "base"), tmp_path / "prompt")

    for preset, method in (("llama-tiny", "serial_adapter"), ("llama-tiny", "parallel_adapter"),
                           ("bert-tiny", "apt"), ("bert-tiny", "coda")):
        handle = lpeft.apply(llmkit.build_model(llmkit.get_preset(preset)), method)
        with pytest.raises(PeftError, match=rf"no '{method}' adapter.*format='llmkit'"):
            handle.save(tmp_path / method, format="peft")
    handle = lpeft.apply(llmkit.build_model(llmkit.get_preset("llama-tiny")), "p_tuning_v2", layers=[0])
    with pytest.raises(PeftError, match="every attention layer"):
        handle.save(tmp_path / "half", format="peft")
