"""Perplexity of a language model at several context lengths (length generalisation).

A token stream is cut into consecutive windows of ``context`` tokens; every token of a
window is predicted from the tokens before it *in that window*, so the perplexity at
length ``L`` averages over positions ``0 .. L-1`` of windows of length ``L``. Windows are
run in batches whose total size is bounded (``max_batch_tokens``), so memory stays bounded
by the longest window, not by the stream. A window longer than ``parallel_tokens`` is read
in pieces of ``parallel_tokens`` positions through the decoding cache (chunked prefill,
DESIGN.md §7: each piece is one parallel forward that continues the cache the previous
pieces left), so the activations of a long window never exist at once: memory is one
piece's plus the cache's (fixed for every architecture but full attention), and the result
is the parallel one up to floating-point rounding (invariant §8.3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bmojo.models.lm import LanguageModel
from bmojo.training.precision import resolve_precision


@dataclass
class PerplexityResult:
    context: int
    tokens: int  # predicted tokens the average runs over
    loss: float  # mean negative log-likelihood per token (nats)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


def _window_nll(model: LanguageModel, windows: Tensor, parallel_tokens: int | None) -> Tensor:
    """Summed next-token loss over ``windows [b, context + 1]``: in one forward, or (longer
    than ``parallel_tokens``) in pieces of ``parallel_tokens`` inputs through the cache."""
    inputs, targets = windows[:, :-1], windows[:, 1:]  # [b, context] each
    if parallel_tokens is None or inputs.shape[1] <= parallel_tokens:
        logits = model(inputs).logits  # [b, context, V]
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
    cache = model.new_cache(inputs.shape[0], max_seq_len=inputs.shape[1])
    nll = torch.zeros((), device=inputs.device)
    for start in range(0, inputs.shape[1], parallel_tokens):
        piece = slice(start, start + parallel_tokens)
        logits = model(inputs[:, piece], cache).logits  # [b, parallel_tokens, V]
        nll = nll + F.cross_entropy(logits.float().flatten(0, 1), targets[:, piece].flatten(), reduction="sum")
    return nll


@torch.no_grad()
def perplexity_at(model: LanguageModel, stream: Tensor | np.ndarray, context: int, max_tokens: int | None = None,
                  max_batch_tokens: int = 65536, precision: str = "fp32",
                  parallel_tokens: int | None = None) -> PerplexityResult:
    """Perplexity on ``stream [N]`` (token ids: a tensor, or an array such as the memory map
    of a token shard, read one batch of windows at a time) with windows of ``context + 1``
    tokens (the ``context`` inputs and their next tokens), at most ``max_tokens`` predicted.
    Windows longer than ``parallel_tokens`` are read in pieces of it (module docstring)."""
    if context < 1:
        raise ValueError(f"context length must be >= 1, got {context}")
    if parallel_tokens is not None and parallel_tokens < 1:
        raise ValueError(f"parallel_tokens must be >= 1, got {parallel_tokens}")
    num_windows = (len(stream) - 1) // context
    if max_tokens is not None:
        num_windows = min(num_windows, max(1, max_tokens // context))
    if num_windows < 1:
        raise ValueError(f"{len(stream):,} tokens are too few for one window of {context + 1}")
    device = next(model.parameters()).device
    precision, _ = resolve_precision(precision, device)
    model.eval()
    per_batch = max(1, max_batch_tokens // context)
    total_nll, total_tokens = 0.0, 0
    for first in range(0, num_windows, per_batch):
        count = min(per_batch, num_windows - first)
        segment = stream[first * context: (first + count) * context + 1]  # consecutive windows share one token
        segment = torch.as_tensor(np.asarray(segment, dtype=np.int64) if isinstance(segment, np.ndarray)
                                  else segment.long())
        windows = segment.unfold(0, context + 1, context).to(device)  # [b, context + 1]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            total_nll += _window_nll(model, windows, parallel_tokens).item()
        total_tokens += count * context
    return PerplexityResult(context, total_tokens, total_nll / total_tokens)


def plot_perplexity(curves: dict[str, list[PerplexityResult]], path: str | Path,
                    train_lengths: dict[str, int] | None = None) -> None:
    """Perplexity against context length (log-2 x axis), one line per checkpoint; each
    checkpoint's training length marked by a dotted vertical line of its colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, results in curves.items():
        line, = ax.plot([r.context for r in results], [r.perplexity for r in results], marker="o", label=name)
        if train_lengths and name in train_lengths:
            ax.axvline(train_lengths[name], color=line.get_color(), linestyle=":", alpha=0.7)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens); dotted: training length")
    ax.set_ylabel("perplexity")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
