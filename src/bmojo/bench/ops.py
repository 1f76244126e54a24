"""Benchmark of the fast paths of ``bmojo.ops`` against their references.

For each sequence length L it times, forward (under ``torch.no_grad``) and forward+backward:

- the SSD scan: ``ssd_chunked`` (fast) vs ``ssd_sequential`` (baseline, a Python loop);
- the union attention: ``union_attention_chunked`` (fast) vs ``union_attention_reference``
  (baseline, dense L x L scores), as a B'MOJO layer calls it (raw window, fading tokens and
  eidetic memory), as plain sliding-window attention, and as full causal attention;
- plain sliding-window attention (W=64) as ``union_attention_chunked`` runs it (one
  band-masked SDPA up to ``max(256, 4W)`` positions, query blocks beyond) vs always in
  query blocks (``union_attention_blocks``, the baseline): the measurement behind
  :func:`bmojo.ops.attention.dense_window_is_faster`;
- the Mamba-2 block's causal depthwise convolution (``K = 4`` over the ``x, B, C`` channels
  of the SSD case's layer): ``causal_depthwise_conv1d`` (fast) vs PyTorch's grouped
  ``conv1d`` (baseline, ``causal_depthwise_conv1d_reference``);
- on CUDA with triton installed, the union attention's Triton kernels
  (``union_attention_triton``, fast) vs ``union_attention_chunked`` (baseline), as a B'MOJO
  layer calls it and as plain sliding-window attention, in float32 and bfloat16; and the SSD
  scan's Triton kernels (``ssd_chunked(kernel="triton")``, fast) vs its PyTorch scan (baseline),
  at the models' chunk (``SSD_CHUNK_SIZE``) and at twice it.

Baseline and fast path run alternately in the same loop, so that machine noise hits both.
Each row gives the median and the spread (min-max) in ms, and the ratio
baseline median / fast median, followed by a verdict on the two expected speed-ups.

Run::

    bmojo bench ops                                  # L = 256, 1024, 4096
    bmojo bench ops --quick                          # smoke test, a few seconds
    bmojo bench ops --lengths 2048 --repeats 3 --json
    python -m bmojo.bench.ops --quick                # the same, without the bmojo entry point
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from bmojo.bench.common import machine_info, parse_int_list, require_at_least, resolve_device, timed
from bmojo.ops.attention import union_attention_blocks, union_attention_chunked, union_attention_reference
from bmojo.ops.conv import causal_depthwise_conv1d, causal_depthwise_conv1d_reference
from bmojo.ops.ssd import SSD_CHUNK_SIZE, ssd_chunked, ssd_sequential

SSD_HEADS, SSD_HEAD_DIM, SSD_GROUPS, SSD_STATE, SSD_CHUNK = 8, 64, 1, 64, 64
ATTN_HEADS, ATTN_KV_HEADS, ATTN_HEAD_DIM = 8, 4, 64
WINDOW, FADING_SPAN, ATTN_CHUNK, MEMORY_SLOTS = 256, 256, 256, 64
# The Triton SSD's rows: the models' chunk (the fastest on CPU) and twice it.
TRITON_SSD_CHUNKS = (SSD_CHUNK_SIZE, 2 * SSD_CHUNK_SIZE)
SHORT_WINDOW = 64  # the window of the band-mask vs blocks comparison (blocks of the same size)
CONV_WIDTH = 4  # Mamba-2's d_conv
CONV_CHANNELS = SSD_HEADS * SSD_HEAD_DIM + 2 * SSD_GROUPS * SSD_STATE  # x, B, C of the SSD case's layer

# From this length on, the sequential SSD (a Python loop, about a minute forward+backward at
# L=4096 on two cores) is timed SEQUENTIAL_LONG_REPEATS times, without warmup runs.
SEQUENTIAL_LONG_FROM = 2048
SEQUENTIAL_LONG_REPEATS = 1
# A configuration whose baseline is estimated to need more memory than this is skipped.
MEMORY_LIMIT_BYTES = 8 * 2**30
FP32_BYTES = 4

SSD_TARGET_LENGTH, SSD_TARGET_RATIO = 1024, 10.0
ATTN_TARGET_FROM = 2048
MODES = ("fwd", "fwd+bwd")


@dataclass
class Case:
    """One operation at one length: two functions taking the same keyword arguments."""

    op: str
    baseline: Callable[..., Tensor | tuple[Tensor, ...]]
    fast: Callable[..., Tensor | tuple[Tensor, ...]]
    kwargs: dict[str, object]
    baseline_peak_bytes: dict[str, int]  # estimated peak memory of the baseline, per mode


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    repeats: int


@dataclass
class Result:
    op: str
    mode: str
    length: int
    baseline: Timing | None
    fast: Timing | None
    ratio: float | None
    skipped: str | None = None


def ssd_case(batch: int, length: int) -> Case:
    """SSD inputs of a Mamba-2 layer: dt log-uniform in [1e-3, 0.1], A uniform in [-16, -1]."""
    b, l, h, p, g, n = batch, length, SSD_HEADS, SSD_HEAD_DIM, SSD_GROUPS, SSD_STATE
    log_dt = torch.empty(b, l, h).uniform_(math.log(1e-3), math.log(0.1))
    kwargs = {
        "x": torch.randn(b, l, h, p, requires_grad=True),
        "dt": log_dt.exp().requires_grad_(),
        "A": torch.empty(h).uniform_(-16.0, -1.0).requires_grad_(),
        "B": torch.randn(b, l, g, n, requires_grad=True),
        "C": torch.randn(b, l, g, n, requires_grad=True),
        "D": torch.randn(h, requires_grad=True),
    }
    # Forward keeps two [b, h, p, n] states and the output; for backward, the sequential scan
    # keeps a few states per step.
    states_bytes = b * l * h * p * n * FP32_BYTES
    output_bytes = b * l * h * p * FP32_BYTES
    return Case(
        op=f"ssd chunk={SSD_CHUNK}",
        baseline=ssd_sequential,
        fast=functools.partial(ssd_chunked, chunk_size=SSD_CHUNK),
        kwargs=kwargs,
        baseline_peak_bytes={
            "fwd": 2 * states_bytes // l + output_bytes,
            "fwd+bwd": 4 * states_bytes,
        },
    )


def attention_case(
    batch: int, length: int, window: int | None, fading_span: int, memory_slots: int
) -> Case:
    """Union attention inputs; eidetic memory slots sit at random positions in [-1, L)."""
    b, l, h, hkv, dh = batch, length, ATTN_HEADS, ATTN_KV_HEADS, ATTN_HEAD_DIM
    q = torch.randn(b, l, h, dh, requires_grad=True)
    kwargs: dict[str, object] = {
        "q": q,
        "k": torch.randn(b, l, hkv, dh, requires_grad=True),
        "v": torch.randn(b, l, hkv, dh, requires_grad=True),
        "window": window,
        "chunk_size": ATTN_CHUNK,
    }
    keys = l
    if fading_span > 0:
        kwargs["fading_span"] = fading_span
        kwargs["kf"] = torch.randn(b, l, hkv, dh, requires_grad=True)
        kwargs["vf"] = torch.randn(b, l, hkv, dh, requires_grad=True)
        keys += l
    if memory_slots > 0:
        nq = math.ceil(l / ATTN_CHUNK)
        kwargs["mem_k"] = torch.randn(b, nq, memory_slots, hkv, dh, requires_grad=True)
        kwargs["mem_v"] = torch.randn(b, nq, memory_slots, hkv, dh, requires_grad=True)
        kwargs["mem_pos"] = torch.randint(-1, l, (b, nq, memory_slots))
        kwargs["q_mem"] = q
        keys += nq * memory_slots
    if window is None:
        op = "attn causal"
    else:
        op = f"attn W={window} F={fading_span} M={memory_slots}"
    # The dense reference holds about five [b, h, L, keys] fp32 matrices at its peak
    # (masked scores, concatenation, scaled logits, probabilities, and a gradient).
    scores_bytes = b * h * l * keys * FP32_BYTES
    return Case(
        op=op,
        baseline=union_attention_reference,
        fast=union_attention_chunked,
        kwargs=kwargs,
        baseline_peak_bytes={"fwd": 4 * scores_bytes, "fwd+bwd": 5 * scores_bytes},
    )


def window_dispatch_case(batch: int, length: int) -> Case:
    """Plain sliding-window attention, ``W = C = SHORT_WINDOW``: always in query blocks
    (baseline) against ``union_attention_chunked``'s choice."""
    case = attention_case(batch, length, SHORT_WINDOW, fading_span=0, memory_slots=0)
    case.kwargs["chunk_size"] = SHORT_WINDOW
    # Blocks hold about five [b, h, L, 2W] fp32 score tensors at their peak.
    scores_bytes = batch * ATTN_HEADS * length * 2 * SHORT_WINDOW * FP32_BYTES
    return dataclasses.replace(case, op=f"swa W={SHORT_WINDOW} dispatch", baseline=union_attention_blocks,
                               baseline_peak_bytes={"fwd": 4 * scores_bytes, "fwd+bwd": 5 * scores_bytes})


