"""Multi-LoRA serving (llmkit.infer.multi_lora): a batch whose rows (tokens) name different LoRA
adapters, or none, gives each row the logits of its own adapter alone; outside `bank.rows()` the
model is the ordinary PEFT model; adapters that cannot be mixed per token are refused."""
from __future__ import annotations

import copy

import pytest
import torch

import llmkit
import llmkit.peft as lpeft
from llmkit.infer.multi_lora import LoraBank
from llmkit.peft.layers import AdaptedLayer

from conftest import torch_threads

ATOL = 1e-5


def _base():
    torch.manual_seed(0)
    return llmkit.build_model(llmkit.get_preset("llama-tiny", vocab_size=64, max_seq_len=64)).eval()


def _perturb(handle, seed: int) -> None:
    """Non-zero factors everywhere (B starts at zero, an embedding's A too), so each adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, adapter in handle.adapter_modules():
            for name, p in adapter.named_parameters():
                if name.startswith("lora_"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The base, three trained models (each its saving reference) and their adapter folders:
    "a" LoRA r=4 on q/v (llmkit format), "b" LoRA r=2 on q/o/up, the embedding and the lm_head (HF PEFT format),
    "c" AdaLoRA r=3 on v/down (llmkit format: served through its factors(), Λ folded into B)."""
    root = tmp_path_factory.mktemp("multi_lora")
    base = _base()
    specs = {"a": ("lora", dict(r=4, alpha=8, targets=["q_proj", "v_proj"]), "llmkit"),
             "b": ("lora", dict(r=2, alpha=4, targets=["q_proj", "o_proj", "up_proj", "embed_tokens", "lm_head"]),
                   "peft"),
             "c": ("adalora", dict(r=3, alpha=3, targets=["v_proj", "down_proj"]), "llmkit")}
    refs, dirs = {}, {}
    for seed, (name, (method, options, fmt)) in enumerate(specs.items(), start=1):
        model = copy.deepcopy(base)
        handle = lpeft.apply(model, method, **options)
        _perturb(handle, seed)
        refs[name] = model.eval()
        dirs[name] = handle.save(root / name, format=fmt)
    return base, refs, dirs


def _bank(setup):
    base, _, dirs = setup
    model = copy.deepcopy(base)
    return model, LoraBank(model, dirs)


def _ids(shape, seed=5):
    return torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(seed))


def test_rows_of_one_batch_match_each_adapter_alone(setup):
    base, refs, _ = setup
    model, bank = _bank(setup)
    assert bank.names == ["a", "b", "c"]
    row = _ids((1, 12))
    ids = row.repeat(4, 1)                      # the same tokens in every row: only the adapter differs
    names = ["a", None, "b", "c"]
    with torch_threads(1), torch.no_grad():
        with bank.rows(bank.indices(names).view(4, 1)):
            logits = model(ids).logits                                         # (4, 12, V)
        mask = torch.zeros(4, 12, dtype=torch.bool)
        mask[:, -1] = mask[1:3, 4] = True                  # the engine's sampled rows: (K=6, V) logits
        with bank.rows(bank.indices(names).view(4, 1), logits_index=mask):
            picked = model(ids, logits_index=mask).logits                      # the adapted lm_head sees (K, d)
        expected = [base(row).logits if n is None else refs[n](row).logits for n in names]
    for i, (name, want) in enumerate(zip(names, expected)):
        torch.testing.assert_close(logits[i:i + 1], want, atol=ATOL, rtol=0, msg=f"row {i} ({name})")
    torch.testing.assert_close(picked, logits[mask], atol=ATOL, rtol=0)
    for i in range(4):                          # a bank that ignored the index would make rows equal
        for j in range(i + 1, 4):
            assert (logits[i] - logits[j]).abs().max() > 1e-2, (names[i], names[j])


