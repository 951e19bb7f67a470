"""Instruction SFT: chat formatting, response-only loss, special tokens, truncation, packing."""
from __future__ import annotations

import pytest
import torch

import llmkit
from llmkit.data.errors import DataError
from llmkit.finetune.data import Row
from llmkit.finetune.loops import heldout_perplexity
from llmkit.finetune.sft import SFTBatches, encode_chat, encode_sft_rows, prompt_ids, sft_loss
from llmkit.objectives.clm import IGNORE_INDEX
from llmkit.tokenizer import load_tokenizer, train_bpe, train_char

# Meta's Llama-3 instruct template, as shipped in its tokenizer_config.json.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CORPUS = ["What is the capital of France? Paris is the capital.", "Compute two plus two. Four.",
          "You are a helpful assistant. Answer briefly."] * 20
CONVERSATION = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris."},
                {"role": "user", "content": "Compute two plus two."},
                {"role": "assistant", "content": "Four."}]


@pytest.fixture(scope="module")
def llama3_tokenizer(tmp_path_factory):
    """A byte-level BPE whose post-processor adds BOS (as Llama's does), saved with the Llama-3
    template in tokenizer_config.json and loaded back from disk."""
    tok = train_bpe(texts=CORPUS, vocab_size=400, special_tokens=("<|start_header_id|>", "<|end_header_id|>",
                                                                  "<|eot_id|>"),
                    bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|pad|>", add_bos=True)
    tok.chat_template = LLAMA3_TEMPLATE
    folder = tok.save(tmp_path_factory.mktemp("llama3_tok"))
    loaded = load_tokenizer(folder)
    assert loaded.chat_template == LLAMA3_TEMPLATE
    assert loaded.encode("hi")[0] == loaded.bos_token_id          # the post-processor does add BOS
    return loaded


def test_real_chat_template_doubles_no_special_token(llama3_tokenizer):
    tok = llama3_tokenizer
    ex = encode_chat(tok, CONVERSATION)
    assert ex.ids[0] == tok.bos_token_id and ex.ids.count(tok.bos_token_id) == 1
    eot = tok.token_to_id("<|eot_id|>")
    assert ex.ids.count(eot) == len(CONVERSATION)                 # one end-of-turn per message, no extra EOS
    for a, b in zip(ex.ids, ex.ids[1:]):
        assert not (a == b and a in tok.special_ids), f"doubled special token {tok.id_to_token(a)!r}"
    # The response spans are the two answers plus their end-of-turn marker, nothing else.
    spans, current = [], []
    for token, m in zip(ex.ids, ex.mask):
        if m:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    spans += [current] if current else []
    assert [tok.decode(s, skip_special_tokens=False) for s in spans] == ["Paris.<|eot_id|>", "Four.<|eot_id|>"]
    # The generation prompt is the training encoding cut where the last answer starts.
    prompt = prompt_ids(tok, CONVERSATION)
    assert ex.ids[:len(prompt)] == prompt
    assert tok.decode(prompt, skip_special_tokens=False).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_eos_is_appended_only_when_the_template_has_no_end_marker():
    tok = train_char(texts=["abc=12 xyz"], special_tokens=("<pad>", "<|endoftext|>"), pad_token="<pad>")
    plain = "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'user' %}={% endif %}{% endfor %}"
    ex = encode_chat(tok, [{"role": "user", "content": "abc"}, {"role": "assistant", "content": "12"}], plain)
    assert tok.decode(ex.ids, skip_special_tokens=False) == "abc=12<|endoftext|>"
    assert ex.mask == [0, 0, 0, 0, 1, 1, 1]
    with_eos = plain.replace("{{ m['content'] }}{% if", "{{ m['content'] }}{% if m['role'] == 'assistant' %}"
                             "{{ eos_token }}{% endif %}{% if")
    ex = encode_chat(tok, [{"role": "user", "content": "abc"}, {"role": "assistant", "content": "12"}], with_eos)
    assert tok.decode(ex.ids, skip_special_tokens=False) == "abc=12<|endoftext|>"   # not twice


def test_gradients_come_only_from_response_tokens(llama3_tokenizer):
    """d loss / d logits is exactly zero at every position whose next token is prompt or padding,
    and non-zero at every response position; changing a prompt target does not move the loss."""
    tok = llama3_tokenizer
    rows = [Row({"messages": CONVERSATION}, "row 0"),
            Row({"prompt": "Compute two plus two.", "response": "Four."}, "row 1")]
    examples, _ = encode_sft_rows(rows[:1], "messages", tok, max_len=256)
    examples += encode_sft_rows(rows[1:], "prompt_response", tok, max_len=256)[0]
    batch = next(SFTBatches(examples, 2, tok.pad_token_id, shuffle=False))
    model = llmkit.build_model(llmkit.get_preset("llama-tiny", vocab_size=tok.vocab_size))
    captured = {}

    class Capture(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            out = self.inner(*args, **kwargs)
            out.logits.retain_grad()
            captured["logits"] = out.logits
            return out

    loss, _ = sft_loss(Capture(model), batch)
    loss.backward()
    grad = captured["logits"].grad.abs().sum(-1)                                   # (B, T)
    scored = batch["targets"] != IGNORE_INDEX
    assert scored.any() and (~scored).any()
    assert torch.all(grad[~scored] == 0)
    assert torch.all(grad[scored] > 0)
    # Targets are scored exactly where the next token is a response token.
    for b, ex in enumerate(examples):
        n = len(ex.ids) - 1
        assert scored[b, :n].tolist() == [bool(m) for m in ex.mask[1:]]
        assert not scored[b, n:].any()
    # A different prompt target changes nothing: it is ignored.
    changed = {k: v.clone() for k, v in batch.items()}
    position = (~scored[0]).nonzero()[0].item()
    changed["targets"][0, position] = IGNORE_INDEX
    with torch.no_grad():
        assert torch.equal(sft_loss(model, batch)[0], sft_loss(model, changed)[0])


def test_truncation_that_empties_a_response_errors_naming_the_row_or_drops_and_counts():
    tok = train_char(texts=["abcdefghij =0123456789"], special_tokens=("<pad>", "<|endoftext|>"), pad_token="<pad>")
    template = "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'user' %}={% endif %}{% endfor %}"
    rows = [Row({"prompt": "abc", "response": "12"}, "'train.jsonl' line 1"),
            Row({"prompt": "abcdefghij" * 3, "response": "12"}, "'train.jsonl' line 2")]
    with pytest.raises(DataError, match=r"'train.jsonl' line 2: the response is left empty by truncation.*max_len=16"):
        encode_sft_rows(rows, "prompt_response", tok, max_len=16, template=template)
    kept, dropped = encode_sft_rows(rows, "prompt_response", tok, max_len=16, template=template,
                                    on_empty_response="drop")
    assert dropped == 1 and len(kept) == 1 and kept[0].where == "'train.jsonl' line 1"
    # Left truncation keeps the response (the end of the conversation).
    kept, dropped = encode_sft_rows(rows, "prompt_response", tok, max_len=16, template=template, truncation="left")
    assert dropped == 0 and len(kept[1].ids) == 16 and sum(kept[1].mask) == 3      # "12" + EOS


def test_packing_gives_the_same_token_losses_as_padding():
    """Packed rows restart positions and block attention at each example, so every response
    token's loss is the same as in a padded batch: equal summed NLL and token count."""
    tok = train_char(texts=["Compute 0123456789+=. abc"], special_tokens=("<pad>", "<|endoftext|>"), pad_token="<pad>")
    template = "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'user' %}={% endif %}{% endfor %}"
    rows = [Row({"prompt": f"Compute {a}+{b}.", "response": str(a + b)}, f"row {i}")
            for i, (a, b) in enumerate([(1, 2), (13, 40), (7, 8), (120, 5), (3, 3), (61, 9)])]
    examples, _ = encode_sft_rows(rows, "prompt_response", tok, max_len=40, template=template)
    model = llmkit.build_model(llmkit.get_preset("llama-tiny", vocab_size=tok.vocab_size, d_model=32, n_layers=2))
    packed = SFTBatches(examples, 2, tok.pad_token_id, packing=True, max_len=40, shuffle=False)
    padded = SFTBatches(examples, 2, tok.pad_token_id, shuffle=False)
    assert len(packed.items) < len(examples)                 # several examples share a row
    first = next(iter(packed.iter_once()))
    assert set(first) == {"input_ids", "targets", "position_ids", "doc_ids"} and first["input_ids"].shape[1] == 39
    a, b = heldout_perplexity(model, packed.iter_once()), heldout_perplexity(model, padded.iter_once())
    assert a["tokens"] == b["tokens"] == sum(sum(ex.mask[1:]) for ex in examples)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_sft_batches_resume_exactly():
    tok = train_char(texts=["abc=123"], special_tokens=("<pad>", "<|endoftext|>"), pad_token="<pad>")
    rows = [Row({"prompt": "abc"[: 1 + i % 3], "response": "123"[: 1 + i % 3]}, f"row {i}") for i in range(7)]
    examples, _ = encode_sft_rows(rows, "prompt_response", tok, max_len=64)
    a = SFTBatches(examples, 3, tok.pad_token_id, seed=5)
    for _ in range(4):
        next(a)
    b = SFTBatches(examples, 3, tok.pad_token_id, seed=5)
    b.load_state_dict(a.state_dict())
    for _ in range(5):
        x, y = next(a), next(b)
        assert all(torch.equal(x[k], y[k]) for k in x)
