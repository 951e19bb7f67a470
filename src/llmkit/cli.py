"""`llmkit <command> [recipe.yaml] [key=value ...]`: the command-line entry point.

Every command reads an optional YAML recipe, then `key=value` overrides (dotted for sections:
`train.lr=1e-3`), validates the result against the command's schema and runs it. `--help` on a
command lists its keys with their defaults.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .recipes import RecipeError, apply_overrides, build, load_yaml


@dataclass
class GenerateRecipe:
    model: str = "runs/demo/model"       # a Hugging Face or llmkit checkpoint folder (with its tokenizer)
    prompt: str = ""
    prompt_file: Optional[str] = None    # or the prompt from a text file (without its final newline)
    adapter: Optional[str] = None        # a saved PEFT adapter folder (llmkit or HF peft files) to attach
    max_new_tokens: int = 64
    do_sample: bool = True
    temperature: float = 0.8
    top_k: Optional[int] = 50
    top_p: Optional[float] = None
    repetition_penalty: float = 1.0
    seed: int = 0
    engine: bool = False                 # run the prompt on llmkit.infer.Engine, streaming the text as it comes
    input: Optional[str] = None          # batch mode: a JSONL file of {"prompt": ..., overrides} (on the engine)
    output: Optional[str] = None         # batch mode: the JSONL of completions (required with input)
    max_num_seqs: int = 32               # engine: sequences decoded together (continuous batching)
    speculative: Optional[str] = None    # engine: "ngram" (prompt lookup) or a draft model folder (same tokenizer)
    num_speculative_tokens: int = 4      # engine: draft tokens verified per step

    def __post_init__(self):
        if self.prompt and self.prompt_file:
            raise ValueError(f"prompt={self.prompt!r}, prompt_file={self.prompt_file!r}: expected one, not both")
        if self.prompt_file and not Path(self.prompt_file).is_file():
            raise ValueError(f"prompt_file={self.prompt_file!r}: file not found (expected a text file)")
        if self.adapter and not (Path(self.adapter) / "adapter_config.json").is_file():
            raise ValueError(f"adapter={self.adapter!r}: expected a folder with adapter_config.json "
                             "(what handle.save or peft's save_pretrained writes)")
        if self.speculative is not None and self.speculative != "ngram" and not Path(self.speculative).is_dir():
            raise ValueError(f"speculative={self.speculative!r}: expected 'ngram' or a draft model folder")
        if self.speculative is not None and not (self.engine or self.input is not None):
            raise ValueError(f"speculative={self.speculative!r}: speculative decoding runs on the engine; "
                             "expected engine=true or a batch input")
        if self.input is not None:
            if self.prompt or self.prompt_file:
                raise ValueError(f"input={self.input!r} with prompt / prompt_file: expected one of them (batch "
                                 "mode reads its prompts from input)")
            if not Path(self.input).is_file():
                raise ValueError(f"input={self.input!r}: file not found (expected a JSONL file of prompts)")
            if not self.output:
                raise ValueError(f"output={self.output!r}: expected the JSONL file to write the completions to "
                                 f"(required with input={self.input!r})")
            if Path(self.output).resolve() == Path(self.input).resolve():
                raise ValueError(f"output={self.output!r}: expected a file other than input")
        elif self.output is not None:
            raise ValueError(f"output={self.output!r} without input: expected input= too (batch mode), "
                             "or no output (the single prompt prints to stdout)")
        if isinstance(self.max_num_seqs, bool) or not isinstance(self.max_num_seqs, int) or self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs={self.max_num_seqs!r}: expected an integer >= 1")
        if self.uses_engine:
            if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                    or self.max_new_tokens < 1:
                raise ValueError(f"max_new_tokens={self.max_new_tokens!r}: expected an integer >= 1 "
                                 "(on the engine)")
            from .infer.params import SamplingParams   # raises naming the field, the value and what was expected
            SamplingParams(**self.engine_sampling(), seed=self.seed)
        else:
            from .generation import SamplingParams  # raises naming the field, the value and what was expected
            SamplingParams(**self.sampling())

    @property
    def uses_engine(self) -> bool:
        return self.engine or self.input is not None

    def sampling(self) -> dict:
        return {k: getattr(self, k) for k in ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p",
                                              "repetition_penalty")}

    def engine_sampling(self) -> dict:
        """The Hugging Face-style fields as llmkit.infer.SamplingParams keywords (OpenAI convention:
        do_sample=false or temperature 0 is temperature 0, greedy; top_p None is 1.0). No seed: the
        single prompt takes `seed`; batch mode seeds the engine with it, which draws one per request."""
        greedy = not self.do_sample or self.temperature == 0
        return {"max_tokens": self.max_new_tokens, "temperature": 0.0 if greedy else self.temperature,
                "top_k": self.top_k, "top_p": 1.0 if self.top_p is None else self.top_p,
                "repetition_penalty": self.repetition_penalty}


@dataclass
class ConvertRecipe:
    source: str = ""                     # checkpoint folder: Hugging Face (config.json) or llmkit
    target: str = ""                     # output folder
    format: str = "hf"                   # hf | llmkit

    def __post_init__(self):
        if self.format not in ("hf", "llmkit"):
            raise ValueError(f"format={self.format!r}: expected 'hf' or 'llmkit'")


@dataclass
class DemoRecipe:
    out: str = "runs/demo"
    steps: int = 1500
    seed: int = 0


def _pretrain_schema():
    from .pretrain import PretrainRecipe
    return PretrainRecipe


def _finetune_schema():
    from .finetune.recipe import FinetuneRecipe
    return FinetuneRecipe


def _align_schema():
    from .align.recipe import AlignRecipe
    return AlignRecipe


def _serve_schema():
    from .serve.job import ServeRecipe
    return ServeRecipe


def _bench_schema():
    from .benchmark.serving import BenchServeRecipe
    return BenchServeRecipe


def _export_schema():
    from .export.job import ExportGGUFRecipe
    return ExportGGUFRecipe


def _compress_schema():
    from .compress_job import CompressRecipe
    return CompressRecipe


def _eval_schema():
    from .finetune.eval_job import EvalRecipe
    return EvalRecipe


COMMANDS = {
    "pretrain": ("pretrain a model from a recipe (see recipes/)", _pretrain_schema),
    "finetune": ("fine-tune every parameter: instruction SFT or sequence / token classification",
                 _finetune_schema),
    "eval": ("score a checkpoint on data: accuracy, P/R/F1, confusion matrix, perplexity, exact match; "
             "metric=ppl|kld: the compression quality protocols on held-out text",
             _eval_schema),
    "tune": ("hyperparameter search over a finetune recipe's search: block", _finetune_schema),
    "align": ("alignment: method=rm | dpo | ipo | kto | orpo | ppo | cai (see recipes/align_*.yaml)",
              _align_schema),
    "generate": ("generate text from a checkpoint", lambda: GenerateRecipe),
    "serve": ("an OpenAI-compatible HTTP server over the inference engine (FastAPI + uvicorn)", _serve_schema),
    "bench": ("benchmarks: `llmkit bench serve url=...` load-tests an OpenAI-compatible server", _bench_schema),
    "convert": ("convert a checkpoint between Hugging Face and llmkit formats", lambda: ConvertRecipe),
    "compress": ("prune (magnitude / wanda / sparsegpt, N:M, structured) and quantize (int8 / int4 / int3 / nf4, "
                 "rtn / gptq) a model folder (see recipes/compress_*.yaml)", _compress_schema),
    "export": ("export a model for another runtime: `llmkit export gguf model=DIR out=FILE type=q8_0` (llama.cpp)",
               _export_schema),
    "demo": ("the end-to-end demo on synthetic data, on a CPU", lambda: DemoRecipe),
}


SUBJECTS = {"bench": ["serve"], "export": ["gguf"]}       # commands whose first word says what they act on


def describe_keys(schema, prefix: str = "") -> list[str]:
    lines = []
    for f in dataclasses.fields(schema):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if dataclasses.is_dataclass(default):
            lines += describe_keys(type(default), f"{prefix}{f.name}.")
        else:
            lines.append(f"  {prefix}{f.name}={default!r}")
    return lines


def read_words(words: list[str], schema: Optional[type] = None) -> dict:
    """[recipe.yaml] [key=value ...] -> the merged recipe mapping (overrides read by `schema`'s types)."""
    recipe_path = words[0] if words and words[0].endswith((".yaml", ".yml")) else None
    overrides = words[1:] if recipe_path else words
    return apply_overrides(load_yaml(recipe_path) if recipe_path else {}, overrides, schema)


# The project's own errors name the field or file, the value and what was expected: every command
# ends on one with that line on stderr and status 2. Anything else is a bug and keeps its traceback.
KNOWN_ERRORS = ("llmkit.recipes.RecipeError", "llmkit.config.ConfigError", "llmkit.data.errors.DataError",
                "llmkit.io.errors.CheckpointError", "llmkit.peft.errors.PeftError",
                "llmkit.train.trainer.TrainingDiverged", "llmkit.finetune.search.SearchError",
                "llmkit.benchmark.serving.BenchServeError", "llmkit.compress.errors.CompressError",
                "llmkit.export.errors.ExportError", "builtins.FileNotFoundError")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="llmkit", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, (summary, schema) in COMMANDS.items():
        sub = commands.add_parser(name, help=summary, description=summary,
                                  epilog="keys (key=value, defaults shown):\n" + "\n".join(describe_keys(schema())),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        if name in SUBJECTS:                       # `llmkit bench serve ...`: what the command acts on
            sub.add_argument("subject", choices=SUBJECTS[name])
        sub.add_argument("words", nargs="*", metavar="[recipe.yaml] [key=value ...]")
    args = parser.parse_args(argv)
    try:
        RUNNERS[args.command](read_words(args.words, COMMANDS[args.command][1]()))
    except Exception as exc:
        if not any(f"{c.__module__}.{c.__qualname__}" in KNOWN_ERRORS for c in type(exc).__mro__):
            raise
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"llmkit {args.command}: {message}", file=sys.stderr)
        return 2
    return 0


def run_pretrain_command(data: dict) -> None:
    from .pretrain import parse_recipe, run_pretrain
    run_pretrain(parse_recipe(data))


def run_finetune_command(data: dict) -> None:
    from .finetune import parse_finetune_recipe, run_finetune
    run_finetune(parse_finetune_recipe(data))


def run_eval_command(data: dict) -> None:
    from .finetune.eval_job import EvalRecipe, run_eval
    run_eval(build(EvalRecipe, data))


def run_tune_command(data: dict) -> None:
    from .finetune import run_tune
    result = run_tune(data)
    print(f"best: {result.metric}={result.best_value:.4f} with {result.best_params}\n"
          f"table: {result.table_path}\nbest recipe: {result.best_config_path}")


def run_align_command(data: dict) -> None:
    from .align.recipe import parse_align_recipe, run_align
    run_align(parse_align_recipe(data))


def run_generate_command(data: dict) -> None:
    from .generate_job import run_generate
    job = build(GenerateRecipe, data)
    if job.input is not None and data.get("engine") is False:
        raise RecipeError(f"engine=False with input={job.input!r}: batch mode runs on the engine; "
                          "expected engine=true or no engine key")
    run_generate(job)


def run_serve_command(data: dict) -> None:
    from .serve.job import ServeRecipe, run_serve
    run_serve(build(ServeRecipe, data))


def run_bench_command(data: dict) -> None:
    from .benchmark.serving import BenchServeRecipe, run_bench_serve
    run_bench_serve(build(BenchServeRecipe, data))


def run_compress_command(data: dict) -> None:
    from .compress_job import CompressRecipe, run_compress
    run_compress(build(CompressRecipe, data))


def run_export_command(data: dict) -> None:
    from .export.job import ExportGGUFRecipe, run_export_gguf
    run_export_gguf(build(ExportGGUFRecipe, data))


def run_convert_command(data: dict) -> None:
    from .io import load_any, save_hf, save_llmkit
    job = build(ConvertRecipe, data)
    if not job.source or not job.target:
        raise RecipeError(f"convert: source={job.source!r} target={job.target!r}: expected two folders")
    model = load_any(job.source)
    (save_hf if job.format == "hf" else save_llmkit)(model, job.target)
    print(f"wrote {job.target} ({job.format})")


def run_demo_command(data: dict) -> None:
    from .demo import run_demo
    job = build(DemoRecipe, data)
    run_demo(out_dir=job.out, steps=job.steps, seed=job.seed)


RUNNERS = {"pretrain": run_pretrain_command, "finetune": run_finetune_command, "eval": run_eval_command,
           "tune": run_tune_command, "align": run_align_command, "generate": run_generate_command,
           "serve": run_serve_command, "bench": run_bench_command, "convert": run_convert_command,
           "compress": run_compress_command, "export": run_export_command, "demo": run_demo_command}


if __name__ == "__main__":
    sys.exit(main())