def test_flattened_tokens_each_get_their_own_adapter(setup):
    """A (1, N) grid of mixed tokens (the engine's flattened batch): every adapted layer's output at
    token t is the base output plus token t's adapter term alone (the embedding included)."""
    model, bank = _bank(setup)
    n = 20
    index = torch.tensor([[0, -1, 1, 2, 1, 0, 0, -1, 2, 1, 0, 2, -1, 1, 1, 0, 2, 2, -1, 0]])   # (1, N)
    layers = [(name, layer) for name, layer in model.named_modules() if isinstance(layer, AdaptedLayer)]
    assert any(layer.is_embedding for _, layer in layers)
    checked = 0
    with torch_threads(1), torch.no_grad():
        for name, layer in layers:
            x = _ids((1, n), seed=7) if layer.is_embedding else torch.randn(1, n, layer.in_features)
            with bank.rows(index):
                got = layer(x)
            with bank.handle.disable():
                per_slot = {-1: layer(x)}
            for slot, adapter in enumerate(bank.names):
                bank.handle.set_active(adapter)
                per_slot[slot] = layer(x)
            want = torch.stack([per_slot[int(s)][0, t] for t, s in enumerate(index[0])])[None]
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=name)
            present = {s for s in per_slot if s >= 0 and not torch.equal(per_slot[s], per_slot[-1])}
            checked += len(present)
        # the whole model on the flattened grid: the causal prefix that uses adapter "a" alone
        # equals "a"'s own model; a uniform index takes the no-gather path and equals it too
        ids = _ids((1, n))
        bank.handle.set_active([])
        mixed = torch.tensor([[0] * 8 + [1, -1] * 6])
        with bank.rows(mixed):
            prefix = model(ids).logits[:, :8]
        with bank.rows(torch.zeros(1, 1, dtype=torch.long)):
            whole = model(ids).logits
        ref = setup[1]["a"](ids).logits
    assert checked >= 6                         # every adapter changed the layers it sits on
    torch.testing.assert_close(prefix, ref[:, :8], atol=ATOL, rtol=0)
    torch.testing.assert_close(whole, ref, atol=ATOL, rtol=0)


def test_outside_rows_the_model_is_the_ordinary_peft_model(setup):
    base, refs, _ = setup
    model, bank = _bank(setup)
    ids = _ids((2, 10))
    with torch.no_grad():
        plain = base(ids).logits
        torch.testing.assert_close(model(ids).logits, plain, atol=0, rtol=0)     # fresh model: none active
        bank.handle.set_active("b")
        with bank.rows(torch.tensor([[0], [-1]])):
            mixed = model(ids).logits
        assert bank.handle.active == ["b"]
        torch.testing.assert_close(model(ids).logits, refs["b"](ids).logits, atol=ATOL, rtol=0)
        with bank.handle.disable():
            torch.testing.assert_close(model(ids).logits, plain, atol=ATOL, rtol=0)
    # inside rows the active "b" is not added on top: row 1 is the plain base
    torch.testing.assert_close(mixed[1], plain[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(mixed[:1], refs["a"](ids[:1]).logits, atol=ATOL, rtol=0)
    assert not any("multi_lora_rows" in n for n, _ in model.named_modules())


def test_unknown_names_and_bad_indices_are_refused(setup):
    _, bank = _bank(setup)
    assert (bank.index(None), bank.index("a"), bank.index("c")) == (-1, 0, 2)
    with pytest.raises(KeyError, match=r"'zzz' is not in the bank.*\['a', 'b', 'c'\]"):
        bank.index("zzz")
    with pytest.raises(ValueError, match="not in the bank"):
        bank.indices(["a", "zzz"])
    with pytest.raises(ValueError, match=r"values must lie in \[-1, 2\]"):
        with bank.rows(torch.tensor([[3]])):
            pass
    with pytest.raises(ValueError, match="does not broadcast"):
        with bank.rows(torch.zeros(3, 1, dtype=torch.long)):
            bank.model(_ids((2, 4)))
    with pytest.raises(ValueError, match="integer tensor"):
        with bank.rows(torch.zeros(1, 1)):
            pass


@pytest.mark.parametrize("method,options", [("ia3", {}), ("prefix_tuning", dict(num_virtual_tokens=2)),
                                            ("bitfit", dict(add_missing=True))])
def test_non_lora_adapters_are_refused(setup, tmp_path, method, options):
    base, _, dirs = setup
    other = copy.deepcopy(base)
    lpeft.apply(other, method, **options).save(tmp_path / method)
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=rf"adapter 'odd' .* is a '{method}' adapter"):
        LoraBank(model, {"a": dirs["a"], "odd": tmp_path / method})
    assert lpeft.handle_of(model) is None                    # nothing left attached: the plain model
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())
