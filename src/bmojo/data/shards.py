"""Token shards: a tokenised corpus on disk, split into train and validation, read through memory maps.

A shard directory holds

* ``train.bin`` and ``val.bin``: the token ids of each split as a flat little-endian array of
  :func:`token_dtype` (``uint16`` when the vocabulary has at most 65536 ids, else ``uint32``),
  every document followed by the tokenizer's ``eos_id`` (so documents are separated by it);
* the tokenizer (:meth:`bmojo.data.tokenizer.Tokenizer.save`);
* ``meta.json``: the tokenizer (kind, name, vocab size, eos id), dtype, tokens and documents per
  split, the validation fraction and seed, and what :class:`ShardWriter.finish` is given about
  the sources (files, bytes, replaced bytes, licence...). It is written last: a directory
  without it is not a finished shard directory.

The validation split is made of whole documents (:func:`choose_validation`), deterministic given
the seed; a corpus of a single document gives the tail of that document to validation.

:class:`TokenShards` reads a shard directory: :meth:`TokenShards.batch` draws random training
windows as a pure function of its arguments (so a trainer resumes exactly); evaluation reads a
split's memory map (:meth:`TokenShards.tokens`) with :func:`bmojo.evaluation.perplexity.perplexity_at`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch

from bmojo.data.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "META_FILE",
    "SPLITS",
    "ShardWriter",
    "TokenShards",
    "check_output_dir",
    "choose_validation",
    "token_dtype",
]

META_FILE = "meta.json"
SPLITS = ("train", "val")
FORMAT = "bmojo-token-shards"
FORMAT_VERSION = 1
_PARTIAL_FILE = "documents.partial"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds ids ``0 .. vocab_size - 1`` (uint16 or uint32)."""
    if not 1 <= vocab_size <= 2**32:
        raise ValueError(f"vocab size {vocab_size} does not fit in uint32 token files")
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _split_file(directory: Path, split: str) -> Path:
    return directory / f"{split}.bin"


