"""What every pretraining objective provides, and the weighted mix of several.

An objective is three things (DESIGN.md: "loss, metrics = objective(model, batch)"):

- a **collator** that turns raw examples (token windows, sentence pairs, documents, images with
  captions) into a batch dict of tensors: the self-supervised labels are built here, from the data;
- a **loss** `loss(model, batch) -> (loss, metrics)`, the only thing the Trainer calls;
- the **head** (model task) it needs: `task` names the `llmkit.model.TASKS` entry (or a model the
  objective module builds itself, e.g. the multimodal encoder).

`Objective.make_data(...)` builds the objective's train batches (an iterator with
`state_dict()` / `load_state_dict()`, sharded by rank) and its validation batches from a text
source and a tokenizer, so `llmkit pretrain` can run any objective from a recipe.

`WeightedMix` combines objectives that share one model: each step draws one batch per objective and
minimises L = Σ_i w_i L_i (BERT's pretraining is MLM + NSP with w = 1, 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

import torch

from ..data.batches import MixedBatches


@dataclass
class ObjectiveData:
    train: Any                                  # iterator of batches with state_dict/load_state_dict
    val: Optional[Callable[[], Any]] = None     # returns a fresh iterable of validation batches


class Objective(Protocol):
    """Also optional: `special_tokens` ({role: token}, e.g. {"mask": "[MASK]"}) the tokenizer must
    have; `tasks` (all the model tasks it can train, for mixes); `build_model(config)` when the
    objective needs a model of its own; `evaluate(model, batches) -> metrics` for its own metric."""
    name: str
    task: str                                   # the model head this objective trains

    def make_data(self, source: Any, tokenizer: Any, data: Any, *, rank: int = 0,
                  world_size: int = 1, seed: int = 0, eval_batches: int = 20) -> ObjectiveData: ...

    def loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]: ...


class WeightedMix:
    """L = Σ_i w_i L_i over objectives that train one shared model (all must agree on `task`)."""

    def __init__(self, objectives: dict[str, Objective], weights: dict[str, float]):
        # The one model task every objective can train (e.g. MLM trains "masked_lm" or "pretraining",
        # NSP only "pretraining": together they train "pretraining").
        shared = set.intersection(*(set(getattr(o, "tasks", (o.task,))) for o in objectives.values()))
        if not shared:
            raise ValueError(f"objective mix {sorted(objectives)}: the objectives need different models "
                             f"({sorted({o.task for o in objectives.values()})}); expected objectives "
                             "that share one model task")
        for name, weight in weights.items():
            if name not in objectives or not weight > 0:
                raise ValueError(f"objective weight {name}={weight!r}: expected a positive weight for one of "
                                 f"{sorted(objectives)}")
        self.objectives, self.weights = objectives, weights
        self.name = "+".join(objectives)
        tasks_in_order = [t for o in objectives.values() for t in getattr(o, "tasks", (o.task,))]
        self.task = next(t for t in tasks_in_order if t in shared)
        self.special_tokens = {role: token for o in objectives.values()
                               for role, token in getattr(o, "special_tokens", {}).items()}

    def make_data(self, source, tokenizer, data, *, rank=0, world_size=1, seed=0, eval_batches=20) -> ObjectiveData:
        parts = {name: o.make_data(source, tokenizer, data, rank=rank, world_size=world_size, seed=seed,
                                   eval_batches=eval_batches)
                 for name, o in self.objectives.items()}

        def val():
            # One batch of every objective per validation step, like training, so each objective is
            # evaluated and the weighted loss is the same quantity as in training.
            iterators = {name: iter(part.val()) for name, part in parts.items() if part.val is not None}
            while True:
                batch = {}
                for name, iterator in iterators.items():
                    item = next(iterator, None)
                    if item is None:
                        return
                    batch[name] = item
                yield batch
        return ObjectiveData(MixedBatches({n: p.train for n, p in parts.items()}), val)

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        total, metrics = None, {}
        for name, sub_batch in batch.items():
            loss, sub_metrics = self.objectives[name].loss(model, sub_batch)
            weighted = self.weights.get(name, 1.0) * loss
            total = weighted if total is None else total + weighted
            metrics.update({f"{name}/{k}": v for k, v in sub_metrics.items()})
        metrics["loss"] = float(total.detach())
        return total, metrics


def build_once(rank: int, marker, build: Callable[[], Any], timeout: float = 3600.0) -> None:
    """Rank 0 runs `build`; other ranks wait until `marker` (a file `build` writes last) exists.
    Used before the Trainer joins the process group, so it cannot use a barrier."""
    import time
    from pathlib import Path
    if rank == 0:
        build()
        return
    deadline = time.time() + timeout
    while not Path(marker).is_file():
        if time.time() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for rank 0 to write {marker}")
        time.sleep(0.5)


def token_shards(source, tokenizer, data, rank: int = 0):
    """The corpus as (train, val) memmap token streams in `data.cache_dir`: rank 0 tokenizes it once
    (reused while source, tokenizer and settings are unchanged); other ranks wait for meta.json."""
    from pathlib import Path

    from ..data import build_shards, load_shards
    cache = Path(data.cache_dir)

    def build():
        shards = build_shards(source, tokenizer, cache, val_fraction=data.val_fraction, seed=data.seed,
                              text_field=data.text_field, split_lines=data.split_lines)
        print(f"data: {shards.train_tokens:,} train / {shards.val_tokens:,} val tokens, vocab "
              f"{tokenizer.vocab_size} ({'reused' if shards.reused else 'built'} in {cache})")
    build_once(rank, cache / "meta.json", build)
    return load_shards(cache, "train"), load_shards(cache, "val")
