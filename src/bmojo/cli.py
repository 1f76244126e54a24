"""The `bmojo` command line."""

from __future__ import annotations

import argparse
import sys

import torch

from bmojo import __version__


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def cmd_demo(args: argparse.Namespace) -> int:
    from bmojo.smoke import format_table, smoke_all

    device = torch.device(args.device) if args.device else None
    results = smoke_all(steps=args.steps, batch=args.batch, seq_len=args.seq_len,
                        decode_tokens=args.decode_tokens, device=device)
    print(format_table(results))
    not_learning = [r.arch for r in results if not r.last_loss < r.first_loss]
    if not_learning:
        print(f"error: loss did not decrease for {not_learning}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bmojo", description="B'MOJO hybrid state-space language models.")
    parser.add_argument("--version", action="version", version=f"bmojo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="build, train a few steps and decode every preset architecture",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("--steps", type=positive_int, default=30, help="training steps per architecture")
    demo.add_argument("--batch", type=positive_int, default=4, help="sequences per step")
    demo.add_argument("--seq-len", type=positive_int, default=96, help="tokens per sequence")
    demo.add_argument("--decode-tokens", type=positive_int, default=16, help="tokens decoded after training")
    demo.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
