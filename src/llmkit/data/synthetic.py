"""Synthetic tasks: seeded procedural questions with exact answers, the embedded default data set.

Nothing is downloaded: `SyntheticTasks(seed)` generates arithmetic, string copying/reversal,
key-value recall and facts about a small made-up world, as pretraining text, instruction pairs
(SFT) and chosen/rejected pairs (preference tuning), with a held-out test split that never leaks.

Compact formats (prompt -> answer; a pretraining line is prompt + answer, no separator), built for
char-level models (the characters are CHARSET):

    add      "12+7="                  -> "19"
    sub      "45-17="                 -> "28"        (never negative)
    mul      "7*8="                   -> "56"
    copy     "copy:abc="              -> "abc"
    reverse  "rev:abc="               -> "cba"
    kv       "kv:a=1,b=2,c=5;b?"      -> "2"         (distinct single-letter keys)
    fact     "fact:capital Zorbia?"   -> "Velt"      (attributes: capital, color, animal, ruler)

Instruction phrasing (`instruction_pairs`, and `preference_pairs` by default): "Compute 12+7." ->
"19", "Copy the string abc.", "Reverse the string abc.", "Given a=1, b=2, c=5, what is b?",
"What is the capital of Zorbia?". Rejected answers are plausible and always wrong: arithmetic off by
one (or by ten, or by an operand for mul), a string with one letter changed or two swapped, the
unreversed string, the value of another key, the same attribute of another country.

Difficulty 1 / 2 / 3: add and sub operands below 100 / 1,000 / 10,000; mul 1x1 / 2x1 / 2x2 digits;
strings of 3-5 / 4-8 / 6-12 letters; 3 / 5 / 8 key-value pairs (values 0-9 / 0-99 / 0-99).

The world: `world_size` countries with made-up names, each with a capital and ruler (made-up, unique)
and a color and animal (from fixed lists), fixed by the seed. `world_sentences()` states every fact
("The capital of Zorbia is Velt."); `pretraining_text(n, include_world=True)` appends them, so a model
can learn facts whose questions are held out.

Determinism and held-out split: example i of a call is drawn by its own generator seeded by (seed,
stream, split, i), so the same arguments always give the same examples and sample(n) is a prefix of
sample(n + k). Every prompt belongs to the test side when a hash of its text falls below
test_fraction, to the train side otherwise: split="train" (the default everywhere) only ever returns
train-side prompts and split="test" only test-side ones, so no test prompt can appear in any
training data generated with the same seed and tasks, whatever was asked before.
"""
from __future__ import annotations

import hashlib
import random
import string
from dataclasses import dataclass, field
from typing import Any, Sequence

from .errors import DataError

__all__ = ["SyntheticTasks", "Example", "exact_match", "SYNTHETIC_TASKS", "CHARSET"]

SYNTHETIC_TASKS = ("add", "sub", "mul", "copy", "reverse", "kv", "fact")
ATTRIBUTES = ("capital", "color", "animal", "ruler")
COLORS = ("red", "blue", "green", "gold", "white", "black", "purple", "orange", "grey", "silver")
ANIMALS = ("owl", "wolf", "bear", "fox", "hawk", "lion", "deer", "crab", "eel", "yak", "otter", "lynx")
CHARSET = "".join(sorted(set(string.ascii_letters + string.digits + " +-*=:,;?.")))
LEVELS = {1: {"add": 100, "mul": (10, 10), "len": (3, 5), "pairs": 3, "value": 10},
          2: {"add": 1000, "mul": (100, 10), "len": (4, 8), "pairs": 5, "value": 100},
          3: {"add": 10000, "mul": (100, 100), "len": (6, 12), "pairs": 8, "value": 100}}
SPLITS = ("train", "test", "all")


@dataclass(frozen=True)
class Example:
    """One question: `prompt` (compact format) and its exact `answer`; `instruction` is the same
    question in instruction phrasing and `wrong` a plausible wrong answer (never equal to answer)."""
    task: str
    prompt: str
    answer: str
    instruction: str = field(default="", repr=False, compare=False)
    wrong: str = field(default="", repr=False, compare=False)

    @property
    def text(self) -> str:
        """The pretraining line: prompt followed by answer."""
        return self.prompt + self.answer


def _normalize(prediction: Any) -> str:
    lines = str(prediction).strip().splitlines()
    return lines[0].strip() if lines else ""


