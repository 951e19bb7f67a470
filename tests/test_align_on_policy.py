"""llmkit.align.on_policy: preference pairs whose rejected side is the model's own wrong answer."""
import pytest
import torch

import llmkit
from llmkit.align import complete, on_policy_pairs
from llmkit.tokenizer import train_char



pytestmark = pytest.mark.usefixtures("one_thread_module")     # tiny models: see conftest.torch_threads


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tokenizer = train_char(texts=["0123456789+=-"], special_tokens=("<pad>", "<|endoftext|>"), pad_token="<pad>")
    torch.manual_seed(0)
    config = llmkit.get_preset("llama-tiny", vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=2,
                               n_kv_heads=1, d_ff=64, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id)
    return llmkit.build_model(config), tokenizer


PROMPTS = ["1+2=", "12+7=", "30+4=", "5+55=", "8+9="]


def test_complete_batched_left_padding_equals_one_by_one(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prefix = [tok.eos_token_id]
    batched = complete(model, tok, PROMPTS, prefix_ids=prefix, max_new_tokens=6)
    alone = [complete(model, tok, [p], prefix_ids=prefix, max_new_tokens=6)[0] for p in PROMPTS]
    assert batched == alone and all(isinstance(a, str) for a in batched)


def test_rejected_is_the_greedy_answer_and_right_answers_give_no_pair(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prefix = [tok.eos_token_id]
    greedy = complete(model, tok, PROMPTS, prefix_ids=prefix, max_new_tokens=6)
    assert all(g.strip() for g in greedy)                  # the test needs non-empty answers from this model
    # rows 0-2: the model's greedy answer is declared right; rows 3-4: a different answer is right
    rows = [{"prompt": p, "answer": greedy[i] if i < 3 else "123"} for i, p in enumerate(PROMPTS)]
    pairs, stats = on_policy_pairs(model, tok, rows, prefix_ids=prefix, max_new_tokens=6)
    assert pairs == [{"prompt": PROMPTS[i], "chosen": "123", "rejected": greedy[i]} for i in (3, 4)]
    assert stats == {"prompts": 5, "greedy_correct": 0.6, "from_greedy": 2, "from_samples": 0, "empty": 0,
                     "pairs": 2, "no_negative": 3}
    # with samples, a right greedy answer still yields a pair when a sampled answer is wrong
    pairs, stats = on_policy_pairs(model, tok, rows, prefix_ids=prefix, max_new_tokens=6, samples=4,
                                   temperature=2.0, seed=1)
    assert stats["from_greedy"] == 2 and stats["from_samples"] >= 1
    assert all(p["rejected"] != p["chosen"] and p["rejected"].strip() for p in pairs)
    again, _ = on_policy_pairs(model, tok, rows, prefix_ids=prefix, max_new_tokens=6, samples=4, temperature=2.0,
                               seed=1)
    assert again == pairs                                  # seeded sampling


def test_bad_rows_name_the_row(model_and_tokenizer):
    model, tok = model_and_tokenizer
    with pytest.raises(ValueError, match="row 1.*expected"):
        on_policy_pairs(model, tok, [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2="}])
    with pytest.raises(ValueError, match="samples=-1"):
        on_policy_pairs(model, tok, [{"prompt": "1+1=", "answer": "2"}], samples=-1)


def test_demo_stage_runs_end_to_end_and_reports_every_figure(tmp_path):
    """A smoke run of the demo's stage (the figures themselves are checked in test_align_slow)."""
    from llmkit.align.demo_stage import run_demo_preference
    from llmkit.data.synthetic import CHARSET, SyntheticTasks
    from llmkit.jobs.artifacts import save_artifacts
    tok = train_char(texts=[CHARSET], special_tokens=("<pad>", "<|endoftext|>"), pad_token="<pad>")
    config = llmkit.get_preset("llama-tiny", vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2,
                               n_kv_heads=1, d_ff=64, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    save_artifacts(tmp_path / "sft", llmkit.build_model(config), tok, job="test")
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ eos_token }}{{ m['content'] }}="
                "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
    for method in ("dpo", "kto"):
        result = run_demo_preference(tmp_path / "sft", tmp_path / method, SyntheticTasks(seed=0, tasks=["add"]),
                                     method=method, chat_template=template, questions=8, steps=3, prompts=16,
                                     samples=1, batch_size=16, max_new_tokens=4)   # > held-out pairs
        assert result["pairs"]["prompts"] == 16 and result["pairs"]["pairs"] > 0
        assert set(result["rewards/margins"]) == {"train_first", "train_last", "held_out_before", "held_out_after"}
        assert 0 <= result["before"]["exact_match"] <= 1 and result["kl"] >= 0
        assert (tmp_path / method / "model" / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="method='rm'"):
        run_demo_preference(tmp_path / "sft", tmp_path / "rm", SyntheticTasks(seed=0), method="rm")