def conv_case(batch: int, length: int) -> Case:
    """The depthwise causal convolution of a Mamba-2 layer with the SSD case's sizes, over its
    ``x, B, C`` channels (``heads * p + 2 * groups * n``)."""
    channels = CONV_CHANNELS
    kwargs = {
        "x": torch.randn(batch, length, channels, requires_grad=True),
        "weight": torch.randn(channels, 1, CONV_WIDTH, requires_grad=True),
        "bias": torch.randn(channels, requires_grad=True),
    }
    # conv1d's input, padded output and their gradients: a few [b, L, channels] tensors.
    activation_bytes = batch * length * channels * FP32_BYTES
    return Case(
        op=f"conv K={CONV_WIDTH}",
        baseline=causal_depthwise_conv1d_reference,
        fast=causal_depthwise_conv1d,
        kwargs=kwargs,
        baseline_peak_bytes={"fwd": 3 * activation_bytes, "fwd+bwd": 6 * activation_bytes},
    )


SHORT_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def triton_attention_cases(batch: int, length: int, dtype: torch.dtype) -> list[Case]:
    """The attention cases with fading tokens and memory and with a plain window, in ``dtype``:
    the Triton kernels (fast) against ``union_attention_chunked`` (baseline)."""
    from bmojo.ops.attention_triton import union_attention_triton

    cases = []
    for fading_span, memory_slots in ((FADING_SPAN, MEMORY_SLOTS), (0, 0)):
        case = attention_case(batch, length, WINDOW, fading_span, memory_slots)
        kwargs = {name: value.detach().to(dtype).requires_grad_() if isinstance(value, Tensor) and
                  value.is_floating_point() else value for name, value in case.kwargs.items()}
        if "q_mem" in kwargs:
            kwargs["q_mem"] = kwargs["q"]
        # The blocks hold about five [b, h, L, 2C + W + F + M] float32 score tensors at their peak.
        keys = 2 * ATTN_CHUNK + WINDOW + fading_span + memory_slots
        scores_bytes = batch * ATTN_HEADS * length * keys * FP32_BYTES
        cases.append(Case(op=f"triton {case.op.removeprefix('attn ')} {SHORT_DTYPE_NAMES[dtype]}",
                          baseline=union_attention_chunked, fast=union_attention_triton, kwargs=kwargs,
                          baseline_peak_bytes={"fwd": 4 * scores_bytes, "fwd+bwd": 5 * scores_bytes}))
    return cases


