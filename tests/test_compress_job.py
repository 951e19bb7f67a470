"""`llmkit compress` and `llmkit eval metric=ppl|kld` end to end on a tiny saved Llama."""
import json
from pathlib import Path

import pytest
import torch

from llmkit.cli import main
from llmkit.config import ModelConfig
from llmkit.jobs.artifacts import load_artifacts, save_artifacts
from llmkit.model.models import CausalLM
from llmkit.tokenizer import train_char

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("compress_job")
    text = root / "text.txt"
    text.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    tokenizer = train_char(texts=[text.read_text(encoding="utf-8")])
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(family="llama", vocab_size=len(tokenizer), d_model=64, n_layers=2, n_heads=4,
                                 n_kv_heads=2, d_ff=128, max_seq_len=128))
    save_artifacts(root / "ref", model, tokenizer, job="pretrain")
    return root, text


def _words(root, text, out, *steps):
    return ["compress", f"model={root / 'ref'}", f"out={out}", f"calibration.text={text}", "calibration.samples=8",
            "calibration.seq_len=64", f"eval.text={text}", "eval.window=64", "progress=false", *steps]


def test_wanda_2_4_then_int8_saves_a_loadable_model_and_reports_both_protocols(saved):
    root, text = saved
    out = root / "wanda_int8"
    assert main(_words(root, text, out, "prune.method=wanda", "prune.n_m=2:4", "quantize.scheme=int8")) == 0
    report = json.loads((out / "compression_report.json").read_text())
    assert report["after"]["sparsity"] == pytest.approx(0.5, abs=1e-6)       # 2:4 of every block matrix
    assert report["after"]["model_bytes"] < report["before"]["model_bytes"]
    assert report["eval"]["ppl"]["protocol"].startswith("ppl:") and report["eval"]["kld"]["protocol"].startswith("kld:")
    assert report["eval"]["kld"]["kld_mean"] > 0
    loaded = load_artifacts(out)                                              # quantized layout, read back
    assert getattr(loaded.model, "quantization_config", None) is not None
    ids = torch.tensor([[3, 4, 5, 6]])
    assert loaded.model(ids).logits.shape == (1, 4, loaded.model.config.vocab_size)


def test_structured_ffn_writes_a_smaller_hf_model(saved):
    root, text = saved
    out = root / "ffn"
    assert main(_words(root, text, out, "structured.ffn_fraction=0.25")) == 0
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 96
    assert load_artifacts(out).model.config.d_ff == 96


def test_eval_metric_ppl_and_kld(saved, tmp_path):
    root, text = saved
    out = tmp_path / "ppl.json"
    assert main(["eval", "metric=ppl", f"model={root / 'ref'}", f"text={text}", "window=64", f"out={out}"]) == 0
    ppl = json.loads(out.read_text())
    assert ppl["protocol"].startswith("ppl:") and ppl["ppl"] > 1
    assert main(["eval", "metric=kld", f"model={root / 'ref'}", f"reference={root / 'ref'}", f"text={text}",
                 "window=64", f"out={out}"]) == 0
    kld = json.loads(out.read_text())
    assert kld["kld_mean"] == pytest.approx(0, abs=1e-9) and kld["same_top1"] == 1.0


@pytest.mark.parametrize("words, message", [
    (["metric=bleu"], "metric='bleu': expected one of ppl, kld"),
    (["metric=kld"], "reference=None"),
])
def test_eval_metric_errors(saved, capsys, words, message):
    root, text = saved
    assert main(["eval", f"model={root / 'ref'}", f"text={text}", *words]) == 2
    assert message in capsys.readouterr().err


def test_compress_errors_name_the_field(saved, capsys, tmp_path):
    root, text = saved
    assert main(["compress", f"model={root / 'ref'}", f"out={tmp_path / 'x'}"]) == 2
    assert "no step" in capsys.readouterr().err
    assert main(["compress", f"model={root / 'ref'}", f"out={tmp_path / 'x'}", "prune.method=wanda"]) == 2
    assert "calibration" in capsys.readouterr().err
    assert main(["compress", f"model={root / 'ref'}", f"out={tmp_path / 'x'}", "quantize.scheme=int5"]) == 2
    assert "int8, int4, int3, nf4" in capsys.readouterr().err
