"""Interop with HF peft, both ways: an llmkit LoRA saved with format="peft" on a model exported by
llmkit.save_hf loads in peft.PeftModel.from_pretrained on the transformers model with the same
logits, and a LoRA made by peft loads into llmkit with the same logits (within 1e-4)."""
from __future__ import annotations

import warnings

import pytest
import torch

import llmkit
import llmkit.peft as lpeft

transformers = pytest.importorskip("transformers")
hf_peft = pytest.importorskip("peft")

CASES = {
    # preset: (llmkit targets, HF targets the same layers carry, transformers class)
    "llama-tiny": (["q_proj", "v_proj", "down_proj", "embed_tokens"],
                   ["q_proj", "v_proj", "down_proj", "embed_tokens"], "LlamaForCausalLM"),
    "bert-tiny": (["q_proj", "k_proj", "o_proj", "up_proj"],
                  ["query", "key", "attention.output.dense", "intermediate.dense"], "BertForMaskedLM"),
    # GPT-2 fuses q, k, v into c_attn: q and v only exercises the block-diagonal mapping.
    "gpt2-tiny": (["q_proj", "v_proj", "up_proj"], ["c_attn", "c_fc"], "GPT2LMHeadModel"),
}


def _export(preset: str, path):
    torch.manual_seed(0)
    model = llmkit.build_model(llmkit.get_preset(preset)).eval()
    llmkit.save_hf(model, path)
    return model


def _hf(path, cls):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(transformers, cls).from_pretrained(path, attn_implementation="eager").eval()


def _ids():
    return torch.randint(3, 512, (2, 10), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("preset", list(CASES))
@pytest.mark.parametrize("rslora", [False, True])
def test_llmkit_lora_loads_in_hf_peft(preset, rslora, tmp_path):
    ours_targets, _, cls = CASES[preset]
    model = _export(preset, tmp_path / "base")
    handle = lpeft.apply(model, "lora", r=4, alpha=8, rslora=rslora, targets=ours_targets)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for _, _, adapter in handle.adapter_modules():
            adapter.lora_A.copy_(torch.randn(adapter.lora_A.shape, generator=g) * 0.1)
            adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=g) * 0.1)
    x = _ids()
    ours = model(x).logits
    handle.save(tmp_path / "adapter", format="peft")
    hf_model = hf_peft.PeftModel.from_pretrained(_hf(tmp_path / "base", cls), tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = hf_model(input_ids=x).logits
        with hf_model.disable_adapter():
            base = hf_model(input_ids=x).logits
    assert (theirs - base).abs().max().item() > 1e-2                 # the adapter is really applied
    assert (theirs - ours).abs().max().item() <= 1e-4


@pytest.mark.parametrize("preset", list(CASES))
def test_hf_peft_lora_loads_into_llmkit(preset, tmp_path):
    _, hf_targets, cls = CASES[preset]
    _export(preset, tmp_path / "base")
    hf_model = _hf(tmp_path / "base", cls)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = hf_peft.get_peft_model(hf_model, hf_peft.LoraConfig(
            r=4, lora_alpha=16, target_modules=hf_targets, lora_dropout=0.0))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)   # non-zero B (and embedding A)
    peft_model.save_pretrained(tmp_path / "adapter")
    x = _ids()
    with torch.no_grad():
        theirs = peft_model.eval()(input_ids=x).logits
    model = llmkit.load_hf(tmp_path / "base")
    handle = lpeft.load(model, tmp_path / "adapter")
    assert handle.trainable_parameters().count > 0
    ours = model(x).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    with handle.disable():
        base = model(x).logits
    assert (ours - base).abs().max().item() > 1e-2
