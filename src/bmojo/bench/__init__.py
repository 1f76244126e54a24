"""`bmojo bench`: performance of the architectures and of the ops.

- ``bmojo bench train``: forward+backward tokens/s, peak memory and achieved FLOP/s at matched
  parameters, by sequence length and precision (:mod:`bmojo.bench.train`);
- ``bmojo bench decode``: prefill time, per-token decoding latency and cache bytes, by context
  length (:mod:`bmojo.bench.decode`);
- ``bmojo bench context``: the process's memory (RSS) while B'MOJO with storage reads a long
  context by chunked prefill, by context length (:mod:`bmojo.bench.context`);
- ``bmojo bench ops``: the fast SSD and attention paths against their references
  (:mod:`bmojo.bench.ops`).

Each subcommand has ``--quick`` (seconds) and ``--json`` (one JSON document on the last line of
stdout); those that time architectures take ``--device`` and time them interleaved in one process.
"""

from __future__ import annotations

__all__ = ["add_bench_parser"]


def add_bench_parser(subparsers) -> None:
    """Add ``bench {train,decode,context,ops}`` to the ``subparsers`` of the `bmojo` command line; each subcommand
    sets ``func`` to a function of the parsed arguments returning the exit status (0), and raises
    ``ValueError`` with a one-line message for bad input."""
    # Imported here, so that `python -m bmojo.bench.ops` does not find its module already imported.
    from bmojo.bench.context import add_context_parser
    from bmojo.bench.decode import add_decode_parser
    from bmojo.bench.ops import add_ops_parser
    from bmojo.bench.train import add_train_parser

    bench = subparsers.add_parser("bench", help="performance: training throughput, decoding latency, memory with "
                                                "storage, op timings",
                                  description="Performance of the architectures and of the ops.")
    commands = bench.add_subparsers(dest="bench_command", required=True, metavar="{train,decode,context,ops}")
    add_train_parser(commands)
    add_decode_parser(commands)
    add_context_parser(commands)
    add_ops_parser(commands)