def triton_ssd_case(batch: int, length: int, chunk: int) -> Case:
    """The SSD case with chunks of ``chunk``: the scan's Triton kernels (fast) against its PyTorch
    scan (baseline), both on the same chunks."""
    case = ssd_case(batch, length)
    # The chunked scan holds a few [b, h, L, Q] score and [b, h, L/Q, p, n] state tensors.
    chunk_bytes = batch * SSD_HEADS * (length * chunk + math.ceil(length / chunk) * SSD_HEAD_DIM * SSD_STATE
                                       ) * FP32_BYTES
    return dataclasses.replace(case, op=f"triton ssd chunk={chunk} fp32",
                               baseline=functools.partial(ssd_chunked, chunk_size=chunk),
                               fast=functools.partial(ssd_chunked, chunk_size=chunk, kernel="triton"),
                               baseline_peak_bytes={"fwd": 3 * chunk_bytes, "fwd+bwd": 6 * chunk_bytes})


def triton_status(device: torch.device) -> str | None:
    """Why the Triton kernel rows are not timed on ``device``, or None when they are."""
    if device.type != "cuda":
        return f"the Triton kernels run on CUDA, not timed on {device.type}"
    try:
        import bmojo.ops.attention_triton  # noqa: F401
        import bmojo.ops.ssd_triton  # noqa: F401
    except ImportError as err:
        return str(err)
    return None


def build_cases(batch: int, length: int, with_triton: bool = False) -> list[Case]:
    cases = [
        ssd_case(batch, length),
        attention_case(batch, length, WINDOW, FADING_SPAN, MEMORY_SLOTS),
        attention_case(batch, length, WINDOW, fading_span=0, memory_slots=0),
        attention_case(batch, length, window=None, fading_span=0, memory_slots=0),
        window_dispatch_case(batch, length),
        conv_case(batch, length),
    ]
    if with_triton:
        cases += [*triton_attention_cases(batch, length, torch.float32),
                  *triton_attention_cases(batch, length, torch.bfloat16),
                  *(triton_ssd_case(batch, length, chunk) for chunk in TRITON_SSD_CHUNKS)]
    return cases