def exact_match(predictions: Sequence[str], examples: Sequence[Example | str | dict]) -> float:
    """Fraction of predictions equal to the answer, comparing the first line of each stripped
    prediction (a model that goes on generating after the answer still scores). Examples may be
    Example objects, answer strings, or dicts with "response"/"chosen"/"answer"."""
    if len(predictions) != len(examples):
        raise DataError(f"exact_match: {len(predictions)} predictions for {len(examples)} examples")
    if not examples:
        raise DataError("exact_match: no examples to score")
    hits = 0
    for pred, ex in zip(predictions, examples):
        if isinstance(ex, Example):
            answer = ex.answer
        elif isinstance(ex, dict):
            key = next((k for k in ("answer", "response", "chosen") if k in ex), None)
            if key is None:
                raise DataError(f"exact_match: example dict has no 'answer'/'response'/'chosen' (keys {sorted(ex)})")
            answer = ex[key]
        else:
            answer = str(ex)
        hits += _normalize(pred) == answer.strip()
    return hits / len(examples)


def _other_number(rng: random.Random, value: int, deltas: Sequence[int]) -> str:
    return str(rng.choice([value + d for d in deltas if d and value + d >= 0]))


def _mutate(rng: random.Random, s: str) -> str:
    """s with one letter changed, or two different neighbours swapped: never equal to s."""
    swaps = [i for i in range(len(s) - 1) if s[i] != s[i + 1]]
    if swaps and rng.random() < 0.5:
        i = rng.choice(swaps)
        return s[:i] + s[i + 1] + s[i] + s[i + 2:]
    i = rng.randrange(len(s))
    return s[:i] + rng.choice([c for c in string.ascii_lowercase if c != s[i]]) + s[i + 1:]


