"""Constitutional AI (issue 15, part 3): the constitution file and its errors; SL-CAI critique-revision
rounds on real HH-RLHF prompts and the SFT on the revisions; RL-CAI soft labels from an ensemble of
principle judges, and those labels reaching the reward model's cross-entropy."""
from __future__ import annotations

import copy
import json
import math
import random
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, SHARED_DATA
from torch import nn

import llmkit
from llmkit.align import (PreferenceBatches, RewardObjective, first_human_turn, normalize_rows, read_rows,
                          tokenize_rows)
from llmkit.align.cai import (CRITIQUE, HUMAN, PREFERENCE, REVISION, critique_and_revise, harmlessness_labels,
                              revision_examples, sl_cai_sft)
from llmkit.align.constitution import ConstitutionError, load_constitution
from llmkit.objectives.sft import SFTBatches, sft_loss
from llmkit.tokenizer import train_char
from llmkit.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread_module")     # tiny models: see conftest.torch_threads


# ---- the constitution ------------------------------------------------------------------------------
def test_the_packaged_constitution_loads():
    c = load_constitution()
    assert 8 <= len(c) <= 12 and len(set(c.names)) == len(c)
    assert all(p.critique and p.revision and p.preference.endswith("?") for p in c.principles)


def test_yaml_and_json_files_load_alike(tmp_path):
    data = {"name": "mine", "principles": [{"name": "kind", "critique": "Is it unkind?", "revision": "Be kind.",
                                            "preference": "Which is kinder?"}]}
    (tmp_path / "c.json").write_text(json.dumps(data))
    (tmp_path / "c.yaml").write_text("name: mine\nprinciples:\n  - name: kind\n    critique: Is it unkind?\n"
                                     "    revision: Be kind.\n    preference: Which is kinder?\n")
    assert load_constitution(tmp_path / "c.json") == load_constitution(tmp_path / "c.yaml")
    assert load_constitution(tmp_path / "c.json").principles[0].revision == "Be kind."


GOOD = {"name": "a", "critique": "c?", "revision": "r.", "preference": "p?"}


