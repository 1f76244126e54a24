"""What the benchmarks share: parsing and checking flags, the device, the models compared at
matched parameters, interleaved timing, medians and spreads, progress bars, plots and the
JSON line.

Timing discipline: every measurement is a runner, a function of no arguments returning what it
measured; :func:`run_interleaved` calls, for each repetition, every runner once in turn, so
that machine noise (another process, thermal throttling) hits every architecture alike.
"""

from __future__ import annotations

import functools
import json
import statistics
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm import tqdm

from bmojo import allocator
from bmojo.config import LM_SIZES, PRESETS, ModelConfig
from bmojo.data.tokenizer import BYTE_VOCAB_SIZE
from bmojo.device import device_or_default
from bmojo.models.sizing import matched_model, param_count

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)

DEFAULT_SIZE = "laptop"
DEFAULT_VOCAB = BYTE_VOCAB_SIZE  # the byte tokenizer's: 256 bytes and <|endoftext|>
REFERENCE_ARCH = "transformer"  # ratios are to this architecture
# --quick: shapes small enough that every architecture runs a step in milliseconds on a CPU.
QUICK_SHAPES: dict[str, Any] = {
    "d_model": 32, "n_layers": 2, "n_heads": 2, "window": 16, "fading_span": 16, "chunk_size": 16,
    "eidetic_per_chunk": 2, "eidetic_capacity": 8, "d_state": 8, "ssm_headdim": 16, "mlp_ratio": 2.0,
}
# ModelConfig fields that `bench train` and `bench decode` can override, as flags --d-model etc.:
# the smallest value each takes (qkv_conv 0: no convolution over q, k, v), and a note for its help.
SHAPE_FLAGS = {"d_model": (1, ""), "n_layers": (1, ""), "n_heads": (1, ""), "window": (1, ""),
               "qkv_conv": (0, "; B'MOJO's F and B layers only: the other archs get the widths matching the "
                               "resulting parameter count")}


@dataclass
class Spread:
    """Median and range of repeated measurements."""

    median: float
    min: float
    max: float
    repeats: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        values = list(values)
        if not values:
            raise ValueError("no measurements to summarise")
        return cls(statistics.median(values), min(values), max(values), len(values))

    def scaled(self, factor: float) -> Spread:
        """The same measurements times ``factor`` (> 0)."""
        return Spread(self.median * factor, self.min * factor, self.max * factor, self.repeats)

    def inverse(self, numerator: float) -> Spread:
        """``numerator / value`` of each measurement: a time spread becomes a rate spread (min and max swap)."""
        return Spread(numerator / self.median, numerator / self.max, numerator / self.min, self.repeats)

    def format(self, digits: int = 2) -> str:
        return f"{self.median:.{digits}f} [{self.min:.{digits}f}-{self.max:.{digits}f}]"


# ---------------------------------------------------------------------------------------------- flags


def parse_int_list(text: str, flag: str, minimum: int = 1) -> list[int]:
    """``"512,1024"`` -> ``[512, 1024]``; ``ValueError`` naming ``flag`` for anything else (a value
    repeated included: a sweep measures each point once)."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if any(v < minimum for v in values):
        raise ValueError(f"{flag}: every value must be >= {minimum}, got {text!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"{flag}: each value once, got {text!r}")
    return values


def parse_choices(text: str, flag: str, choices: Iterable[str]) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]``, each one of ``choices``; ``ValueError`` naming the first unknown one."""
    choices = list(choices)
    values = [part.strip() for part in text.split(",")]
    for value in values:
        if value not in choices:
            raise ValueError(f"{flag}: unknown value {value!r}; choose from {','.join(choices)}")
    if len(set(values)) != len(values):
        raise ValueError(f"{flag}: {text!r} names a value twice")
    return values


def require_at_least(value: int, minimum: int, flag: str) -> int:
    if value < minimum:
        raise ValueError(f"{flag} must be >= {minimum}, got {value}")
    return value