class SyntheticTasks:
    """Seeded generator of the tasks in the module docstring."""
    exact_match = staticmethod(exact_match)

    def __init__(self, seed: int = 0, tasks: Sequence[str] = SYNTHETIC_TASKS, difficulty: int = 1, *,
                 test_fraction: float = 0.1, world_size: int = 24):
        if isinstance(tasks, str):
            tasks = (tasks,)
        unknown = [t for t in tasks if t not in SYNTHETIC_TASKS]
        if unknown or not tasks:
            raise DataError(f"tasks={list(tasks)!r}: expected a non-empty subset of {SYNTHETIC_TASKS}")
        if difficulty not in LEVELS or isinstance(difficulty, bool):
            raise DataError(f"difficulty={difficulty!r}: expected one of {sorted(LEVELS)}")
        if not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
            raise DataError(f"test_fraction={test_fraction!r}: expected a number in (0, 1)")
        if not isinstance(world_size, int) or not 2 <= world_size <= 200:
            raise DataError(f"world_size={world_size!r}: expected an int in [2, 200]")
        self.seed, self.tasks, self.difficulty = seed, tuple(dict.fromkeys(tasks)), difficulty
        self.test_fraction, self.level = float(test_fraction), LEVELS[difficulty]
        self.world = self._make_world(world_size)

    # ---- the made-up world ------------------------------------------------------------------
    def _make_world(self, size: int) -> dict[str, dict[str, str]]:
        rng = random.Random(f"llmkit-synthetic|{self.seed}|world")
        used: set[str] = set()

        def name(syllables: int, endings: Sequence[str]) -> str:
            while True:
                word = "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(syllables))
                word = (word + rng.choice(endings)).capitalize()
                if word not in used:
                    used.add(word)
                    return word

        world = {}
        for _ in range(size):
            country = name(rng.choice((2, 3)), ("ia", "land", "or", "an", "ia"))
            world[country] = {"capital": name(rng.choice((1, 2)), ("lt", "n", "r", "s", "")),
                              "color": rng.choice(COLORS), "animal": rng.choice(ANIMALS),
                              "ruler": name(2, ("", "n", "s"))}
        return world

    def world_sentences(self) -> list[str]:
        """Every fact of the world as a sentence: "The capital of Zorbia is Velt."."""
        return [f"The {attr} of {c} is {facts[attr]}." for c, facts in self.world.items() for attr in ATTRIBUTES]

    # ---- one example per task ---------------------------------------------------------------
    def _make(self, task: str, rng: random.Random) -> Example:
        lv = self.level
        if task in ("add", "sub"):
            a, b = rng.randrange(lv["add"]), rng.randrange(lv["add"])
            if task == "sub":
                a, b = max(a, b), min(a, b)
            op, value = ("+", a + b) if task == "add" else ("-", a - b)
            return Example(task, f"{a}{op}{b}=", str(value), f"Compute {a}{op}{b}.",
                           _other_number(rng, value, (1, -1, 10, -10)))
        if task == "mul":
            a, b = rng.randrange(lv["mul"][0]), rng.randrange(lv["mul"][1])
            value = a * b
            return Example(task, f"{a}*{b}=", str(value), f"Compute {a}*{b}.",
                           _other_number(rng, value, (1, -1, a, -a, b, -b)))
        if task in ("copy", "reverse"):
            s = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(*lv["len"])))
            if task == "copy":
                return Example(task, f"copy:{s}=", s, f"Copy the string {s}.", _mutate(rng, s))
            answer = s[::-1]
            wrong = s if s != answer and rng.random() < 0.5 else _mutate(rng, answer)
            return Example(task, f"rev:{s}=", answer, f"Reverse the string {s}.", wrong)
        if task == "kv":
            keys = rng.sample(string.ascii_lowercase, lv["pairs"])
            values = [str(rng.randrange(lv["value"])) for _ in keys]
            q = rng.randrange(len(keys))
            pairs = ",".join(f"{k}={v}" for k, v in zip(keys, values))
            others = [v for v in values if v != values[q]]
            wrong = rng.choice(others) if others else _other_number(rng, int(values[q]), (1, -1))
            return Example(task, f"kv:{pairs};{keys[q]}?", values[q],
                           f"Given {pairs.replace(',', ', ')}, what is {keys[q]}?", wrong)
        country, attr = rng.choice(list(self.world)), rng.choice(ATTRIBUTES)
        answer = self.world[country][attr]
        others = sorted({f[attr] for f in self.world.values()} - {answer})
        return Example("fact", f"fact:{attr} {country}?", answer, f"What is the {attr} of {country}?",
                       rng.choice(others))

    # ---- splits and streams -----------------------------------------------------------------
    def is_test_prompt(self, prompt: str) -> bool:
        """Whether a compact prompt belongs to the held-out side (a fixed hash of its text)."""
        h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
        return h / 2 ** 64 < self.test_fraction

    def _examples(self, n: int, split: str, start: int, stream: str) -> list[Example]:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise DataError(f"n={n!r}: expected an int >= 0")
        if split not in SPLITS:
            raise DataError(f"split={split!r}: expected one of {SPLITS}")
        out = []
        for i in range(start, start + n):
            rng = random.Random(f"llmkit-synthetic|{self.seed}|{stream}|{split}|{i}")
            task = rng.choice(self.tasks)
            for _ in range(2000):
                ex = self._make(task, rng)
                if split == "all" or self.is_test_prompt(ex.prompt) == (split == "test"):
                    break
            else:
                raise DataError(f"task {task!r} at difficulty {self.difficulty} has (almost) no {split}-side "
                                f"prompts for test_fraction={self.test_fraction}; raise world_size or difficulty")
            out.append(ex)
        return out

    def sample(self, n: int, split: str = "train", start: int = 0) -> list[Example]:
        """Examples start .. start+n-1 of the `split` side ("train", "test" or "all")."""
        return self._examples(n, split, start, "sample")

    def split(self, n_train: int, n_test: int) -> tuple[list[Example], list[Example]]:
        """(train, test) examples; no test prompt occurs among the train prompts."""
        return self.sample(n_train, "train"), self.sample(n_test, "test")

    def pretraining_text(self, n: int, split: str = "train", start: int = 0, *,
                         include_world: bool = False) -> list[str]:
        """n lines "prompt+answer" (e.g. "12+7=19"), plus every world sentence if include_world."""
        lines = [ex.text for ex in self._examples(n, split, start, "pretrain")]
        return lines + (self.world_sentences() if include_world and "fact" in self.tasks else [])

    def instruction_pairs(self, n: int, split: str = "train", start: int = 0, *,
                          style: str = "instruction") -> list[dict[str, str]]:
        """n {"prompt", "response"} pairs; style "instruction" ("Compute 12+7." -> "19") or "compact"."""
        return [{"prompt": self._prompt(ex, style), "response": ex.answer}
                for ex in self._examples(n, split, start, "instruct")]

    def preference_pairs(self, n: int, split: str = "train", start: int = 0, *,
                         style: str = "instruction") -> list[dict[str, str]]:
        """n {"prompt", "chosen", "rejected"} triples; rejected is a plausible wrong answer, never chosen."""
        return [{"prompt": self._prompt(ex, style), "chosen": ex.answer, "rejected": ex.wrong}
                for ex in self._examples(n, split, start, "prefer")]

    @staticmethod
    def _prompt(ex: Example, style: str) -> str:
        if style not in ("instruction", "compact"):
            raise DataError(f"style={style!r}: expected 'instruction' or 'compact'")
        return ex.instruction if style == "instruction" else ex.prompt
