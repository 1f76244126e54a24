"""Tests of the token shards: writing, the document split, and the memory-mapped reader."""

import json
import math

import numpy as np
import pytest
import torch

from bmojo.data.shards import ShardWriter, TokenShards, check_output_dir, choose_validation, token_dtype
from bmojo.data.tokenizer import ByteTokenizer


class WideTokenizer(ByteTokenizer):
    """A byte tokenizer that claims a larger vocabulary, to write arbitrary (unique) ids."""

    def __init__(self, vocab_size: int) -> None:
        self._vocab_size = vocab_size

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_id(self) -> int:
        return self._vocab_size - 1


def write_shards(directory, documents, tokenizer=None, val_fraction=0.25, seed=0):
    tokenizer = tokenizer or ByteTokenizer()
    with ShardWriter(directory, tokenizer) as writer:
        for ids in documents:
            writer.add(ids)
        meta = writer.finish(val_fraction, seed, extra={"sources": ["test"]})
    return meta


def counting_documents(lengths):
    """Documents of consecutive ids (unique across documents), of the given lengths."""
    ends = np.cumsum(lengths)
    return [np.arange(e - n, e) for n, e in zip(lengths, ends, strict=True)]


# --------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------


def test_token_dtype():
    assert token_dtype(257) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    with pytest.raises(ValueError, match="does not fit"):
        token_dtype(2**32 + 1)


def test_choose_validation_takes_whole_documents_up_to_the_fraction():
    lengths = np.array([5, 40, 7, 13, 22, 9, 31, 2, 18, 11])
    for seed in range(20):
        is_val = choose_validation(lengths, 0.2, seed)
        assert np.array_equal(is_val, choose_validation(lengths, 0.2, seed))  # deterministic
        order = np.random.default_rng(seed).permutation(len(lengths))
        taken = order[:is_val.sum()]
        assert set(taken) == set(np.flatnonzero(is_val))  # a prefix of the seeded order
        assert lengths[is_val].sum() >= 0.2 * lengths.sum()  # enough ...
        assert lengths[taken[:-1]].sum() < 0.2 * lengths.sum()  # ... and no more documents than needed
    assert len({tuple(choose_validation(lengths, 0.2, s)) for s in range(20)}) > 5  # the seed matters


def test_choose_validation_keeps_both_splits_non_empty():
    assert choose_validation([1, 1000], 0.0001, 0).sum() == 1
    assert choose_validation([3, 3, 3], 0.99, 0).sum() == 2
    with pytest.raises(ValueError, match="at least two documents"):
        choose_validation([10], 0.1, 0)


def test_check_output_dir(tmp_path):
    check_output_dir(tmp_path / "new")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="mine is not empty and holds no meta.json"):
        check_output_dir(tmp_path / "mine")
    with pytest.raises(ValueError, match="is a file"):
        check_output_dir(tmp_path / "mine" / "notes.txt")


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def test_writer_splits_whole_documents_with_eos(tmp_path):
    tok = ByteTokenizer()
    texts = [f"document {i}: " + "x" * (i * 7 % 23) for i in range(12)]
    meta = write_shards(tmp_path, [tok.encode(t) for t in texts], val_fraction=0.25, seed=3)
    shards = TokenShards(tmp_path)
    assert shards.meta == json.loads((tmp_path / "meta.json").read_text())
    assert meta["tokenizer"] == {"kind": "byte", "name": "byte", "vocab_size": 257, "eos_id": 256}
    assert (meta["dtype"], meta["val_fraction"], meta["seed"], meta["sources"]) == ("uint16", 0.25, 3, ["test"])
    assert (meta["num_documents"], meta["split_by"]) == (12, "documents")
    assert (tmp_path / "train.bin").stat().st_size == 2 * meta["tokens"]["train"]

    eos = tok.eos_id
    split_docs = {}
    for split in ("train", "val"):
        tokens = shards.tokens(split)
        assert len(tokens) == shards.num_tokens(split) == meta["tokens"][split] and tokens[-1] == eos
        split_docs[split] = tok.decode(tokens[:-1].tolist()).split("<|endoftext|>")
        assert len(split_docs[split]) == meta["documents"][split]
    lengths = np.array([len(t) + 1 for t in texts])
    is_val = choose_validation(lengths, 0.25, 3)
    assert split_docs["val"] == [t for t, v in zip(texts, is_val, strict=True) if v]  # in corpus order
    assert split_docs["train"] == [t for t, v in zip(texts, is_val, strict=True) if not v]
    assert not (tmp_path / "documents.partial").exists()
    assert isinstance(shards.tokenizer, ByteTokenizer)


def test_single_document_gives_its_tail_to_validation(tmp_path):
    ids = list(range(200))
    meta = write_shards(tmp_path, [ids], val_fraction=0.1)
    shards = TokenShards(tmp_path)
    both = np.concatenate([shards.tokens("train"), shards.tokens("val")])
    assert both.tolist() == ids + [256]
    assert shards.num_tokens("val") == math.ceil(0.1 * 201)
    assert (meta["documents"], meta["split_by"]) == ({"train": 1, "val": 1}, "tail of the single document")