def make_runner(fn: Callable, kwargs: dict[str, object], mode: str) -> Callable[[], None]:
    """A closure running ``fn(**kwargs)`` forward only, or forward and backward to every input
    that requires grad."""
    if mode == "fwd":

        def run_forward() -> None:
            with torch.no_grad():
                fn(**kwargs)

        return run_forward

    leaves = [t for t in kwargs.values() if isinstance(t, Tensor) and t.requires_grad]

    def run_forward_backward() -> None:
        out = fn(**kwargs)
        outputs = out if isinstance(out, tuple) else (out,)
        loss = sum(o.float().sum() for o in outputs)
        torch.autograd.grad(loss, leaves, allow_unused=True)  # a window covering L ignores kf, vf, memory

    return run_forward_backward


def elapsed_ms(run: Callable[[], None], device: torch.device) -> float:
    return timed(run, device) * 1e3


def summarize(times_ms: list[float]) -> Timing:
    return Timing(statistics.median(times_ms), min(times_ms), max(times_ms), len(times_ms))


def time_interleaved(
    baseline: Callable[[], None],
    fast: Callable[[], None],
    repeats: int,
    warmup: int,
    baseline_repeats: int,
    baseline_warmup: int,
    device: torch.device,
) -> tuple[Timing, Timing]:
    """Alternate baseline and fast runs; the baseline stops after ``baseline_repeats`` runs."""
    for i in range(warmup):
        if i < baseline_warmup:
            baseline()
        fast()
    baseline_ms, fast_ms = [], []
    for i in range(repeats):
        if i < baseline_repeats:
            baseline_ms.append(elapsed_ms(baseline, device))
        fast_ms.append(elapsed_ms(fast, device))
    return summarize(baseline_ms), summarize(fast_ms)


def measure(case: Case, mode: str, length: int, args: argparse.Namespace, device: torch.device) -> Result:
    peak = case.baseline_peak_bytes[mode]
    if peak > MEMORY_LIMIT_BYTES:
        reason = f"memory (~{peak / 2**30:.1f} GiB estimated)"
        return Result(case.op, mode, length, None, None, None, skipped=reason)
    baseline_repeats, baseline_warmup = args.repeats, args.warmup
    if case.baseline is ssd_sequential and length >= SEQUENTIAL_LONG_FROM:
        baseline_repeats, baseline_warmup = min(args.repeats, SEQUENTIAL_LONG_REPEATS), 0
    baseline, fast = time_interleaved(
        make_runner(case.baseline, case.kwargs, mode),
        make_runner(case.fast, case.kwargs, mode),
        args.repeats,
        args.warmup,
        baseline_repeats,
        baseline_warmup,
        device,
    )
    return Result(case.op, mode, length, baseline, fast, baseline.median_ms / fast.median_ms)


ROW_FORMAT = "{:<28} {:<8} {:>6}  {:>28}  {:>28}  {:>8}  {:>7}"


def format_timing(t: Timing) -> str:
    return f"{t.median_ms:.2f} [{t.min_ms:.2f}-{t.max_ms:.2f}]"


def format_row(r: Result) -> str:
    if r.skipped is not None:
        skipped = f"skipped ({r.skipped})"
        return ROW_FORMAT.format(r.op, r.mode, r.length, skipped, "", "", "")
    return ROW_FORMAT.format(
        r.op,
        r.mode,
        r.length,
        format_timing(r.baseline),
        format_timing(r.fast),
        f"{r.ratio:.2f}x",
        f"{r.baseline.repeats}/{r.fast.repeats}",
    )


def ssd_verdict(results: list[Result]) -> str:
    claim = f"chunked SSD >= {SSD_TARGET_RATIO:g}x faster than sequential at L={SSD_TARGET_LENGTH}"
    rows = [
        r
        for r in results
        if r.op.startswith("ssd") and r.length == SSD_TARGET_LENGTH and r.ratio is not None
    ]
    if not rows:
        return f"{claim}: not measured"
    met = all(r.ratio >= SSD_TARGET_RATIO for r in rows)
    ratios = ", ".join(f"{r.mode} {r.ratio:.1f}x" for r in rows)
    return f"{claim}: {'met' if met else 'NOT met'} ({ratios})"


