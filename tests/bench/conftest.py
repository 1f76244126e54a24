import argparse
import contextlib
import io
import json

import pytest

from bmojo.bench import add_bench_parser


def bench_parser() -> argparse.ArgumentParser:
    """A `bmojo`-like parser holding only `bench` (bmojo.cli adds the other commands)."""
    parser = argparse.ArgumentParser(prog="bmojo")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def run_bench(argv: list[str]) -> tuple[int, str]:
    """Run `bmojo bench ARGV`; returns the exit status and stdout."""
    args = bench_parser().parse_args(["bench", *argv])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = args.func(args)
    return code, out.getvalue()


def last_json(stdout: str) -> dict:
    """The JSON document on the last line of stdout."""
    return json.loads(stdout.rstrip("\n").splitlines()[-1])


@pytest.fixture
def bench():
    """``bench(argv) -> (exit status, stdout)``."""
    return run_bench


@pytest.fixture
def json_line():
    """``json_line(stdout) -> dict``: the last line parsed."""
    return last_json


def _quick(command: str, tmp_path_factory) -> tuple[int, str, object]:
    plot_dir = tmp_path_factory.mktemp(f"bench_{command}")
    code, out = run_bench([command, "--quick", "--json", "--no-progress", "--plot-dir", str(plot_dir)])
    return code, out, plot_dir


@pytest.fixture(scope="session")
def quick_train(tmp_path_factory):
    """``(exit status, stdout, plot dir)`` of `bmojo bench train --quick --json`, run once."""
    return _quick("train", tmp_path_factory)


@pytest.fixture(scope="session")
def quick_decode(tmp_path_factory):
    """``(exit status, stdout, plot dir)`` of `bmojo bench decode --quick --json`, run once."""
    return _quick("decode", tmp_path_factory)