def test_large_vocabularies_use_uint32(tmp_path):
    tok = WideTokenizer(70_000)
    meta = write_shards(tmp_path, [[69_000, 5, 68_000], [1, 2]], tokenizer=tok, val_fraction=0.3)
    assert meta["dtype"] == "uint32"
    shards = TokenShards(tmp_path)
    assert sorted([shards.tokens("train").tolist(), shards.tokens("val").tolist()]) == [
        [1, 2, 69_999], [69_000, 5, 68_000, 69_999]]


def test_writer_rejects_bad_documents_and_cleans_up(tmp_path):
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 257\)"):
        write_shards(tmp_path, [[1, 2], [300]])
    with pytest.raises(ValueError, match="no tokens"):
        write_shards(tmp_path, [[]])
    with pytest.raises(ValueError, match="no documents"):
        write_shards(tmp_path, [])
    with pytest.raises(ValueError, match="validation fraction"):
        write_shards(tmp_path, [[1], [2]], val_fraction=1.0)
    assert list(tmp_path.iterdir()) == []  # no partial file left behind


def test_rewriting_a_shard_directory_replaces_it(tmp_path):
    write_shards(tmp_path, [[1] * 50, [2] * 50])
    write_shards(tmp_path, [[3] * 10, [4] * 10, [5] * 10])
    shards = TokenShards(tmp_path)
    assert shards.meta["num_documents"] == 3
    assert set(np.concatenate([shards.tokens("train"), shards.tokens("val")]).tolist()) == {3, 4, 5, 256}


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


@pytest.fixture
def counting_shards(tmp_path):
    """Shards whose tokens are 0, 1, 2, ... in each split (eos = 65535 ends every document)."""
    write_shards(tmp_path, counting_documents([300, 200, 100, 50]), tokenizer=WideTokenizer(65536), val_fraction=0.2)
    return TokenShards(tmp_path)


def test_batch_windows_are_contiguous_and_cover_the_split(counting_shards):
    shards = counting_shards
    tokens = shards.tokens("train")
    for seq_len in (8, len(tokens) - 6):  # many possible starts, then only 6
        windows = np.lib.stride_tricks.sliding_window_view(tokens, seq_len + 1)  # every window of the split
        starts = set()
        for index in range(50):
            batch = shards.batch("train", index, batch_size=4, seq_len=seq_len)
            assert batch.shape == (4, seq_len + 1) and batch.dtype == torch.int64
            for row in batch.numpy():
                matches = np.flatnonzero((windows == row).all(axis=1))
                assert len(matches) == 1
                starts.add(int(matches[0]))
        if seq_len == 8:
            assert len(starts) > 100
        else:
            assert starts == set(range(6))  # every valid start is drawn


def test_batch_is_a_pure_function_of_its_arguments(counting_shards, tmp_path):
    shards = counting_shards
    first = shards.batch("train", 7, 4, 16, seed=1)
    assert torch.equal(first, TokenShards(tmp_path).batch("train", 7, 4, 16, seed=1))  # another reader
    shards.batch("train", 0, 4, 16, seed=1)  # drawing other batches in between changes nothing
    assert torch.equal(first, shards.batch("train", 7, 4, 16, seed=1))
    assert not torch.equal(first, shards.batch("train", 8, 4, 16, seed=1))
    assert not torch.equal(first, shards.batch("train", 7, 4, 16, seed=2))
    assert torch.equal(shards.batch("train", 7, 2, 16, seed=1), first[:2])  # a smaller batch is a prefix
    assert shards.batch("val", 7, 4, 16, seed=1).shape == (4, 17)


def test_reader_errors(counting_shards, tmp_path):
    with pytest.raises(ValueError, match=r"seq_len \+ 1 = \d+ tokens is longer than the val split"):
        counting_shards.batch("val", 0, 1, counting_shards.num_tokens("val"))
    counting_shards.batch("val", 0, 1, counting_shards.num_tokens("val") - 1)  # exactly fits
    with pytest.raises(ValueError, match="unknown split 'test'"):
        counting_shards.batch("test", 0, 1, 4)
    with pytest.raises(ValueError, match="index must be >= 0"):
        counting_shards.batch("train", -1, 1, 4)
    with pytest.raises(ValueError, match="seq_len must be >= 1"):
        counting_shards.batch("train", 0, 1, 0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TokenShards(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no meta.json: prepare it with `bmojo data prepare`"):
        TokenShards(tmp_path / "empty")
    with (tmp_path / "val.bin").open("ab") as file:
        file.write(b"\0\0")
    with pytest.raises(ValueError, match="val.bin is missing or does not hold the"):
        TokenShards(tmp_path)
