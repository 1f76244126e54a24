"""`bmojo bench context`: the memory of the process while a B'MOJO model with storage (DESIGN.md §5)
reads a long context, by context length.

One sequence of random tokens is fed through one cache by chunked prefill (DESIGN.md §7): pieces of
``--piece`` tokens, each continuing the cache in parallel, exactly as decoding them one by one would.
At each of ``--lengths`` the process's memory is read from ``/proc/self/status`` (Linux): ``VmRSS``
(resident), ``RssAnon`` (the process's own memory: heap and tensors), ``RssFile`` (mapped file pages:
libraries and a disk store's pages, which the kernel can write back and drop) and ``VmHWM`` (peak
resident). Also the decoding state's bytes (:meth:`~bmojo.models.cache.ModelCache.nbytes`, fixed),
the stores' bytes (allocated records; they grow by doubling), the stores' block index (summaries, in
RAM wherever the records are) and the tokens/s of the pieces since the previous length. With
``--storage-dir`` the stores are memory-mapped files there, else in RAM. Each row is printed when
measured.

The model is a checkpoint (``--ckpt``) or the `bmojo` preset at ``--size`` with random weights (memory
does not depend on the weights), with storage ``r = --storage-blocks`` blocks of ``--storage-block-size``
tokens on every B'MOJO layer. Batch 1, fp32, no gradients, CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from bmojo.bench.common import (
    DEFAULT_SIZE,
    DEFAULT_VOCAB,
    QUICK_SHAPES,
    format_bytes,
    machine_info,
    parse_int_list,
    print_json,
    progress_bar,
    require_at_least,
)
from bmojo.config import LM_SIZES, ModelConfig
from bmojo.evaluation.ablation import with_settings
from bmojo.models.lm import LanguageModel

DEFAULTS = {"lengths": "16384,65536,262144,1048576", "piece": 4096}
QUICK = {"lengths": "256,1024", "piece": 128}
STATUS_FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")
STATUS_FILE = Path("/proc/self/status")


@dataclass
class ContextRow:
    context: int
    vm_rss: int  # bytes
    rss_anon: int
    rss_file: int
    vm_hwm: int
    cache_bytes: int
    store_bytes: int
    index_bytes: int
    tokens_per_s: float  # of the pieces since the previous row


def process_memory() -> dict[str, int]:
    """``VmRSS, RssAnon, RssFile, VmHWM`` of this process in bytes, from ``/proc/self/status``."""
    values = {}
    for line in STATUS_FILE.read_text().splitlines():
        key, _, value = line.partition(":")
        if key in STATUS_FIELDS:
            values[key] = int(value.split()[0]) * 1024  # the file says kB
    return values


def add_context_parser(subparsers) -> None:
    parser = subparsers.add_parser("context", help="process memory (RSS) of B'MOJO with storage, by context length",
                                   description="Feed one long sequence through a B'MOJO model with storage by "
                                               "chunked prefill and report the process's memory at each length.")
    parser.add_argument("--ckpt", default=None, help="a checkpoint directory (default: the bmojo preset at --size, "
                                                     "random weights)")
    parser.add_argument("--size", default=None,
                        help=f"shapes from LM_SIZES, one of {','.join(LM_SIZES)} (default: {DEFAULT_SIZE})")
    parser.add_argument("--storage-blocks", type=int, default=4, help="blocks r retrieved per chunk (default: 4)")
    parser.add_argument("--storage-block-size", type=int, default=None,
                        help="tokens per stored block (default: the model's chunk size)")
    parser.add_argument("--storage-dir", default=None, help="keep the stores in memory-mapped files here "
                                                            "(default: in RAM)")
    parser.add_argument("--lengths", default=None, help=f"comma-separated context lengths at which memory is read "
                                                        f"(default: {DEFAULTS['lengths']})")
    parser.add_argument("--piece", type=int, default=None,
                        help=f"tokens per chunked-prefill call (default: {DEFAULTS['piece']})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and tokens (default: 0)")
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON document on the last line")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and lengths, a few seconds")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    # It measures the process's memory: with glibc's default allocator freed large blocks go back
    # to the system at once, so RssAnon is what is live (bmojo.allocator; docs/storage.md).
    parser.set_defaults(func=run_context, keep_freed_memory=False)


def build_model(args: argparse.Namespace) -> LanguageModel:
    """The model of the run, with storage set on its B'MOJO layers."""
    if args.ckpt is not None:
        if args.size is not None or args.quick:
            raise ValueError("--ckpt gives the model: drop --size and --quick")
        model = LanguageModel.from_pretrained(args.ckpt)
    else:
        if args.quick and args.size is not None:
            raise ValueError("--quick uses its own tiny shapes; drop --size")
        name = args.size or DEFAULT_SIZE
        if name not in LM_SIZES:
            raise ValueError(f"--size: unknown size {name!r}; choose from {','.join(LM_SIZES)}")
        shapes = QUICK_SHAPES if args.quick else LM_SIZES[name]
        torch.manual_seed(args.seed)
        model = LanguageModel(ModelConfig.preset("bmojo", **shapes, vocab_size=DEFAULT_VOCAB))
    if "B" not in model.config.layer_kinds:
        raise ValueError(f"{args.ckpt}: the model has no B'MOJO layer with eidetic memory to give storage to")
    block = args.storage_block_size or model.config.chunk_size
    require_at_least(args.storage_blocks, 1, "--storage-blocks")
    require_at_least(block, 1, "--storage-block-size")
    return with_settings(model, storage_blocks=args.storage_blocks, storage_block_size=block).eval()


