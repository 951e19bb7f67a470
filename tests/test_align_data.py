"""llmkit.align data: row shapes, HH dialogues, chat messages, truncation, bad input, recipes."""
import warnings

import pytest

from llmkit.align import (AlignRecipe, PreferenceBatches, normalize_row, normalize_rows, read_rows, run_align,
                          split_dialogue, to_unpaired, tokenize_rows, truncate)
from llmkit.align.recipe import parse_align_recipe
from llmkit.data.errors import DataError
from llmkit.recipes import RecipeError, apply_overrides, load_yaml
from llmkit.tokenizer import train_char

from conftest import REPO, SHARED_DATA


pytestmark = pytest.mark.usefixtures("one_thread_module")     # tiny models: see conftest.torch_threads


@pytest.fixture(scope="module")
def tok():
    return train_char(texts=["abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ:?.!\n<>|_/0123456789"],
                      special_tokens=("<pad>", "<|endoftext|>"), pad_token="<pad>")


def test_hh_dialogue_splits_into_prompt_and_final_response():
    text = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and?\n\nAssistant: bye now"
    prompt, response = split_dialogue(text)
    assert prompt.endswith("\n\nHuman: and?\n\nAssistant:") and response == " bye now" and prompt + response == text
    row = normalize_row({"chosen": text, "rejected": text[:-7] + "go away"}, 0)
    assert row == {"prompt": prompt, "chosen": " bye now", "rejected": " go away"}
    with pytest.raises(DataError, match="row 3.chosen.*Assistant"):
        normalize_row({"chosen": "no turns", "rejected": "x"}, 3)


def test_real_hh_file_reads_and_every_row_normalises_or_names_its_row():
    rows = read_rows(SHARED_DATA / "hh_rlhf_harmless_test.jsonl.gz")
    assert len(rows) == 2312
    good, bad = 0, []
    for i, row in enumerate(rows):
        try:
            normalize_row(row, i)
            good += 1
        except DataError as exc:
            bad.append(str(exc))
    assert good == 2303 and all(msg.startswith("row ") for msg in bad)
    assert sum("empty completion" in m for m in bad) == 4 and sum("different prompts" in m for m in bad) == 5
    with pytest.warns(UserWarning, match="skipped 9 bad row"):
        assert len(normalize_rows(rows, bad_rows="skip")) == 2303
    with pytest.raises(DataError, match="row 86.chosen"):
        normalize_rows(rows)


def test_message_lists_use_the_chat_template(tok):
    row = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "yes"}],
           "rejected": [{"role": "assistant", "content": "no"}]}
    out = normalize_row(row, 0, tok)
    assert out["prompt"] == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert out["chosen"] == "yes<|im_end|>\n" and out["rejected"] == "no<|im_end|>\n"


def test_unpaired_shape_and_kto_split():
    rows = normalize_rows([{"prompt": "p", "chosen": "a", "rejected": "b"},
                           {"prompt": "q", "completion": "c", "label": False}])
    assert to_unpaired(rows) == [{"prompt": "p", "completion": "a", "label": True},
                                 {"prompt": "p", "completion": "b", "label": False},
                                 {"prompt": "q", "completion": "c", "label": False}]
    with pytest.raises(DataError, match="row 0: label='yes'"):
        normalize_row({"prompt": "p", "completion": "c", "label": "yes"}, 0)


def test_truncation_keeps_prompt_end_and_never_empties_a_completion():
    prompt, (c1, c2) = truncate(list(range(10)), [[100, 101, 102], [200]], max_length=8, max_prompt_length=4)
    assert prompt == [5, 6, 7, 8, 9] and c1 == [100, 101, 102] and c2 == [200]       # prompt cut from the start
    prompt, (c1,) = truncate(list(range(10)), [list(range(100, 120))], max_length=8, max_prompt_length=3)
    assert prompt == [7, 8, 9] and c1 == [100, 101, 102, 103, 104]                  # then the completion's end
    prompt, (c1,) = truncate(list(range(10)), [list(range(100, 120))], max_length=8, max_prompt_length=0)
    assert prompt == [] and len(c1) == 8
    with pytest.raises(DataError, match="max_prompt_length"):
        truncate([1], [[2]], max_length=4, max_prompt_length=4)