def attention_verdict(results: list[Result]) -> str:
    claim = f"chunked attention faster than dense from L={ATTN_TARGET_FROM} on"
    rows = [
        r
        for r in results
        if r.op.startswith("attn") and r.length >= ATTN_TARGET_FROM and r.ratio is not None
    ]
    if not rows:
        return f"{claim}: not measured"
    slowest = min(rows, key=lambda r: r.ratio)
    met = slowest.ratio > 1.0
    detail = f"lowest ratio {slowest.ratio:.2f}x: {slowest.op}, {slowest.mode}, L={slowest.length}"
    return f"{claim}: {'met' if met else 'NOT met'} ({detail})"


def triton_verdict(results: list[Result]) -> str:
    """Where the Triton kernels beat the PyTorch ops: the question the GPU run answers."""
    rows = [r for r in results if r.op.startswith("triton") and r.ratio is not None]
    if not rows:
        return "triton kernels vs the PyTorch ops: not measured"
    faster = [r for r in rows if r.ratio > 1.0]
    ratios = ", ".join(f"{r.op} {r.mode} L={r.length} {r.ratio:.2f}x" for r in rows)
    return f"triton kernels faster than the PyTorch ops in {len(faster)} of {len(rows)} rows ({ratios})"


def add_ops_parser(subparsers) -> None:
    """``bmojo bench ops``: the flags of this benchmark."""
    parser = subparsers.add_parser("ops", help="fast vs reference SSD and attention ops",
                                   description=__doc__.splitlines()[0])
    add_ops_arguments(parser)
    parser.set_defaults(func=run_ops)


def add_ops_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lengths",
        default="256,1024,4096",
        help="comma-separated sequence lengths (default: %(default)s)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per configuration")
    parser.add_argument("--batch", type=int, default=1, help="batch size")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print all measurements as one JSON document on the last line",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: lengths 64,128 and 1 repeat"
    )


def run_ops(args: argparse.Namespace) -> int:
    """Run the benchmark: one row per measurement as it completes, the verdicts, and the JSON line."""
    if args.quick:
        args.lengths, args.repeats = "64,128", 1
    lengths = parse_int_list(args.lengths, "--lengths")
    require_at_least(args.repeats, 1, "--repeats")
    require_at_least(args.warmup, 0, "--warmup")
    require_at_least(args.batch, 1, "--batch")
    device = resolve_device(args.device)
    torch.manual_seed(0)
    info = machine_info(device)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
        f"{args.repeats} repeats, {args.warmup} warmup, device {device} ({info['device_name']})"
    )
    print(f"allocator: {info['allocator']}")
    print(
        f"ssd: sequential (baseline) vs chunked (fast); heads={SSD_HEADS} p={SSD_HEAD_DIM} "
        f"groups={SSD_GROUPS} n={SSD_STATE}; sequential timed with "
        f"{SEQUENTIAL_LONG_REPEATS} repeat(s), no warmup, from L={SEQUENTIAL_LONG_FROM}"
    )
    print(
        f"attn: reference (baseline) vs chunked (fast); heads={ATTN_HEADS} "
        f"kv_heads={ATTN_KV_HEADS} dh={ATTN_HEAD_DIM} chunk={ATTN_CHUNK}; W window, "
        f"F fading span, M memory slots per chunk"
    )
    print(f"conv: F.conv1d, groups = channels (baseline) vs shifted multiply-adds (fast); "
          f"channels={CONV_CHANNELS}")
    no_triton = triton_status(device)
    print("triton: " + (f"not timed ({no_triton})" if no_triton else
                        "the PyTorch ops (baseline) vs the Triton kernels (fast): union_attention_chunked at "
                        "the attn shapes, ssd_chunked's scan at the ssd shape"))
    print("times in ms: median [min-max]; ratio = baseline median / fast median\n")
    print(ROW_FORMAT.format("op", "mode", "L", "baseline ms", "fast ms", "ratio", "repeats"))
    results = []
    for length in lengths:
        with torch.device(device):
            cases = build_cases(args.batch, length, with_triton=no_triton is None)
        for case in cases:
            for mode in MODES:
                result = measure(case, mode, length, args, device)
                results.append(result)
                print(format_row(result), flush=True)
    verdicts = [ssd_verdict(results), attention_verdict(results)] + ([] if no_triton else [triton_verdict(results)])
    print()
    for verdict in verdicts:
        print(verdict)
    if args.json:
        config = {"lengths": lengths, "repeats": args.repeats, "warmup": args.warmup, "batch": args.batch,
                  "quick": args.quick, **info}
        document = {
            "config": config,
            "results": [asdict(r) for r in results],
            "verdicts": verdicts,
        }
        print(json.dumps(document))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_ops_arguments(parser)
    return run_ops(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
