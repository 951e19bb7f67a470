"""llmkit.data.synthetic: exact answers, determinism, held-out split, preference pairs, exact match."""
from __future__ import annotations

import re

import pytest

from llmkit.data import DataError
from llmkit.data.synthetic import CHARSET, SYNTHETIC_TASKS, Example, SyntheticTasks, exact_match


def _solve(ex: Example, world: dict) -> str:
    """Recompute the answer from the prompt text alone (plus the world for facts)."""
    p = ex.prompt
    if m := re.fullmatch(r"(\d+)([+*-])(\d+)=", p):
        a, op, b = int(m[1]), m[2], int(m[3])
        return str(a + b if op == "+" else a - b if op == "-" else a * b)
    if m := re.fullmatch(r"copy:([a-z]+)=", p):
        return m[1]
    if m := re.fullmatch(r"rev:([a-z]+)=", p):
        return m[1][::-1]
    if m := re.fullmatch(r"kv:((?:[a-z]=\d+,)*[a-z]=\d+);([a-z])\?", p):
        pairs = dict(kv.split("=") for kv in m[1].split(","))
        assert len(pairs) == m[1].count(",") + 1  # keys are distinct
        return pairs[m[2]]
    if m := re.fullmatch(r"fact:(\w+) (\w+)\?", p):
        return world[m[2]][m[1]]
    raise AssertionError(f"unrecognised prompt {p!r}")


def _prompt_of(line: str) -> str:
    """A pretraining line is prompt + answer; prompts end at "?" (kv, fact) or the first "=" (others)."""
    return line[:line.index("?") + 1] if "?" in line else line[:line.index("=") + 1]


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_answers_are_correct(difficulty):
    gen = SyntheticTasks(seed=difficulty, difficulty=difficulty)
    examples = gen.sample(700, split="all")
    assert {ex.task for ex in examples} == set(SYNTHETIC_TASKS)
    for ex in examples:
        assert _solve(ex, gen.world) == ex.answer, ex
        assert set(ex.text + ex.instruction) <= set(CHARSET), ex
    sums = [ex for ex in examples if ex.task in ("add", "sub")]
    assert max(int(n) for ex in sums for n in re.findall(r"\d+", ex.prompt)) >= 10 ** difficulty
    assert all(int(ex.answer) >= 0 for ex in sums)


def test_world_is_consistent_and_stated():
    a, b = SyntheticTasks(seed=5), SyntheticTasks(seed=5)
    assert a.world == b.world and a.world != SyntheticTasks(seed=6).world
    sentences = a.world_sentences()
    assert len(sentences) == 4 * len(a.world)
    country, facts = next(iter(a.world.items()))
    assert f"The capital of {country} is {facts['capital']}." in sentences
    capitals = [f["capital"] for f in a.world.values()]
    assert len(set(capitals)) == len(capitals) and not set(capitals) & set(a.world)
    lines = a.pretraining_text(10, include_world=True)
    assert len(lines) == 10 + len(sentences) and lines[10:] == sentences


def test_determinism_and_prefixes():
    a, b = SyntheticTasks(seed=0), SyntheticTasks(seed=0)
    assert a.sample(50) == b.sample(50) and a.sample(20) == a.sample(50)[:20]
    assert a.sample(10, start=20) == a.sample(30)[20:]
    assert a.pretraining_text(30) == b.pretraining_text(30)
    assert a.instruction_pairs(30) == b.instruction_pairs(30)
    assert a.preference_pairs(30) == b.preference_pairs(30)
    assert a.sample(50) != SyntheticTasks(seed=1).sample(50)
    only = SyntheticTasks(seed=0, tasks=("add",)).pretraining_text(5)
    assert all(re.fullmatch(r"\d+\+\d+=\d+", line) for line in only)


def test_held_out_prompts_never_in_training_data():
    gen = SyntheticTasks(seed=3)
    train, test = gen.split(4000, 400)
    test_prompts = {ex.prompt for ex in test}
    assert len(test_prompts) > 250 and {ex.task for ex in test} == set(SYNTHETIC_TASKS)
    assert not test_prompts & {ex.prompt for ex in train}
    # nothing generated for training, by any method or call, contains a test question
    more = SyntheticTasks(seed=3).pretraining_text(4000, start=10_000)
    assert not test_prompts & {_prompt_of(line) for line in more}
    test_instructions = {ex.instruction for ex in test}
    assert not test_instructions & {p["prompt"] for p in gen.instruction_pairs(3000)}
    assert not test_instructions & {p["prompt"] for p in gen.preference_pairs(3000)}
    assert all(gen.is_test_prompt(p) for p in test_prompts)
    # the facts behind held-out fact questions are still learnable from the world sentences
    held_facts = [ex for ex in test if ex.task == "fact"]
    assert held_facts and all(any(ex.answer in s for s in gen.world_sentences()) for ex in held_facts)


def test_instruction_and_preference_pairs():
    gen = SyntheticTasks(seed=2)
    pairs = gen.instruction_pairs(200)
    assert set(pairs[0]) == {"prompt", "response"}
    for pair in pairs:
        assert re.fullmatch(r"(Compute \d+[+*-]\d+|Copy the string [a-z]+|Reverse the string [a-z]+|"
                            r"Given ([a-z]=\d+, )*[a-z]=\d+, what is [a-z]\?|What is the \w+ of \w+\?)\.?",
                            pair["prompt"]), pair
    assert gen.instruction_pairs(3, style="compact")[0]["prompt"].endswith(("=", "?"))
    prefs = gen.preference_pairs(1500)
    for p in prefs:
        assert set(p) == {"prompt", "chosen", "rejected"} and p["rejected"] != p["chosen"] and p["rejected"]
        if m := re.fullmatch(r"Compute (\d+)([+-])(\d+)\.", p["prompt"]):
            assert abs(int(p["rejected"]) - int(p["chosen"])) in (1, 10)  # off by one or by ten
        if m := re.fullmatch(r"Reverse the string ([a-z]+)\.", p["prompt"]):
            assert sorted(p["rejected"]) == sorted(m[1]) or sum(x != y for x, y in zip(p["rejected"], p["chosen"])) == 1
        if m := re.fullmatch(r"Given (.*), what is ([a-z])\?", p["prompt"]):
            assert p["rejected"] in dict(kv.split("=") for kv in m[1].split(", ")).values() or p["rejected"].isdigit()
    with pytest.raises(DataError, match="style='chat'"):
        gen.instruction_pairs(2, style="chat")


def test_exact_match():
    gen = SyntheticTasks(seed=0)
    examples = gen.sample(4, split="test")
    preds = [ex.answer for ex in examples]
    assert exact_match(preds, examples) == 1.0
    preds[0] = " " + preds[0] + "\n12+3=15"  # whitespace and a continuation after the answer still match
    preds[1] = examples[1].wrong
    assert exact_match(preds, examples) == 0.75 == gen.exact_match(preds, [ex.answer for ex in examples])
    assert exact_match(["5"], [{"response": "5"}]) == 1.0
    with pytest.raises(DataError, match="3 predictions for 4 examples"):
        exact_match(preds[:3], examples)


def test_errors():
    with pytest.raises(DataError, match="tasks=\\['add', 'divide'\\]"):
        SyntheticTasks(tasks=("add", "divide"))
    with pytest.raises(DataError, match="difficulty=7"):
        SyntheticTasks(difficulty=7)
    with pytest.raises(DataError, match="split='dev'"):
        SyntheticTasks().sample(3, split="dev")
