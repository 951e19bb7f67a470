"""`llmkit pretrain`: recipes validate, a short run leaves a usable run folder, bad input is named."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llmkit
from llmkit.cli import main
from llmkit.pretrain import parse_recipe
from llmkit.recipes import load_yaml

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_validates(path):
    """Each recipe parses under its command's schema; the file name's prefix names the command."""
    from llmkit.align.recipe import parse_align_recipe
    from llmkit.finetune import parse_finetune_recipe
    parsers = {"align": parse_align_recipe, "finetune": parse_finetune_recipe, "sft": parse_finetune_recipe,
               "peft": parse_finetune_recipe, "tune": parse_finetune_recipe}
    if path.stem.startswith("generate_"):              # no training: the generate schema, files checked
        from llmkit.cli import GenerateRecipe
        from llmkit.recipes import build
        build(GenerateRecipe, load_yaml(path))
        return
    if path.stem.startswith("serve_"):                 # a server: its schema (the model loads when it starts)
        from llmkit.recipes import build
        from llmkit.serve.job import ServeRecipe
        build(ServeRecipe, load_yaml(path))
        return
    if path.stem.startswith("compress_"):              # a compression job on a saved model
        from llmkit.compress_job import CompressRecipe
        from llmkit.recipes import build
        recipe = build(CompressRecipe, load_yaml(path))
        assert recipe.prune or recipe.quantize or recipe.structured
        assert (REPO / recipe.calibration.text).is_file() if recipe.calibration.text else True
        return
    recipe = parsers.get(path.stem.split("_")[0], parse_recipe)(load_yaml(path))
    assert recipe.train.max_steps > 0


def test_short_pretrain_run(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["pretrain", str(REPO / "recipes" / "synthetic_tiny.yaml"), f"train.out_dir={out}",
                 "train.max_steps=12", "train.warmup_steps=2", "train.eval_every=6", "train.progress=false",
                 "data.synthetic_examples=2000", "samples=1", "sample_tokens=10"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "data:" in printed and "done: step 12" in printed
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if line["split"] == "val"] == [6, 12]
    assert (out / "loss.png").is_file() and (out / "recipe.yaml").is_file()
    model = llmkit.load_hf(out / "model")
    assert model.config.n_layers == 4 and llmkit.load_tokenizer(out / "model").vocab_size == model.config.vocab_size
    # the written recipe repeats the run
    assert parse_recipe(load_yaml(out / "recipe.yaml")).train.max_steps == 12


@pytest.mark.parametrize("words, message", [
    (["train.lrr=1"], "unknown recipe key 'train.lrr'; did you mean 'lr'?"),
    (["model.n_layer=3"], "unknown recipe key 'model.n_layer'; did you mean 'n_layers'?"),
    (["data.block_size=abc"], "data.block_size='abc': expected int"),
    (["model.n_heads=5"], "ModelConfig.n_heads=5"),
    (["objective=mlm2"], "objective='mlm2'"),
])
def test_bad_recipe_is_named(words, message, capsys, tmp_path):
    assert main(["pretrain", f"train.out_dir={tmp_path}", "data.synthetic_examples=200", *words]) == 2
    assert message in capsys.readouterr().err


def test_help_lists_keys():
    result = subprocess.run([sys.executable, "-m", "llmkit.cli", "pretrain", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "train.lr=" in result.stdout and "data.block_size=" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_pretrain_under_torchrun(strategy, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "llmkit.cli", "pretrain", str(REPO / "recipes" / "synthetic_tiny.yaml"), f"train.out_dir={out}",
           "train.max_steps=10", "train.warmup_steps=2", f"train.distributed={strategy}", "train.progress=false",
           "train.precision=fp32", "data.synthetic_examples=2000", "samples=1", "sample_tokens=5"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert llmkit.load_hf(out / "model").config.n_layers == 4


def test_separate_documents_feeds_doc_ids_and_positions(tmp_path):
    from llmkit.pretrain import prepare_pretraining
    recipe = parse_recipe({"model": {"preset": "llama-tiny"},
                           "data": {"source": "synthetic", "synthetic_examples": 300, "block_size": 48,
                                    "batch_size": 4, "separate_documents": True},
                           "train": {"out_dir": str(tmp_path), "max_steps": 1}})
    setup = prepare_pretraining(recipe)
    batch = next(setup.train_batches)
    eos = setup.tokenizer.eos_token_id
    row = batch["input_ids"][0]
    after_eos = (row[:-1] == eos).nonzero().flatten() + 1
    assert len(after_eos) > 0 and (batch["position_ids"][0, after_eos] == 0).all()
    assert (batch["doc_ids"][0, after_eos] == batch["doc_ids"][0, after_eos - 1] + 1).all()
    loss, metrics = setup.objective.loss(setup.model, batch)
    assert torch.isfinite(loss) and metrics["ppl"] > 1


def test_objective_options_and_mixes_from_a_recipe():
    from llmkit.objectives import WeightedMix, make_objective
    dae = make_objective({"dae": {"mask_ratio": 0.5, "noise": ["token_masking"]}})
    assert dae.name == "dae" and dae.mask_ratio == 0.5
    mix = make_objective({"mlm": 1.0, "nsp": {"weight": 0.5}})
    assert isinstance(mix, WeightedMix) and mix.task == "pretraining" and mix.weights == {"mlm": 1.0, "nsp": 0.5}
    with pytest.raises(ValueError, match="objective='mlmm'"):
        make_objective("mlmm")
    with pytest.raises(ValueError, match="objective dae: options \\['ratio'\\]"):
        make_objective({"dae": {"ratio": 0.3}})
    with pytest.raises(ValueError, match="different models"):
        make_objective({"clm": 1.0, "mlm": 1.0})


def test_sigterm_saves_a_checkpoint_and_the_run_resumes_there(tmp_path):
    """What a scheduler or `kill` sends: the run finishes its step, checkpoints, exits 0 like Ctrl-C."""
    import signal
    import time
    from llmkit.train.checkpoint import find_latest
    out = tmp_path / "run"
    words = ["pretrain", str(REPO / "recipes" / "synthetic_tiny.yaml"), f"train.out_dir={out}", "train.log_every=1",
             "train.progress=false", "train.tensorboard=false", "train.plot=false", "data.synthetic_examples=2000",
             "samples=0", "model.n_layers=1", "model.d_model=32", "model.d_ff=64"]
    proc = subprocess.Popen([sys.executable, "-m", "llmkit.cli", *words, "train.max_steps=100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics, deadline = out / "metrics.jsonl", time.time() + 120
    try:
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 3):
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            assert time.time() < deadline, "the run never logged 3 steps"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr.decode()[-2000:]
    assert "SIGTERM: saving a checkpoint" in stderr.decode() and "interrupted at step" in stderr.decode()
    step = int(find_latest(out).name.split("_")[-1])
    assert step >= 3
    assert main([*words, f"train.max_steps={step + 2}", "train.resume=true"]) == 0
    assert find_latest(out).name == f"step_{step + 2:07d}"
