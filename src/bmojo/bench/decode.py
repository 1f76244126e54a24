"""`bmojo bench decode`: prefill time, per-token decoding latency and cache bytes per sequence of every
architecture at matched parameters, by context length.

One run, for one architecture and a context of ``N`` tokens: an empty cache (a full-attention layer's
KV buffer sized for ``N + --decode-steps`` positions, so it never regrows while timed); the prefill, one
parallel forward of ``N`` random tokens that fills the cache (timed); then ``--decode-steps`` calls of
``model.step``, each decoding the previous step's greedy token, timed together: the latency at context
``N`` is their mean, measured with ``N`` to ``N + steps - 1`` tokens in the cache. Every (context, architecture) run
is interleaved with all the others (:func:`~bmojo.bench.common.run_interleaved`: one round runs each
once), so a machine that speeds up or slows down during the benchmark moves every context alike;
median and range over ``--repeats`` rounds. Batch 1, fp32 weights, no gradients.

``x N0``: an architecture's per-token latency at ``N`` over its latency at the shortest context ``N0``,
both from the same round, median over rounds (the issue's "latency at 32K ≤ 1.15× the latency at 1K").
Measured one context after the other, a slowdown of the machine between them reads as a latency that
grows with the context (docs/performance.md, "Where the issue's targets stand").

The prefill is the model's own parallel forward, one call over the whole context. Its memory grows
linearly with ``N`` where SDPA has a fused kernel for the shapes (the CPU's flash kernel; on CUDA,
head dims that are multiples of 4 in fp32, of 8 in bf16) and the other mixers chunk their work, plus the
``[N, vocab]`` logits; full causal attention in fp32 with other head dims runs SDPA's math kernel,
whose ``[H, N, N]`` scores grow with ``N²``. Cache bytes: the tensors of
``model.new_cache(1, max_seq_len=N)``; full attention's grow with ``N``, the others' are fixed.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bmojo.bench.common import (
    Spread,
    add_common_arguments,
    common_settings,
    flag_or_preset,
    format_bytes,
    line_plot,
    machine_info,
    matched_configs,
    paired_ratio,
    parse_int_list,
    print_json,
    progress_bar,
    require_at_least,
    resolve_device,
    run_interleaved,
    timed,
)
from bmojo.models.lm import LanguageModel

DEFAULTS = {"contexts": "1024,4096,16384,65536", "decode_steps": 32, "repeats": 3}
QUICK = {"contexts": "16,48", "decode_steps": 4, "repeats": 2}
PLOT_FILE = "decode_latency.png"


@dataclass
class DecodeSettings:
    """The checked flags of `bench decode`."""

    archs: list[str]
    size: str
    shapes: dict[str, Any]
    vocab: int
    contexts: list[int]
    decode_steps: int
    repeats: int
    warmup: int
    seed: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DecodeSettings:
        """``ValueError`` (one line, naming the flag) for any bad value."""
        preset = QUICK if args.quick else DEFAULTS
        return cls(
            **common_settings(args, preset),
            contexts=parse_int_list(flag_or_preset(args, preset, "contexts"), "--contexts"),
            decode_steps=require_at_least(flag_or_preset(args, preset, "decode_steps"), 1, "--decode-steps"),
        )


@dataclass
class DecodeResult:
    """One architecture at one context length."""

    arch: str
    context: int
    prefill_s: Spread
    decode_ms_per_token: Spread
    decode_ratio_to_shortest: float  # median over rounds of latency at `context` / latency at the shortest context
    cache_bytes: int  # per sequence, holding `context` tokens


def add_decode_parser(subparsers) -> None:
    parser = subparsers.add_parser("decode", help="prefill time, per-token decode latency and cache bytes per "
                                                  "architecture, by context length",
                                   description="Prefill time, per-token decoding latency after a prefill of N "
                                               "tokens, and cache bytes per sequence, of every architecture at "
                                               "matched parameters.")
    parser.add_argument("--contexts", default=None,
                        help=f"comma-separated context lengths N (default: {DEFAULTS['contexts']})")
    parser.add_argument("--decode-steps", type=int, default=None,
                        help=f"tokens decoded and timed after each prefill (default: {DEFAULTS['decode_steps']})")
    add_common_arguments(parser, default_repeats=DEFAULTS["repeats"])
    parser.set_defaults(func=run_decode)


def make_decode_run(model: LanguageModel, prompt: Tensor, steps: int) -> Callable[[], tuple[float, float]]:
    """A closure running one prefill of ``prompt [1, N]`` and ``steps`` decoding steps (module docstring);
    it returns ``(prefill seconds, decoding seconds per token)``."""
    device = prompt.device

    def run() -> tuple[float, float]:
        cache = model.new_cache(1, max_seq_len=prompt.shape[1] + steps)
        last_logits: list[Tensor] = []
        with torch.no_grad():
            prefill_s = timed(lambda: last_logits.append(model(prompt, cache=cache).logits[:, -1]), device)
            token = last_logits[0].argmax(-1)

            def decode() -> None:
                nonlocal token
                for _ in range(steps):
                    token = model.step(token, cache).argmax(-1)

            decode_s = timed(decode, device)
        return prefill_s, decode_s / steps

    return run


def benchmark_decode(settings: DecodeSettings, device: torch.device, progress: bool = True
                     ) -> tuple[dict[str, LanguageModel], list[DecodeResult]]:
    """Build the models and measure every (context, arch) pair. Returns the models and the results."""
    configs = matched_configs(settings.archs, settings.shapes, settings.vocab)
    torch.manual_seed(settings.seed)
    models = {arch: LanguageModel(config).to(device).eval() for arch, config in configs.items()}
    generator = torch.Generator().manual_seed(settings.seed)
    prompts = {n: torch.randint(0, settings.vocab, (1, n), generator=generator).to(device) for n in settings.contexts}
    runners = {(n, arch): make_decode_run(model, prompts[n], settings.decode_steps)
               for n in settings.contexts for arch, model in models.items()}
    with progress_bar(len(runners) * (settings.warmup + settings.repeats), "bench decode", progress) as bar:
        measured = run_interleaved(runners, settings.repeats, settings.warmup, on_run=bar.update)
    shortest = min(settings.contexts)
    results: list[DecodeResult] = []
    for (n, arch), runs in measured.items():
        prefill, per_token = zip(*runs, strict=True)
        per_token_shortest = [per_token_s for _, per_token_s in measured[shortest, arch]]
        cache_bytes = models[arch].new_cache(1, device="meta", max_seq_len=n).nbytes()
        results.append(DecodeResult(arch=arch, context=n, prefill_s=Spread.of(prefill),
                                    decode_ms_per_token=Spread.of(per_token).scaled(1e3),
                                    decode_ratio_to_shortest=paired_ratio(per_token, per_token_shortest),
                                    cache_bytes=cache_bytes))
    return models, results


ROW = "{:>7}  {:<12} {:>28}  {:>28}  {:>10}  {:>12}"


def format_table(results: list[DecodeResult]) -> str:
    shortest = min(r.context for r in results)
    lines = [ROW.format("N", "arch", "prefill s median [min-max]", "decode ms/token [min-max]", f"x N={shortest}",
                        "cache/seq")]
    for r in results:
        lines.append(ROW.format(r.context, r.arch, r.prefill_s.format(3), r.decode_ms_per_token.format(2),
                                f"{r.decode_ratio_to_shortest:.2f}x", format_bytes(r.cache_bytes)))
    return "\n".join(lines)


def plot_decode(results: list[DecodeResult], path: Path) -> None:
    """Decode latency, prefill time and cache bytes against context, one line per architecture."""
    panels = []
    for title, ylabel, value in (
        ("decoding", "ms per token (median)", lambda r: r.decode_ms_per_token.median),
        ("prefill", "seconds (median)", lambda r: r.prefill_s.median),
        ("cache", "MiB per sequence", lambda r: r.cache_bytes / 2**20),
    ):
        lines: dict[str, tuple[list[float], list[float]]] = {}
        for r in results:
            xs, ys = lines.setdefault(r.arch, ([], []))
            xs.append(r.context)
            ys.append(value(r))
        panels.append((title, ylabel, lines))
    line_plot(path, panels, "context N (tokens in the cache)", "Decoding at matched parameters")


def run_decode(args: argparse.Namespace) -> int:
    """`bmojo bench decode`: the table, a plot, and with ``--json`` the JSON document last."""
    settings = DecodeSettings.from_args(args)
    device = resolve_device(args.device)
    info = machine_info(device)
    print(f"torch {info['torch']}, device {info['device']} ({info['device_name']}), {info['threads']} threads; "
          f"shapes {settings.size} (widths matched to bmojo's parameters), vocab {settings.vocab}, batch 1, "
          f"{settings.decode_steps} decoded tokens per run, {settings.repeats} repeats, {settings.warmup} warmup",
          flush=True)
    print(f"allocator: {info['allocator']}", flush=True)
    models, results = benchmark_decode(settings, device, progress=not args.no_progress)
    for arch, model in models.items():
        print(f"{arch:<12} {model.num_params():>11,} params  d_model {model.config.d_model}")
    print("decode: mean over the decoded tokens after a prefill of N tokens; x N0: that latency over the same "
          "architecture's at the shortest context N0, per round, median; cache: bytes per sequence at N\n")
    print(format_table(results))
    plot_path = Path(args.plot_dir) / PLOT_FILE
    plot_decode(results, plot_path)
    print(f"\nwrote {plot_path}")
    if args.json:
        print_json({
            "command": "bench decode", **info,
            "settings": {"archs": settings.archs, "size": settings.size, "shapes": settings.shapes,
                         "vocab": settings.vocab, "contexts": settings.contexts,
                         "ratio_reference_context": min(settings.contexts),
                         "decode_steps": settings.decode_steps, "repeats": settings.repeats,
                         "warmup": settings.warmup, "seed": settings.seed},
            "models": {arch: {"params": m.num_params(), "d_model": m.config.d_model} for arch, m in models.items()},
            "results": [vars(r) for r in results],
            "plot": str(plot_path),
        })
    return 0
