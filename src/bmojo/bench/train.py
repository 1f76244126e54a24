"""`bmojo bench train`: forward+backward throughput (tokens/s), peak memory and achieved FLOP/s of every
architecture at matched parameters, by sequence length and precision.

For each precision and length, every architecture first runs one step whose peak memory is measured
(:mod:`bmojo.bench.memory`; also the first warm-up), then ``--warmup`` untimed and ``--repeats`` timed
steps interleaved with the other architectures' (:func:`~bmojo.bench.common.run_interleaved`). A step is
the trainer's: forward under the precision's autocast, cross-entropy plus the auxiliary loss, backward,
gradients dropped; no optimizer update. The ratio to transformer is the median, over repetitions, of
``transformer step time / arch step time`` within the same round (> 1: faster than transformer).
FLOP/s and utilisation: :mod:`bmojo.bench.flops`.

With ``--compile`` every model runs under ``torch.compile`` (the whole model, inductor), compiled anew
for each precision and length in one more untimed step before the memory step, so that the memory and
the times are those of the compiled steps: what kernel fusion by ``torch.compile`` gains, for every
architecture alike.

``--kernel torch,triton`` times each architecture with windowed attention or an SSD (W, F, B, S
layers) twice, with PyTorch's ops (labelled ``arch``) and with the Triton kernels of the union
attention and the SSD scan (``arch+triton``: ``attention_kernel`` and ``ssd_kernel`` both
``"triton"``; CUDA), interleaved like the other architectures: what the kernels gain in a step.
``bmojo bench ops`` times each op's kernels on its own.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bmojo.bench.common import (
    REFERENCE_ARCH,
    Spread,
    add_common_arguments,
    common_settings,
    flag_or_preset,
    format_bytes,
    line_plot,
    machine_info,
    matched_configs,
    paired_ratio,
    parse_choices,
    parse_int_list,
    print_json,
    progress_bar,
    require_at_least,
    resolve_device,
    run_interleaved,
    timed,
)
from bmojo.bench.flops import PRECISION_DTYPES, matmul_throughput, train_step_flops
from bmojo.bench.memory import peak_bytes, peak_memory_measure
from bmojo.compilation import compile_static
from bmojo.config import ModelConfig
from bmojo.device import triton_unavailable
from bmojo.models.lm import LanguageModel
from bmojo.ops.attention import ATTENTION_KERNELS
from bmojo.ops.ssd import SSD_KERNELS

DEFAULTS = {"lengths": "512,1024,2048,4096,8192,16384", "batch": 1, "precision": "bf16,fp32", "repeats": 5,
            "matmul_size": 2048}
QUICK = {"lengths": "32,64", "batch": 1, "precision": "fp32,bf16", "repeats": 2, "matmul_size": 64}
PLOT_FILE = "train_throughput.png"


@dataclass
class TrainSettings:
    """The checked flags of `bench train`."""

    archs: list[str]
    size: str
    shapes: dict[str, Any]
    vocab: int
    lengths: list[int]
    batch: int
    precisions: list[str]
    repeats: int
    warmup: int
    matmul_size: int
    seed: int
    compile: bool
    kernels: list[str]  # "torch" and/or "triton": both attention_kernel and ssd_kernel

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainSettings:
        """``ValueError`` (one line, naming the flag) for any bad value."""
        preset = QUICK if args.quick else DEFAULTS
        return cls(
            **common_settings(args, preset),
            lengths=parse_int_list(flag_or_preset(args, preset, "lengths"), "--lengths"),
            batch=require_at_least(flag_or_preset(args, preset, "batch"), 1, "--batch"),
            precisions=parse_choices(flag_or_preset(args, preset, "precision"), "--precision", PRECISION_DTYPES),
            matmul_size=require_at_least(flag_or_preset(args, preset, "matmul_size"), 1, "--matmul-size"),
            compile=args.compile,
            kernels=parse_choices(args.kernel, "--kernel", KERNELS),
        )


@dataclass
class TrainResult:
    """One architecture at one precision and length."""

    arch: str
    precision: str
    length: int
    batch: int
    step_s: Spread
    tokens_per_s: Spread
    ratio_to_transformer: float | None  # None when transformer was not run
    peak_bytes: int
    flops_per_step: int
    achieved_flops: float  # FLOPs / median step time
    utilisation: float  # achieved_flops / median matmul throughput in this precision


def add_train_parser(subparsers) -> None:
    parser = subparsers.add_parser("train", help="forward+backward tokens/s, peak memory and FLOP/s per "
                                                 "architecture at matched parameters",
                                   description="Forward+backward throughput, peak memory and achieved FLOP/s of "
                                               "every architecture at matched parameters, by length and precision.")
    parser.add_argument("--lengths", default=None, help=f"comma-separated sequence lengths "
                                                        f"(default: {DEFAULTS['lengths']})")
    parser.add_argument("--batch", type=int, default=None, help=f"sequences per step (default: {DEFAULTS['batch']})")
    parser.add_argument("--precision", default=None,
                        help=f"comma-separated: bf16 (autocast), fp32 (default: {DEFAULTS['precision']})")
    parser.add_argument("--matmul-size", type=int, default=None,
                        help=f"side of the square matmul that measures the machine's FLOP/s; a small one "
                             f"underestimates the peak (utilisation over 100%%) (default: {DEFAULTS['matmul_size']})")
    parser.add_argument("--compile", action="store_true",
                        help="time every model under torch.compile (inductor), compiled for each precision and "
                             "length in an extra untimed step; on CPU this needs a C++ compiler")
    parser.add_argument("--kernel", default="torch",
                        help="comma-separated: torch, triton (CUDA): the parallel forms of the windowed attention "
                             "and the SSD scan; with both, architectures with either run once with each "
                             "(default: %(default)s)")
    add_common_arguments(parser, default_repeats=DEFAULTS["repeats"])
    parser.set_defaults(func=run_train)


def make_train_step(model: nn.Module, tokens: torch.Tensor, precision: str) -> Callable[[], None]:
    """A closure running one training step of ``model`` (a :class:`LanguageModel`, or one compiled with
    ``torch.compile``) on ``tokens [B, L+1]`` (module docstring)."""
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    device_type = tokens.device.type

    def step() -> None:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(inputs)
            loss = F.cross_entropy(out.logits.float().flatten(0, 1), labels.flatten())
        (loss + out.aux_loss).backward()
        model.zero_grad(set_to_none=True)

    return step


def compiled_models(models: dict[str, LanguageModel], device: torch.device) -> dict[str, nn.Module]:
    """Each model under a fresh ``torch.compile`` (static shapes), after dropping every graph compiled
    before: a new precision or length compiles anew, never against the recompilation limit."""
    torch.compiler.reset()
    return {arch: compile_static(model, device, "--compile") for arch, model in models.items()}


KERNELS = tuple(kernel for kernel in ATTENTION_KERNELS if kernel in SSD_KERNELS)


def has_kernels(config: ModelConfig) -> bool:
    """Whether ``config`` has layers whose parallel form ``attention_kernel`` or ``ssd_kernel``
    picks (windowed attention in W, F, B; the SSD in S, F, B)."""
    return bool(set(config.layer_pattern) & set("WFBS"))


def with_kernels(configs: dict[str, ModelConfig], kernels: list[str]) -> dict[str, ModelConfig]:
    """The configs to time, by label: each architecture with windowed attention or an SSD once per
    kernel (``arch`` for ``torch``, ``arch+triton`` for ``triton``), the others once."""
    labelled = {}
    for arch, config in configs.items():
        for kernel in kernels if has_kernels(config) else kernels[:1]:
            label = arch if kernel == "torch" or not has_kernels(config) else f"{arch}+{kernel}"
            labelled[label] = dataclasses.replace(config, attention_kernel=kernel, ssd_kernel=kernel)
    return labelled


def require_kernels(kernels: list[str], device: torch.device) -> None:
    """``ValueError`` (one line) when ``--kernel triton`` cannot run on ``device``."""
    reason = triton_unavailable(device) if "triton" in kernels else None
    if reason:
        raise ValueError(f"--kernel triton: {reason}")


def benchmark_train(settings: TrainSettings, device: torch.device, progress: bool = True
                    ) -> tuple[dict[str, LanguageModel], dict[str, Spread], list[TrainResult]]:
    """Build the models, measure the matmul throughput and every (precision, length, arch) step.
    Returns the models, the matmul FLOP/s per precision and the results."""
    configs = with_kernels(matched_configs(settings.archs, settings.shapes, settings.vocab), settings.kernels)
    torch.manual_seed(settings.seed)
    models = {arch: LanguageModel(config).to(device) for arch, config in configs.items()}
    matmul = {p: matmul_throughput(device, p, settings.matmul_size, settings.repeats, settings.warmup)
              for p in settings.precisions}
    generator = torch.Generator().manual_seed(settings.seed)
    runs = len(settings.precisions) * len(settings.lengths) * len(models) * (1 + settings.warmup + settings.repeats)
    results: list[TrainResult] = []
    with progress_bar(runs, "bench train", progress) as bar:
        for precision in settings.precisions:
            for length in settings.lengths:
                tokens = torch.randint(0, settings.vocab, (settings.batch, length + 1), generator=generator).to(device)
                runnable = compiled_models(models, device) if settings.compile else models
                steps = {arch: make_train_step(model, tokens, precision) for arch, model in runnable.items()}
                peaks = {}
                for arch, step in steps.items():
                    if settings.compile:
                        bar.set_postfix_str(f"{precision} L={length} {arch} (compiling)")
                        step()
                    bar.set_postfix_str(f"{precision} L={length} {arch} (memory)")
                    peaks[arch] = peak_bytes(step, device)
                    bar.update()
                bar.set_postfix_str(f"{precision} L={length} (timing)")
                times = run_interleaved({arch: lambda step=step: timed(step, device) for arch, step in steps.items()},
                                        settings.repeats, settings.warmup, on_run=bar.update)
                for arch in models:
                    step_s = Spread.of(times[arch])
                    flops = train_step_flops(configs[arch], settings.batch, length)
                    achieved = flops / step_s.median
                    ratio = paired_ratio(times[REFERENCE_ARCH], times[arch]) if REFERENCE_ARCH in times else None
                    results.append(TrainResult(
                        arch=arch, precision=precision, length=length, batch=settings.batch, step_s=step_s,
                        tokens_per_s=step_s.inverse(settings.batch * length), ratio_to_transformer=ratio,
                        peak_bytes=peaks[arch], flops_per_step=flops, achieved_flops=achieved,
                        utilisation=achieved / matmul[precision].median))
    return models, matmul, results


ROW = "{:<6} {:>6}  {:<14} {:>34}  {:>9}  {:>12}  {:>10}  {:>6}"


def format_table(results: list[TrainResult]) -> str:
    lines = [ROW.format("prec", "L", "arch", "tokens/s median [min-max]", "x transf.", "peak memory", "GFLOP/s",
                        "util")]
    for r in results:
        ratio = "n/a" if r.ratio_to_transformer is None else f"{r.ratio_to_transformer:.2f}x"
        lines.append(ROW.format(r.precision, r.length, r.arch, r.tokens_per_s.format(1), ratio,
                                format_bytes(r.peak_bytes), f"{r.achieved_flops / 1e9:.2f}",
                                f"{100 * r.utilisation:.1f}%"))
    return "\n".join(lines)


def plot_throughput(results: list[TrainResult], path: Path) -> None:
    """Tokens/s against sequence length, one panel per precision, one line per architecture."""
    panels = []
    for precision in dict.fromkeys(r.precision for r in results):
        lines: dict[str, tuple[list[float], list[float]]] = {}
        for r in results:
            if r.precision == precision:
                xs, ys = lines.setdefault(r.arch, ([], []))
                xs.append(r.length)
                ys.append(r.tokens_per_s.median)
        panels.append((precision, "training tokens/s (forward+backward, median)", lines))
    line_plot(path, panels, "sequence length (tokens)", "Training throughput at matched parameters")


def run_train(args: argparse.Namespace) -> int:
    """`bmojo bench train`: the table, a plot, and with ``--json`` the JSON document last."""
    settings = TrainSettings.from_args(args)
    device = resolve_device(args.device)
    require_kernels(settings.kernels, device)
    info = machine_info(device)
    print(f"torch {info['torch']}, device {info['device']} ({info['device_name']}), {info['threads']} threads; "
          f"shapes {settings.size} (widths matched to bmojo's parameters), vocab {settings.vocab}, "
          f"batch {settings.batch}, {settings.repeats} repeats, {settings.warmup} warmup", flush=True)
    print("models: " + ("torch.compile (inductor, static shapes), compiled in an untimed step before the "
                        "memory step of each precision and length" if settings.compile else "eager"), flush=True)
    print("windowed attention and SSD: " + " and ".join({"torch": "PyTorch ops", "triton": "Triton kernels (label "
                                                         "+triton)"}[kernel] for kernel in settings.kernels),
          flush=True)
    print(f"allocator: {info['allocator']}", flush=True)
    models, matmul, results = benchmark_train(settings, device, progress=not args.no_progress)
    for arch, model in models.items():
        print(f"{arch:<14} {model.num_params():>11,} params  d_model {model.config.d_model}")
    for precision, spread in matmul.items():
        print(f"matmul {settings.matmul_size}x{settings.matmul_size} {precision}: "
              f"{spread.scaled(1e-9).format()} GFLOP/s")
    print(f"peak memory: {peak_memory_measure(device)}; weights and inputs held before it are not counted")
    print("ratio: median of transformer/arch step time per interleaved round; util: FLOP/s (bmojo.bench.flops) "
          "over matmul FLOP/s in the same precision\n")
    print(format_table(results))
    plot_path = Path(args.plot_dir) / PLOT_FILE
    plot_throughput(results, plot_path)
    print(f"\nwrote {plot_path}")
    if args.json:
        print_json({
            "command": "bench train", **info,
            "settings": {"archs": settings.archs, "size": settings.size, "shapes": settings.shapes,
                         "vocab": settings.vocab, "lengths": settings.lengths, "batch": settings.batch,
                         "precisions": settings.precisions, "repeats": settings.repeats,
                         "warmup": settings.warmup, "matmul_size": settings.matmul_size, "seed": settings.seed,
                         "compile": settings.compile, "kernels": settings.kernels},
            "models": {arch: {"params": m.num_params(), "d_model": m.config.d_model} for arch, m in models.items()},
            "matmul_flops": matmul,
            "peak_memory": peak_memory_measure(device),
            "results": [vars(r) for r in results],
            "plot": str(plot_path),
        })
    return 0
