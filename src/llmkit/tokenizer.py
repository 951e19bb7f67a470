"""Tokenizers for llmkit: load, train, save and chat-format, on top of the HF `tokenizers` library.

The Rust library does the fast part (normalize, pre-tokenize, BPE / WordPiece / Unigram, post-process)
and defines the `tokenizer.json` format; this module adds which token plays which role (bos, eos, pad,
...), the chat template, training helpers, and a `save` that HF `AutoTokenizer` reads back.
`transformers` is never imported here: it is a test-only peer.
"""

from __future__ import annotations

import datetime
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as _Backend

SPECIAL_ROLES = ("bos", "eos", "pad", "unk", "mask", "cls", "sep")
BYTE_ALPHABET_SIZE = 256  # byte-level BPE starts from one token per byte

# ChatML is the default because its markers are explicit and role-carrying (a turn can never be
# confused with content), because it is the most widely recognised format (OpenAI, Qwen, many open
# fine-tunes, HF's own former default), so a model tuned here chats with other tools unchanged, and
# because it needs no model-specific tokens: on a tokenizer without `<|im_start|>` it still renders.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class Tokenizer:
    """A `tokenizers.Tokenizer` plus special-token roles, a chat template and `model_max_length`.

    For every role in SPECIAL_ROLES it has `<role>_token` (str) and `<role>_token_id` (int), None when
    the tokenizer has no such token, so callers can test them instead of catching errors.
    """

    def __init__(self, backend: _Backend, special_tokens: Mapping[str, str | None] | None = None,
                 chat_template: str | None = None, model_max_length: int | None = None):
        # A tokenizer.json may be saved with padding/truncation switched on (MiniLM pads to 128).
        # HF applies them only when a call asks; padding is the collator's job here, so turn them off.
        backend.no_padding()
        backend.no_truncation()
        self.backend = backend
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        self.special_tokens: dict[str, str] = {}
        for role, token in (special_tokens or {}).items():
            if role not in SPECIAL_ROLES:
                raise ValueError(f"special_tokens: unknown role {role!r}; expected one of {SPECIAL_ROLES}")
            if token is not None:
                if not isinstance(token, str) or not token:
                    raise ValueError(f"special_tokens[{role!r}]: expected a non-empty string, got {token!r}")
                self.special_tokens[role] = token
        self._register_role_tokens()
        for role in SPECIAL_ROLES:
            token = self.special_tokens.get(role)
            setattr(self, f"{role}_token", token)
            setattr(self, f"{role}_token_id", None if token is None else backend.token_to_id(token))
        added = backend.get_added_tokens_decoder()
        self.special_ids: set[int] = {i for i, tok in added.items() if tok.special}
        self.special_ids |= {getattr(self, f"{r}_token_id") for r in self.special_tokens}

    @property
    def pad_id(self) -> int:
        """The id batches pad with: the pad token, else EOS (padding is masked out), else 0."""
        return next((i for i in (self.pad_token_id, self.eos_token_id) if i is not None), 0)

    def _register_role_tokens(self) -> None:
        """Make every role token a special added token, as HF does, so that it is never split,
        gets an id even when absent from the vocabulary, and is dropped by skip_special_tokens."""
        present = {tok.content for tok in self.backend.get_added_tokens_decoder().values()}
        missing = [t for t in dict.fromkeys(self.special_tokens.values()) if t not in present]
        if missing:
            self.backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])

    # ---- vocabulary -------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Tokens including added ones: the number of embedding rows a model needs."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    # ---- encode / decode --------------------------------------------------------------------
    def encode(self, text: str, pair: str | None = None, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text` (and of `pair`, BERT-style, when given)."""
        return self.encode_with_types(text, pair, add_special_tokens)[0]

    def encode_with_types(self, text: str, pair: str | None = None,
                          add_special_tokens: bool = True) -> tuple[list[int], list[int]]:
        """(ids, token_type_ids); type ids mark segment A (0) and B (1) for pair tasks like NSP."""
        _check_str(text, "text")
        if pair is not None:
            _check_str(pair, "pair")
        encoding = self.backend.encode(text, pair, add_special_tokens=add_special_tokens)
        return encoding.ids, encoding.type_ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Encode many texts at once; the Rust side runs them in parallel threads."""
        for i, text in enumerate(texts):
            _check_str(text, f"texts[{i}]")
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if hasattr(ids, "tolist"):  # a torch tensor or numpy array, without importing either
            ids = ids.tolist()
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---- chat -------------------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False,
                            tokenize: bool = False, chat_template: str | None = None) -> str | list[int]:
        """Render `messages` ([{"role", "content"}, ...]) with the tokenizer's Jinja chat template.

        Falls back to DEFAULT_CHAT_TEMPLATE (ChatML) when the tokenizer has none. With tokenize=True
        the text is encoded with add_special_tokens=False: the template already writes the specials
        it wants (e.g. `{{ bos_token }}`), and letting the post-processor add them again would put two
        BOS tokens at the start, a silent quality bug in many fine-tuning scripts.
        """
        _check_messages(messages)
        template = chat_template or self.chat_template or DEFAULT_CHAT_TEMPLATE
        from jinja2 import TemplateError

        token_vars = {f"{role}_token": token for role, token in self.special_tokens.items()}
        try:
            text = _compile_chat_template(template).render(
                messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt, **token_vars)
        except TemplateError as err:
            raise ValueError(f"chat_template: rendering failed: {err}") from err
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # ---- save -------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json to `directory`.

        "PreTrainedTokenizerFast" lets HF AutoTokenizer load the result from tokenizer.json alone;
        clean_up_tokenization_spaces=False stops old transformers versions from editing decoded text
        (" ." -> ".") so their decode equals ours. Each file is written atomically.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        token_map = {f"{role}_token": token for role, token in self.special_tokens.items()}
        optional = {"model_max_length": self.model_max_length, "chat_template": self.chat_template}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **token_map,
                  **{key: value for key, value in optional.items() if value is not None}}
        _write_atomic(directory / "tokenizer.json", self.backend.to_str(pretty=True))
        _write_atomic(directory / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False))
        _write_atomic(directory / "special_tokens_map.json", json.dumps(token_map, indent=2, ensure_ascii=False))
        return directory

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, special_tokens={self.special_tokens})"


# ---- loading --------------------------------------------------------------------------------
def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer from a directory holding tokenizer.json, or from a tokenizer.json file.

    tokenizer_config.json and special_tokens_map.json beside it, when present, give the special-token
    roles (the config wins where both name one), the chat template and model_max_length; a
    chat_template.jinja file (what newer transformers write) overrides the config's template.
    """
    path = Path(path)
    expected = "expected a directory holding tokenizer.json or a path to a tokenizer.json file"
    if not path.exists():
        raise FileNotFoundError(f"tokenizer path '{path}' does not exist; {expected}")
    json_file = path / "tokenizer.json" if path.is_dir() else path
    if not json_file.is_file():
        found = sorted(p.name for p in path.iterdir())[:10]
        raise FileNotFoundError(f"no tokenizer.json in directory '{path}' (found {found}); {expected}")
    try:
        backend = _Backend.from_str(json_file.read_text(encoding="utf-8"))
    except Exception as err:  # the Rust side raises a bare Exception for bad JSON and bad schemas
        raise ValueError(f"'{json_file}' is not a valid tokenizer.json: {err}") from err

    config_file, map_file = json_file.with_name("tokenizer_config.json"), json_file.with_name("special_tokens_map.json")
    config, token_map = _read_json_object(config_file), _read_json_object(map_file)
    special_tokens = {}
    for role in SPECIAL_ROLES:
        key = f"{role}_token"
        special_tokens[role] = (_token_content(config.get(key), config_file, key)
                                or _token_content(token_map.get(key), map_file, key))

    chat_template = _chat_template_from_config(config, config_file)
    jinja_file = json_file.with_name("chat_template.jinja")
    if jinja_file.is_file():
        chat_template = jinja_file.read_text(encoding="utf-8")
    max_length = config.get("model_max_length")
    if max_length is not None and not isinstance(max_length, int):
        raise ValueError(f"'{config_file}': field 'model_max_length' must be an int, got {max_length!r}")
    return Tokenizer(backend, special_tokens, chat_template, max_length)


def _read_json_object(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"'{path}' is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"'{path}': expected a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any, source: Path, field: str) -> str | None:
    """HF stores a special token as a string or as an AddedToken dict {"content": ..., ...}."""
    if value is None or isinstance(value, str):
        return value or None
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"'{source}': field {field!r} must be a string or a dict with 'content', got {value!r}")


def _chat_template_from_config(config: dict, source: Path) -> str | None:
    """A template is a string, or a list of {"name", "template"} of which we use "default"."""
    value = config.get("chat_template")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise ValueError(f"'{source}': field 'chat_template' must be a string or a list of "
                     f"{{'name', 'template'}} holding a 'default' entry, got {str(value)[:80]!r}")


# ---- training -------------------------------------------------------------------------------
def train_bpe(files: str | os.PathLike | Sequence[str | os.PathLike] | None = None, vocab_size: int = 8192,
              special_tokens: Sequence[str] = ("<|endoftext|>",), min_frequency: int = 2, *,
              texts: Iterable[str] | None = None, bos_token: str | None = None,
              eos_token: str | None = "<|endoftext|>", pad_token: str | None = None, unk_token: str | None = None,
              add_bos: bool = False, add_eos: bool = False) -> Tokenizer:
    """Train a GPT-2-style byte-level BPE on `files` or on `texts` (exactly one of them).

    Byte-level means the base alphabet is the 256 bytes, so any text encodes without <unk> and
    decodes back exactly. Role tokens are added to `special_tokens` when missing. No post-processor
    unless add_bos / add_eos ask for one: a causal-LM data pipeline usually adds EOS between
    documents itself, and a hidden automatic BOS is what causes doubled BOS tokens.
    """
    roles = {"bos": bos_token, "eos": eos_token, "pad": pad_token, "unk": unk_token}
    specials = _all_special_tokens(special_tokens, roles, add_bos, add_eos)
    minimum = len(specials) + BYTE_ALPHABET_SIZE
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= minimum:
        raise ValueError(f"vocab_size={vocab_size!r} is too small: expected an int > {minimum} "
                         f"({len(specials)} special tokens + {BYTE_ALPHABET_SIZE} byte tokens)")
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"min_frequency={min_frequency!r}: expected an int >= 1")
    corpus = _corpus(files, texts)
    backend = _Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(corpus, trainer=trainer)
    _attach_bos_eos(backend, bos_token, eos_token, add_bos, add_eos)
    return Tokenizer(backend, roles)


def train_char(files: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
               special_tokens: Sequence[str] = ("<unk>", "<|endoftext|>"), *, texts: Iterable[str] | None = None,
               bos_token: str | None = None, eos_token: str | None = "<|endoftext|>", pad_token: str | None = None,
               unk_token: str | None = "<unk>", add_bos: bool = False, add_eos: bool = False) -> Tokenizer:
    """Character-level tokenizer: one token per distinct character seen (the nanoGPT baseline).

    A WordLevel model over single characters: the Split pre-tokenizer isolates every character
    (whitespace included) and the Fuse decoder joins tokens with no separator, so decode(encode(s))
    == s exactly. Special tokens take the first ids, characters follow in sorted order; characters
    never seen in training map to `unk_token` (with unk_token=None, encoding one raises instead).
    """
    roles = {"bos": bos_token, "eos": eos_token, "pad": pad_token, "unk": unk_token}
    specials = _all_special_tokens(special_tokens, roles, add_bos, add_eos)
    chars: set[str] = set()
    for line in _corpus(files, texts):
        chars.update(line)
    vocab = {token: i for i, token in enumerate(specials + sorted(chars - set(specials)))}
    backend = _Backend(models.WordLevel(vocab, unk_token=unk_token or "<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    _attach_bos_eos(backend, bos_token, eos_token, add_bos, add_eos)
    return Tokenizer(backend, roles)


def _all_special_tokens(special_tokens: Sequence[str], roles: Mapping[str, str | None], add_bos: bool,
                        add_eos: bool) -> list[str]:
    """Checked before training, so a bad argument fails at once rather than after a long run."""
    if isinstance(special_tokens, str):
        raise ValueError(f"special_tokens: expected a list of strings, got the string {special_tokens!r}")
    tokens = list(special_tokens) + [t for t in roles.values() if t is not None]
    for i, token in enumerate(tokens):
        if not isinstance(token, str) or not token:
            raise ValueError(f"special_tokens[{i}]: expected a non-empty string, got {token!r}")
    for role, add in (("bos", add_bos), ("eos", add_eos)):
        if add and roles[role] is None:
            raise ValueError(f"add_{role}=True needs {role}_token, got None")
    return list(dict.fromkeys(tokens))  # de-duplicated, order kept: ids follow this order


def _corpus(files, texts: Iterable[str] | None) -> Iterator[str]:
    """Validate the training source up front (errors before training starts, naming the path)."""
    if (files is None) == (texts is None):
        raise ValueError("give exactly one of files= (paths) or texts= (an iterable of strings)")
    if texts is not None:
        if isinstance(texts, str):
            raise ValueError("texts: expected an iterable of strings, got a single string; wrap it in a list")
        return _checked_texts(texts)
    paths = [Path(files)] if isinstance(files, (str, os.PathLike)) else [Path(f) for f in files]
    if not paths:
        raise ValueError("files: expected at least one path, got an empty list")
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"training file '{path}' does not exist or is not a file")
    return _lines(paths)


def _checked_texts(texts: Iterable[str]) -> Iterator[str]:
    for i, text in enumerate(texts):
        _check_str(text, f"texts[{i}]")
        yield text


def _lines(paths: list[Path]) -> Iterator[str]:
    for path in paths:
        with open(path, encoding="utf-8", newline="") as f:  # newline="" keeps "\r\n" as written
            yield from f


def _attach_bos_eos(backend: _Backend, bos: str | None, eos: str | None, add_bos: bool, add_eos: bool) -> None:
    """Optional post-processor that wraps every sequence as `bos A eos` (pairs: `bos A eos B eos`)."""
    if not (add_bos or add_eos):
        return
    start = [bos] if add_bos else []
    end = [eos] if add_eos else []
    single = " ".join(start + ["$A"] + end)
    pair = " ".join(start + ["$A"] + end + ["$B:1"] + [f"{t}:1" for t in end])
    used = dict.fromkeys(start + end)
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(t, backend.token_to_id(t)) for t in used])


# ---- chat template helpers ------------------------------------------------------------------
def _check_messages(messages: Sequence[Mapping[str, Any]]) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages: expected a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}]: expected a dict with 'role' and 'content', got {type(message).__name__}")
        for field in ("role", "content"):
            if field not in message:
                raise ValueError(f"messages[{i}]: missing field {field!r}")
            if not isinstance(message[field], str):
                raise ValueError(f"messages[{i}][{field!r}]: expected a string, got {type(message[field]).__name__}")


@lru_cache(maxsize=16)
def _compile_chat_template(source: str):
    """Compile once per template. A sandbox, because templates come from downloaded checkpoints;
    trim/lstrip_blocks and the raise_exception / strftime_now globals match what HF templates expect."""
    from jinja2 import TemplateError, ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    def tojson(value, indent=None):  # HF templates expect non-ASCII kept as-is
        return json.dumps(value, indent=indent, ensure_ascii=False)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


# ---- small utilities ------------------------------------------------------------------------
def _check_str(value: Any, name: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected a string, got {type(value).__name__}")


def _write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file in the same directory, then rename: a crash leaves the old file.
    (Not mkstemp: its 0600 mode would make a shared tokenizer unreadable to others.)"""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