def test_empty_completion_is_an_error_naming_row_and_field():
    with pytest.raises(DataError, match=r"row 2.rejected='  ': empty completion"):
        normalize_row({"prompt": "p", "chosen": "a", "rejected": "  "}, 2)
    with pytest.raises(DataError, match=r"row 0.completion='': empty completion"):
        normalize_row({"prompt": "p", "completion": "", "label": True}, 0)


def test_identical_pairs_are_dropped_with_a_warning_or_raise(tok):
    rows = normalize_rows([{"prompt": "p", "chosen": "same", "rejected": "same"},
                           {"prompt": "p", "chosen": "abcdefgh", "rejected": "abcdefgx"},
                           {"prompt": "p", "chosen": "good", "rejected": "bad"}])
    with pytest.warns(UserWarning, match=r"2 pair\(s\) have chosen == rejected.*rows \[0, 1\]"):
        out = tokenize_rows(rows, tok, max_length=5, max_prompt_length=1)     # row 1 is identical once truncated
    assert len(out) == 1
    with pytest.raises(DataError, match="identical='error'"):
        tokenize_rows(rows, tok, max_length=5, max_prompt_length=1, identical="error")


def test_eos_is_appended_and_batches_are_seeded_and_resumable(tok):
    rows = normalize_rows([{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(6)])
    ex = tokenize_rows(rows, tok, max_length=16, prefix_ids=[tok.eos_token_id])
    assert ex[0]["chosen_ids"][-1] == tok.eos_token_id and ex[0]["prompt_ids"][0] == tok.eos_token_id
    a, b = PreferenceBatches(ex, 2, tok.pad_token_id, seed=1), PreferenceBatches(ex, 2, tok.pad_token_id, seed=1)
    first = [next(a)["input_ids"] for _ in range(4)]
    next(b)
    state = b.state_dict()
    c = PreferenceBatches(ex, 2, tok.pad_token_id, seed=1)
    c.load_state_dict(state)
    assert all((x == y).all() for x, y in zip(first[1:], [next(c)["input_ids"] for _ in range(3)]))
    batch = first[0]
    assert batch.shape[0] == 4                                                      # chosen rows then rejected


@pytest.mark.parametrize("method", ["rm", "dpo", "ipo", "kto", "orpo"])
def test_every_align_recipe_runs(method, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    data = apply_overrides(load_yaml(REPO / "recipes" / f"align_{method}.yaml"),
                           [f"train.out_dir={tmp_path}", "train.max_steps=2", "train.eval_every=0",
                            "train.eval_batches=1", "train.progress=false", "train.tensorboard=false",
                            "train.plot=false", "data.synthetic_examples=40", "data.max_length=48",
                            "data.max_prompt_length=40"])
    recipe = parse_align_recipe(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method == "rm":   # a slice of the real file keeps this fast
            import json
            rows = read_rows(SHARED_DATA / "hh_rlhf_harmless_test.jsonl.gz")[:60]
            (tmp_path / "hh.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
            recipe.data.source = str(tmp_path / "hh.jsonl")
        summary = run_align(recipe)
    assert summary["step"] == 2 and (tmp_path / "model").is_dir()
    assert "rewards/margins" in summary["metrics"]


def test_recipe_errors_name_the_field():
    with pytest.raises(RecipeError, match="method='grpo'"):
        parse_align_recipe({"method": "grpo"})
    with pytest.raises(RecipeError, match="reward / track are keys of method=ppo"):
        parse_align_recipe({"method": "dpo", "reward": {"text": "toy_reviews"}})
    with pytest.raises(RecipeError, match="precomputed"):
        parse_align_recipe({"method": "kto", "reference": "precomputed"})
    with pytest.raises(RecipeError, match="data.batch_size=0"):
        parse_align_recipe({"data": {"batch_size": 0}})
    assert isinstance(parse_align_recipe({}), AlignRecipe)