def measure_context(model: LanguageModel, lengths: list[int], piece: int, storage_dir: str | None, seed: int,
                    progress: bool = True, on_row: Callable[[ContextRow], None] | None = None) -> list[ContextRow]:
    """Chunked prefill of ``max(lengths)`` random tokens; one row at each of ``lengths``, each
    passed to ``on_row`` (with a progress bar, under it) as soon as it is measured."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.config.vocab_size, (1, max(lengths)), generator=generator)
    rows = []
    with torch.inference_mode(), progress_bar(max(lengths), "bench context", progress) as bar:
        cache = model.new_cache(1, storage_dir=storage_dir)
        position, since = 0, time.perf_counter()
        for length in sorted(lengths):
            start_position = position
            while position < length:
                end = min(position + piece, length)
                model(tokens[:, position:end], cache)
                bar.update(end - position)
                position = end
            now = time.perf_counter()
            memory = process_memory()
            rows.append(ContextRow(context=length, vm_rss=memory["VmRSS"], rss_anon=memory["RssAnon"],
                                   rss_file=memory["RssFile"], vm_hwm=memory["VmHWM"], cache_bytes=cache.nbytes(),
                                   store_bytes=cache.store_nbytes(),
                                   index_bytes=sum(store.index_nbytes() for store in cache.stores()),
                                   tokens_per_s=(length - start_position) / (now - since)))
            if on_row is not None:
                on_row(rows[-1])
            since = now
    return rows


ROW = "{:>9}  {:>9}  {:>9}  {:>9}  {:>9}  {:>10}  {:>10}  {:>10}  {:>9}"
HEADER = (ROW.format("context", "VmRSS", "RssAnon", "RssFile", "VmHWM", "cache", "store", "index", "tok/s") + "\n"
          + ROW.format("", "MiB", "MiB", "MiB", "MiB", "", "", "", ""))


def format_row(r: ContextRow) -> str:
    mib = 2**20
    return ROW.format(r.context, f"{r.vm_rss / mib:.0f}", f"{r.rss_anon / mib:.0f}", f"{r.rss_file / mib:.0f}",
                      f"{r.vm_hwm / mib:.0f}", format_bytes(r.cache_bytes), format_bytes(r.store_bytes),
                      format_bytes(r.index_bytes), f"{r.tokens_per_s:.0f}")


def run_context(args: argparse.Namespace) -> int:
    if not STATUS_FILE.is_file():
        raise ValueError(f"bench context reads the process's memory from {STATUS_FILE} (Linux); it is not here")
    preset = QUICK if args.quick else DEFAULTS
    lengths = parse_int_list(args.lengths or preset["lengths"], "--lengths")
    piece = require_at_least(args.piece or preset["piece"], 1, "--piece")
    model = build_model(args)
    config = model.config
    print(f"bmojo bench context: {config.layer_pattern} x{config.n_layers} d_model={config.d_model} "
          f"W={config.window} F={config.fading_span} C={config.chunk_size} M={config.eidetic_capacity} "
          f"r={config.storage_blocks} S={config.storage_block_size}, store "
          f"{'on disk in ' + args.storage_dir if args.storage_dir else 'in RAM'}, pieces of {piece} tokens",
          file=sys.stderr if args.json else sys.stdout)
    print(HEADER, flush=True)
    rows = measure_context(model, lengths, piece, args.storage_dir, args.seed, progress=not args.no_progress,
                           on_row=lambda row: tqdm.write(format_row(row), file=sys.stdout))
    if args.json:
        document: dict[str, Any] = {
            "command": "bench context", **machine_info(torch.device("cpu")),
            "settings": {"ckpt": args.ckpt, "config": config.to_dict(), "lengths": lengths, "piece": piece,
                         "storage_dir": args.storage_dir, "seed": args.seed},
            "rows": [asdict(r) for r in rows],
        }
        print_json(document)
    return 0
