"""llmkit's own checkpoint format holds configurations no HF layout can."""
from __future__ import annotations

import json

import pytest
import torch

import llmkit
from llmkit.io import CheckpointError, load_any, load_llmkit, save_llmkit


@pytest.mark.parametrize("preset, changes", [("gpt2-tiny", dict(norm_bias=False, positional="alibi")),
                                             ("bart-tiny", {}), ("bert-tiny", {})])
def test_roundtrip_is_exact(preset, changes, tmp_path):
    model = llmkit.build_model(llmkit.get_preset(preset, **changes)).eval()
    save_llmkit(model, tmp_path)
    again = load_any(tmp_path)
    assert type(again) is type(model) and again.config == model.config
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    if preset == "gpt2-tiny":  # tied weights come back tied, not as two copies
        assert again.lm_head.weight is again.transformer.embed_tokens.weight


def test_errors_name_file_and_key(tmp_path):
    save_llmkit(llmkit.build_model(llmkit.get_preset("llama-tiny")), tmp_path)
    meta = json.loads((tmp_path / "llmkit_config.json").read_text())
    meta["config"]["d_model"] = 96
    (tmp_path / "llmkit_config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"expected shape \[512, 96\], found \[512, 64\]"):
        load_llmkit(tmp_path)
    meta["config"]["n_layerz"] = 2
    (tmp_path / "llmkit_config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"llmkit_config.json: key 'config'.*n_layerz"):
        load_llmkit(tmp_path)