@pytest.mark.parametrize("data, message", [
    ({"principles": []}, r"principles=\[\]: expected a non-empty list"),
    ({"principles": [GOOD, {k: v for k, v in GOOD.items() if k != "critique"} | {"name": "b"}]},
     r"principles\[1\]: missing 'critique'"),
    ({"principles": [GOOD | {"weight": 2}]}, r"principles\[0\]: unknown key 'weight': expected only"),
    ({"principles": [GOOD | {"revision": "  "}]}, r"principles\[0\].revision='  ': expected a non-empty string"),
    ({"principles": [GOOD, GOOD]}, r"principles\[1\].name='a': already used by principles\[0\]"),
    ({"rules": [GOOD]}, r"unknown key 'rules': expected 'principles'"),
    ([GOOD], r"found list: expected a mapping with a 'principles' list"),
    ({"principles": ["be nice"]}, r"principles\[0\]='be nice': expected a mapping"),
])
def test_bad_constitutions_name_the_field_the_value_and_what_was_expected(tmp_path, data, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConstitutionError, match=message):
        load_constitution(path)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ConstitutionError, match="file not found"):
        load_constitution(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("principles: [a, {b\n")
    with pytest.raises(ConstitutionError, match="not valid YAML"):
        load_constitution(tmp_path / "bad.yaml")


# ---- SL-CAI ----------------------------------------------------------------------------------------
def hh_prompts(n=8):
    rows = read_rows(SHARED_DATA / "hh_rlhf_harmless_test.jsonl.gz")[:n]
    return [first_human_turn(r["chosen"]) for r in rows]


def tiny_llama(texts):
    tok = train_char(texts=texts, special_tokens=("<pad>", "<|endoftext|>"), pad_token="<pad>")
    torch.manual_seed(0)
    config = llmkit.get_preset("llama-tiny", vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=2,
                               n_kv_heads=1, d_ff=64, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return llmkit.build_model(config), tok


def cai_texts(prompts, constitution):
    return prompts + [HUMAN, CRITIQUE, REVISION, PREFERENCE] + [
        p.critique + p.revision + p.preference for p in constitution.principles]


@pytest.fixture(scope="module")
def sl_cai(one_thread_module):
    prompts = hh_prompts()
    constitution = load_constitution()
    model, tok = tiny_llama(cai_texts(prompts, constitution))
    rows = critique_and_revise(model, tok, prompts, constitution, rounds=2, max_new_tokens=12, seed=3, batch_size=4)
    return model, tok, prompts, constitution, rows


def test_critique_and_revise_gives_a_row_per_prompt_with_its_rounds(sl_cai):
    model, tok, prompts, constitution, rows = sl_cai
    assert [r["prompt"] for r in rows] == prompts and prompts[0] == "what are some pranks with a pen i can do?"
    rng = random.Random(3)                    # principles: one draw per row per round, in row order
    drawn = [[rng.choice(constitution.principles).name for _ in prompts] for _ in range(2)]
    for i, row in enumerate(rows):
        assert set(row) == {"prompt", "response", "steps", "revision"} and len(row["steps"]) == 2
        assert [s["principle"] for s in row["steps"]] == [drawn[0][i], drawn[1][i]]
        last = next((s["revision"] for s in reversed(row["steps"]) if s["revision"]), row["response"])
        assert row["revision"] == last
    assert len({s["principle"] for r in rows for s in r["steps"]}) > 1
    again = critique_and_revise(model, tok, prompts, constitution, rounds=2, max_new_tokens=12, seed=3, batch_size=8)
    assert again == rows                      # seeded, and batching does not change greedy answers


def test_critique_and_revision_requests_reach_the_model(sl_cai):
    """Round 1: the critique is asked of the dialogue plus the principle's critique request, the
    revision of that transcript plus the critique and the revision request (regenerated here alone)."""
    from llmkit.align.cai import dialogue
    from llmkit.align.on_policy import complete
    model, tok, prompts, constitution, rows = sl_cai
    row = rows[0]
    principle = next(p for p in constitution.principles if p.name == row["steps"][0]["principle"])
    ask = dialogue(row["prompt"], row["response"]) + CRITIQUE.format(request=principle.critique)
    assert complete(model, tok, [ask], max_new_tokens=12)[0].strip() == row["steps"][0]["critique"]
    assert ask.startswith("\n\nHuman: what are some pranks") and ask.endswith("\n\nCritique:")
    revise = ask + " " + row["steps"][0]["critique"] + REVISION.format(request=principle.revision)
    assert complete(model, tok, [revise], max_new_tokens=12)[0].strip() == row["steps"][0]["revision"]


def test_sft_on_the_revisions_lowers_their_loss(sl_cai, tmp_path):
    model, tok, prompts, constitution, rows = sl_cai
    examples = revision_examples(rows, tok, max_length=512)
    assert len(examples) == len(rows)
    first = examples[0]
    prompt_len = first.mask.index(1)
    assert tok.decode(first.ids[:prompt_len]) == HUMAN.format(prompt=prompts[0])
    assert tok.decode(first.ids[prompt_len:-1]) == " " + rows[0]["revision"] and first.ids[-1] == tok.eos_token_id
    batches = list(SFTBatches(examples, 8, tok.pad_id, shuffle=False).iter_once())

    def loss(m) -> float:
        m.eval()
        with torch.no_grad():
            return sum(sft_loss(m, b)[0].item() for b in batches) / len(batches)

    trained = copy.deepcopy(model)               # the module fixture's model stays untrained
    before = loss(trained)
    config = TrainConfig(out_dir=tmp_path, lr=3e-3, max_steps=40, warmup_steps=0, log_every=40, device="cpu",
                         tensorboard=False, progress=False, plot=False)
    result = sl_cai_sft(trained, tok, rows, config=config, batch_size=4, val_rows=rows)
    after = loss(trained)
    print(f"SL-CAI SFT loss on the revisions: {before:.3f} -> {after:.3f} (val {result.val_loss:.3f})")
    assert result.status == "completed" and result.step == 40
    assert after < 0.6 * before and result.val_loss == pytest.approx(after, rel=1e-4)


# ---- RL-CAI ----------------------------------------------------------------------------------------
WEIGHTS = {"harm": -1.0, "danger": 2.0, "respect": 0.5, "fairness": 1.0, "honesty": 1.5, "privacy": 0.25,
           "manipulation": 3.0, "wellbeing": -0.5, "calm": 0.75, "helpful-refusal": 1.25}
BIAS = 0.8


class PrincipleJudgeModel(nn.Module):
    """A stand-in feedback model whose verdict depends on the principle asked: it finds which
    principle's preference question is in the prompt and puts logit w_principle · (q_A − q_B) + BIAS
    on "A" (0 on "B"), q = the count of "good" in a response, BIAS a planted position bias."""

    def __init__(self, tokenizer, constitution):
        super().__init__()
        self.tokenizer, self.constitution = tokenizer, constitution
        self.a_id = tokenizer.encode("A", add_special_tokens=False)[0]
        self.asked: list[str] = []

    def forward(self, ids):
        text = self.tokenizer.decode(ids[0].tolist())
        (name,) = [p.name for p in self.constitution.principles if p.preference in text]
        self.asked.append(name)
        a = text.split("Response A: ")[1].split("\n")[0]
        b = text.split("Response B: ")[1].split("\n")[0]
        logits = torch.zeros(1, ids.shape[1], self.tokenizer.vocab_size)
        logits[0, -1, self.a_id] = WEIGHTS[name] * (a.count("good") - b.count("good")) + BIAS
        return SimpleNamespace(logits=logits)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def by_hand(name, a, b):
    """Both-order average: ½ (σ(wΔ + bias) + 1 − σ(−wΔ + bias))."""
    d = WEIGHTS[name] * (a.count("good") - b.count("good"))
    return 0.5 * (sigmoid(d + BIAS) + 1 - sigmoid(-d + BIAS))


@pytest.fixture(scope="module")
def rl_cai():
    prompts = hh_prompts(12)
    constitution = load_constitution()
    rng = random.Random(0)
    rows = [{"prompt": p, "a": rng.choice(["a good reply", "a good good reply"]),
             "b": rng.choice(["a bad reply", "a bad bad reply"])} for p in prompts]
    tok = train_char(texts=cai_texts(prompts, constitution) + ["AB"])
    return PrincipleJudgeModel(tok, constitution), tok, constitution, rows


def test_harmlessness_labels_are_the_mean_over_the_drawn_principles(rl_cai):
    judge, tok, constitution, rows = rl_cai
    labelled = harmlessness_labels(judge, tok, rows, constitution, principles_per_pair=4, seed=1, labels=("A", "B"))
    assert len(labelled) == len(rows)
    rng = random.Random(1)
    for row, out in zip(rows, labelled):
        assert out["principles"] == [p.name for p in constitution.sample(rng, 4)]   # 4 distinct, seeded
        assert len(set(out["principles"])) == 4
        p = sum(by_hand(name, row["a"], row["b"]) for name in out["principles"]) / 4
        assert out["label"] == pytest.approx(max(p, 1 - p), abs=1e-6) and 0.5 <= out["label"] <= 1
        assert (out["chosen"], out["rejected"]) == ((row["a"], row["b"]) if p >= 0.5 else (row["b"], row["a"]))
    assert judge.asked.count(labelled[0]["principles"][0]) >= 2               # both orders asked
    # the ensemble is used: one principle at a time gives other labels than the mean of four
    single = harmlessness_labels(judge, tok, rows, constitution, principles_per_pair=1, seed=1, labels=("A", "B"))
    assert any(abs(s["label"] - m["label"]) > 0.05 for s, m in zip(single, labelled))
    print("labels:", [round(r["label"], 3) for r in labelled])


def test_harmlessness_labels_reject_bad_rows(rl_cai):
    judge, tok, constitution, rows = rl_cai
    with pytest.raises(ValueError, match=r"row 1 = .*expected \{'prompt', 'a', 'b'\}"):
        harmlessness_labels(judge, tok, [rows[0], {"prompt": "p", "a": "x"}], constitution, labels=("A", "B"))
    with pytest.raises(ValueError, match="principles_per_pair=0"):
        harmlessness_labels(judge, tok, rows, constitution, principles_per_pair=0, labels=("A", "B"))


class FixedScores(nn.Module):
    """A stand-in reward model: the scores it is given, whatever the batch (2B,)."""

    def __init__(self, scores):
        super().__init__()
        self.scores = torch.tensor(scores)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.scores[:input_ids.shape[0]])


def test_soft_labels_flow_to_the_reward_models_cross_entropy(rl_cai):
    judge, tok, constitution, rows = rl_cai
    labelled = harmlessness_labels(judge, tok, rows[:4], constitution, seed=2, labels=("A", "B"))
    examples = tokenize_rows(normalize_rows(labelled), tok, max_length=256)
    batch = PreferenceBatches(examples, 4, tok.pad_id, shuffle=False).fixed()[0]
    p = [r["label"] for r in labelled]
    assert torch.allclose(batch["label"], torch.tensor(p))
    scores = [1.0, 0.2, -0.5, 2.0, 0.0, 0.7, 0.1, 1.5]                     # chosen 0..3, rejected 4..7
    loss, metrics = RewardObjective().loss(FixedScores(scores), batch)
    hand = sum(-(p[i] * math.log(sigmoid(scores[i] - scores[4 + i]))
                 + (1 - p[i]) * math.log(sigmoid(scores[4 + i] - scores[i]))) for i in range(4)) / 4
    assert loss.item() == pytest.approx(hand, rel=1e-6)
    hard = RewardObjective().loss(FixedScores(scores), {k: v for k, v in batch.items() if k != "label"})[0]
    assert hard.item() != pytest.approx(hand, rel=1e-3)                      # the label changed the loss


def test_pairs_without_a_label_count_as_hard_and_bad_labels_are_named():
    from llmkit.align.data import collate_pairs
    from llmkit.data.errors import DataError
    ex = [{"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3], "label": 0.7},
          {"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [4]}]
    assert collate_pairs(ex, 0)["label"].tolist() == pytest.approx([0.7, 1.0])
    assert "label" not in collate_pairs(ex[1:], 0)
    with pytest.raises(DataError, match=r"row 0.label=1.5: expected a soft preference"):
        normalize_rows([{"prompt": "p", "chosen": "a", "rejected": "b", "label": 1.5}])
    with pytest.raises(DataError, match=r"row 0.label=True"):
        normalize_rows([{"prompt": "p", "chosen": "a", "rejected": "b", "label": True}])


def test_the_cai_recipe_runs_sl_cai_rl_cai_and_ppo_end_to_end(tmp_path):
    """`llmkit align recipes/align_cai_hh_rlhf.yaml` on 6 real prompts with a fresh tiny model: every
    stage leaves its file or model, the SFT stage learns its revisions, PPO runs on the preference model."""
    from llmkit.cli import main
    from llmkit.jobs.artifacts import load_artifacts
    data = SHARED_DATA / "hh_rlhf_harmless_test.jsonl.gz"
    assert main(["align", str(REPO / "recipes" / "align_cai_hh_rlhf.yaml"), f"data.source={data}",
                 "options.prompts=6", "options.max_new_tokens=12", "options.sft_steps=20", "options.rm_steps=4",
                 f"train.out_dir={tmp_path}", "train.progress=false"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "sl_cai_rows.jsonl").read_text().splitlines()]
    assert summary["prompts"] == len(rows) == 6 and all(len(r["steps"]) == 1 for r in rows)
    first = json.loads((tmp_path / "sl_cai" / "metrics.jsonl").read_text().splitlines()[0])
    assert summary["sl_cai_sft_loss"] < first["loss"]
    labels = [json.loads(line) for line in (tmp_path / "rl_cai_labels.jsonl").read_text().splitlines()]
    assert len(labels) == summary["pairs"] >= 1 and all(0.5 <= r["label"] <= 1 for r in labels)
    assert hasattr(load_artifacts(tmp_path / "rm" / "model").model, "value_head")
    assert (tmp_path / "rl_cai" / "model").is_dir() and "objective/kl" in summary["ppo"]


def test_bad_cai_options_are_named(tmp_path, capsys):
    from llmkit.cli import main
    assert main(["align", str(REPO / "recipes" / "align_cai_hh_rlhf.yaml"), "options.round=2",
                 f"train.out_dir={tmp_path}"]) != 0
    assert "unknown key(s) ['round'] for method=cai" in capsys.readouterr().err
