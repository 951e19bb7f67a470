"""`llmkit serve adapters=name=DIR`: each LoRA adapter is a served model name of its own, batched with
the base model; its greedy text equals the merged adapter's on the engine."""
from __future__ import annotations

import openai

import llmkit.peft as lpeft
from llmkit.infer import Engine, SamplingParams
from llmkit.jobs.artifacts import load_artifacts
from serve_util import make_checkpoint, running_server
from test_infer_multi_lora import _perturb


def test_adapters_are_served_models(tmp_path):
    folder = make_checkpoint(tmp_path / "model")
    artifacts = load_artifacts(folder)
    handle = lpeft.apply(artifacts.model, "lora", r=4, alpha=8, targets=["q_proj", "v_proj"])
    _perturb(handle, 0)
    adapter_dir = handle.save(tmp_path / "sql")
    merged = handle.merge_and_unload().eval()
    tok = artifacts.tokenizer
    ids = tok.encode("the cat ", add_special_tokens=False)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    want_adapter = Engine(merged, tokenizer=tok).generate([ids], params, return_outputs=True)[0].outputs[0].text
    base = load_artifacts(folder).model
    want_base = Engine(base, tokenizer=tok).generate([ids], params, return_outputs=True)[0].outputs[0].text
    assert want_adapter != want_base                        # the adapter matters

    with running_server(folder, adapters=f"sql={adapter_dir}", served_model_name="tiny") as (url, state):
        api = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        models = {m.id: m for m in api.models.list().data}
        assert set(models) == {"tiny", "sql"} and models["sql"].parent == "tiny"
        kw = dict(prompt="the cat ", max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
        assert api.completions.create(model="sql", **kw).choices[0].text == want_adapter
        assert api.completions.create(model="tiny", **kw).choices[0].text == want_base
        try:
            api.completions.create(model="sq1", **kw)
        except openai.NotFoundError as exc:
            assert "'tiny', 'sql'" in exc.message
        else:
            raise AssertionError("an unknown model name was served")