def resolve_device(name: str | None) -> torch.device:
    """``--device``: ``None`` is CUDA when available, else the CPU. Only CPU and CUDA devices are measured."""
    if name is None:
        return torch.device(device_or_default(None))
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: {name!r} is not a torch device") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: {name!r}: the benchmarks measure cpu and cuda devices only")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: {name!r} requested but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device: {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def add_common_arguments(parser, default_repeats: int) -> None:
    """Flags of `bench train` and `bench decode`: architectures, shapes, timing, output."""
    parser.add_argument("--archs", default=",".join(PRESETS),
                        help="comma-separated architectures (default: %(default)s); ratios are to transformer")
    parser.add_argument("--size", default=None,
                        help=f"B'MOJO shapes from LM_SIZES, one of {','.join(LM_SIZES)} (default: {DEFAULT_SIZE}); "
                             "the other architectures get the width matching its parameter count")
    parser.add_argument("--vocab", type=int, default=DEFAULT_VOCAB, help="vocabulary size (default: %(default)s)")
    for field, (_, note) in SHAPE_FLAGS.items():
        parser.add_argument(f"--{field.replace('_', '-')}", dest=field, type=int, default=None,
                            help=f"override the size's {field} (before matching widths){note}")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timed runs per architecture (default: {default_repeats}; --quick: 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per architecture first (default: 1)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and tokens (default: 0)")
    parser.add_argument("--plot-dir", default="runs/bench", help="where the PNG plots go (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print every measurement as one JSON document on the "
                                                            "last line")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and sizes, a few seconds (a smoke test)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def model_shapes(args) -> tuple[str, dict[str, Any]]:
    """The B'MOJO base shapes of ``args`` (``--size``, or the tiny ``--quick`` shapes, then the shape flags)
    and their name."""
    if args.quick and args.size is not None:
        raise ValueError("--quick uses its own tiny shapes; drop --size (shape flags such as --d-model still apply)")
    if args.quick:
        name, shapes = "quick", dict(QUICK_SHAPES)
    else:
        name = args.size or DEFAULT_SIZE
        if name not in LM_SIZES:
            raise ValueError(f"--size: unknown size {name!r}; choose from {','.join(LM_SIZES)}")
        shapes = dict(LM_SIZES[name])
    for field, (minimum, _) in SHAPE_FLAGS.items():
        value = getattr(args, field)
        if value is not None:
            shapes[field] = require_at_least(value, minimum, f"--{field.replace('_', '-')}")
    return name, shapes


# ---------------------------------------------------------------------------------------------- models


def flag_or_preset(args, preset: Mapping[str, Any], name: str) -> Any:
    """The flag ``name`` as given, else its value in ``preset`` (the defaults, or the ``--quick`` ones)."""
    value = getattr(args, name)
    return preset[name] if value is None else value


def common_settings(args, preset: Mapping[str, Any]) -> dict[str, Any]:
    """The checked flags every model benchmark shares: archs, size, shapes, vocab, repeats, warmup, seed."""
    size, shapes = model_shapes(args)
    return {
        "archs": parse_choices(args.archs, "--archs", PRESETS),
        "size": size,
        "shapes": shapes,
        "vocab": args.vocab,
        "repeats": require_at_least(flag_or_preset(args, preset, "repeats"), 1, "--repeats"),
        "warmup": require_at_least(args.warmup, 0, "--warmup"),
        "seed": args.seed,
    }


@functools.lru_cache(maxsize=64)
def _matched_shapes(arch: str, base_items: tuple[tuple[str, Any], ...], vocab: int) -> tuple[tuple[str, Any], ...]:
    """Cached :func:`matched_model` (a search over widths, seconds per architecture)."""
    base = dict(base_items)
    target = param_count(ModelConfig.preset("bmojo", **base, vocab_size=vocab))
    return tuple(sorted(matched_model(arch, base, target, vocab).items()))


def matched_configs(archs: list[str], shapes: dict[str, Any], vocab: int) -> dict[str, ModelConfig]:
    """One config per architecture: B'MOJO with ``shapes``, every other architecture at the width whose
    parameter count is closest to B'MOJO's (:func:`bmojo.models.sizing.matched_model`)."""
    require_at_least(vocab, 1, "--vocab")
    try:
        ModelConfig.preset("bmojo", **shapes, vocab_size=vocab)
    except ValueError as err:
        raise ValueError(f"invalid shapes: {err}") from None
    base_items = tuple(sorted(shapes.items()))
    return {arch: ModelConfig.preset(arch, **dict(_matched_shapes(arch, base_items, vocab)), vocab_size=vocab)
            for arch in archs}


# ---------------------------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously); nothing to wait for on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds ``fn()`` takes, the device's queued work included."""
    synchronize(device)
    start = clock()
    fn()
    synchronize(device)
    return clock() - start


def run_interleaved(runners: Mapping[K, Callable[[], T]], repeats: int, warmup: int,
                    on_run: Callable[[], None] | None = None) -> dict[K, list[T]]:
    """Call every runner once per round, in turn (``a, b, c, a, b, c, ...``): ``warmup`` rounds whose
    results are dropped, then ``repeats`` rounds whose results are returned, per runner, in round order.
    ``on_run`` is called after each call (progress)."""
    results: dict[K, list[T]] = {name: [] for name in runners}
    for round_index in range(warmup + repeats):
        for name, runner in runners.items():
            value = runner()
            if round_index >= warmup:
                results[name].append(value)
            if on_run is not None:
                on_run()
    return results


def paired_ratio(numerator_s: Sequence[float], denominator_s: Sequence[float]) -> float:
    """Median over rounds of ``numerator / denominator``, each pair from the same round of
    :func:`run_interleaved`: machine drift between rounds cancels in every ratio."""
    return statistics.median(n / d for n, d in zip(numerator_s, denominator_s, strict=True))


def progress_bar(total: int, desc: str, enabled: bool) -> tqdm:
    """A tqdm bar on stderr (stdout keeps the table and the JSON line)."""
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------- output


def machine_info(device: torch.device) -> dict[str, Any]:
    """Device, torch version, CPU threads and allocator, for the header and the JSON document."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": str(device), "device_name": name, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "allocator": allocator.STATUS}


def format_bytes(n: int) -> str:
    """``1536`` -> ``"1.50 KiB"``: the largest binary unit that keeps the number >= 1."""
    for exponent, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB")):
        if abs(n) >= 2**exponent:
            return f"{n / 2**exponent:.2f} {unit}"
    return f"{n} B"


def print_json(document: dict[str, Any]) -> None:
    """The document on one line (the last line of stdout)."""
    print(json.dumps(document, default=_to_json))


def _to_json(obj: Any) -> Any:
    if isinstance(obj, Spread):
        return asdict(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def line_plot(path: Path, panels: list[tuple[str, str, dict[str, tuple[list[float], list[float]]]]],
              xlabel: str, title: str) -> None:
    """Side-by-side panels ``(title, ylabel, {label: (xs, ys)})``, log-2 x axis and log y axis, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (panel_title, ylabel, lines) in zip(axes[0], panels, strict=True):
        for label, (xs, ys) in lines.items():
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(panel_title)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