def check_output_dir(directory: str | Path) -> None:
    """``directory`` may hold shards: it is missing, empty, or a previous shard directory (then replaced)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"output {directory} is a file, not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / META_FILE).is_file():
        raise ValueError(f"output directory {directory} is not empty and holds no {META_FILE} of earlier shards; "
                         "choose another one")


def choose_validation(lengths: Sequence[int] | np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Which documents go to validation: a bool mask over ``lengths`` (tokens per document, >= 2 documents).

    In an order shuffled by ``seed``, documents are taken until they hold at least ``val_fraction``
    of all tokens; at least one document goes to validation and at least one stays for training.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) < 2:
        raise ValueError("splitting by documents needs at least two documents")
    order = np.random.default_rng(seed).permutation(len(lengths))
    reached = np.cumsum(lengths[order]) >= val_fraction * lengths.sum()
    count = min(int(np.argmax(reached)) + 1, len(lengths) - 1)
    is_val = np.zeros(len(lengths), dtype=bool)
    is_val[order[:count]] = True
    return is_val


class ShardWriter:
    """Writes a shard directory: :meth:`add` each tokenised document, then :meth:`finish`.

    Documents are collected in a temporary file of the directory (removed by :meth:`finish`, or when
    the ``with`` block fails) because the split is chosen once all document lengths are known.
    """

    def __init__(self, directory: str | Path, tokenizer: Tokenizer) -> None:
        check_output_dir(directory)
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / META_FILE).unlink(missing_ok=True)  # until finish(), this is not a shard directory
        self.tokenizer = tokenizer
        self.dtype = token_dtype(tokenizer.vocab_size)
        self._partial_path = self.directory / _PARTIAL_FILE
        self._partial = self._partial_path.open("wb")
        self._lengths: list[int] = []  # tokens of each document, its eos included

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._partial.close()
        self._partial_path.unlink(missing_ok=True)

    @property
    def num_documents(self) -> int:
        return len(self._lengths)

    def add(self, ids: Sequence[int] | np.ndarray) -> None:
        """Append one document's token ids (its eos is added here)."""
        ids = np.asarray(ids, dtype=np.int64)  # [n]
        if len(ids) == 0:
            raise ValueError("a document has no tokens")
        if ids.min() < 0 or ids.max() >= self.tokenizer.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.tokenizer.vocab_size}), got {ids.min()}..{ids.max()}")
        tokens = np.empty(len(ids) + 1, dtype=self.dtype)  # [n + 1]
        tokens[:-1] = ids
        tokens[-1] = self.tokenizer.eos_id
        tokens.tofile(self._partial)
        self._lengths.append(len(tokens))

    def finish(self, val_fraction: float, seed: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Split, write ``train.bin``, ``val.bin``, the tokenizer and ``meta.json``; returns the meta.

        ``extra`` (sources, licence, byte counts...) is stored in the meta as given.
        """
        if not 0 < val_fraction < 1:
            raise ValueError(f"the validation fraction must be in (0, 1), got {val_fraction}")
        if not self._lengths:
            raise ValueError("no documents to write")
        self._partial.close()
        lengths = np.asarray(self._lengths, dtype=np.int64)
        tokens = np.memmap(self._partial_path, dtype=self.dtype, mode="r", shape=(int(lengths.sum()),))
        total = len(tokens)
        if len(lengths) == 1:
            # A single document: its tail, at least one token, goes to validation.
            cut = total - min(max(math.ceil(val_fraction * total), 1), total - 1)
            pieces = {"train": [tokens[:cut]], "val": [tokens[cut:]]}
            documents = {"train": 1, "val": 1}
            split_by = "tail of the single document"
        else:
            is_val = choose_validation(lengths, val_fraction, seed)
            ends = np.cumsum(lengths)
            starts = ends - lengths
            pieces = {split: [tokens[a:b] for a, b in zip(starts[mask], ends[mask], strict=True)]
                      for split, mask in (("train", ~is_val), ("val", is_val))}
            documents = {"train": int((~is_val).sum()), "val": int(is_val.sum())}
            split_by = "documents"
        for split in SPLITS:
            with _split_file(self.directory, split).open("wb") as out:
                for piece in pieces[split]:
                    piece.tofile(out)
        del tokens, pieces  # release the memory map before removing its file
        self._partial_path.unlink()
        self.tokenizer.save(self.directory)
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "tokenizer": {"kind": self.tokenizer.kind, "name": self.tokenizer.name,
                          "vocab_size": self.tokenizer.vocab_size, "eos_id": self.tokenizer.eos_id},
            "dtype": self.dtype.name,
            "tokens": {split: int(os.path.getsize(_split_file(self.directory, split)) // self.dtype.itemsize)
                       for split in SPLITS},
            "num_documents": len(lengths),
            "documents": documents,
            "split_by": split_by,
            "val_fraction": val_fraction,
            "seed": seed,
            **(extra or {}),
        }
        (self.directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return meta


class TokenShards:
    """A shard directory written by :class:`ShardWriter`, read through memory maps."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"token shard directory {directory} does not exist")
        meta_path = self.directory / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{directory} has no {META_FILE}: prepare it with `bmojo data prepare`")
        self.meta: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8"))
        if self.meta.get("format") != FORMAT or self.meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path} is not a version-{FORMAT_VERSION} {FORMAT} meta file")
        dtype = np.dtype(self.meta["dtype"])
        self._tokens: dict[str, np.ndarray] = {}
        for split in SPLITS:
            path = _split_file(self.directory, split)
            count = self.meta["tokens"][split]
            if not path.is_file() or path.stat().st_size != count * dtype.itemsize:
                raise ValueError(f"{path} is missing or does not hold the {count} tokens {META_FILE} records")
            self._tokens[split] = np.memmap(path, dtype=dtype, mode="r", shape=(count,))

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.directory)

    @property
    def vocab_size(self) -> int:
        return self.meta["tokenizer"]["vocab_size"]

    @property
    def eos_id(self) -> int:
        return self.meta["tokenizer"]["eos_id"]

    def tokens(self, split: str) -> np.ndarray:
        """The read-only memory map of ``split``'s token ids: ``[num_tokens(split)]``."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
        return self._tokens[split]

    def num_tokens(self, split: str) -> int:
        return len(self.tokens(split))

    def batch(self, split: str, index: int, batch_size: int, seq_len: int, seed: int = 0) -> torch.Tensor:
        """Batch ``index`` of random windows of ``split``: int64 ``[batch_size, seq_len + 1]``.

        A pure function of its arguments: window starts are uniform over the split, drawn from a
        generator seeded with ``(seed, split, index)``. Inputs are ``[:, :-1]``, targets ``[:, 1:]``.
        """
        tokens = self.tokens(split)
        for name, value, minimum in (("index", index, 0), ("seed", seed, 0), ("batch_size", batch_size, 1),
                                     ("seq_len", seq_len, 1)):
            if value < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {value}")
        if seq_len + 1 > len(tokens):
            raise ValueError(f"seq_len + 1 = {seq_len + 1} tokens is longer than the {split} split "
                             f"({len(tokens)} tokens)")
        rng = np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), index]))
        starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)  # [B], each in [0, N - seq_len - 1]
        windows = tokens[starts[:, None] + np.arange(seq_len + 1)]  # [B, seq_len + 1]
        return torch.from_numpy(windows.astype(np.int64))
