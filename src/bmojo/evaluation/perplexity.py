"""Perplexity of a language model at several context lengths (length generalisation).

A token stream is cut into consecutive windows of ``context`` tokens; every token of a
window is predicted from the tokens before it *in that window*, so the perplexity at
length ``L`` averages over positions ``0 .. L-1`` of windows of length ``L``. Windows are
run in batches whose total size is bounded (``max_batch_tokens``), so memory stays bounded
by the longest window, not by the stream. Past ``parallel_tokens`` positions a window is
streamed through the decoding cache (DESIGN.md §6: the first ``parallel_tokens`` are a
parallel prefill, every later token one recurrent step), so the activations of a long window
never exist at once: memory is the cache's (fixed for every architecture but full attention),
and the result is the parallel one up to floating-point rounding (the invariant that the
parallel and recurrent paths agree).
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
    """Summed next-token loss over ``windows [b, context + 1]``: the first ``parallel_tokens``
    inputs in one forward, the rest one decoding step each (all of them in parallel if None)."""
    inputs, targets = windows[:, :-1], windows[:, 1:]  # [b, context] each
    if parallel_tokens is None or inputs.shape[1] <= parallel_tokens:
        logits = model(inputs).logits  # [b, context, V]
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
    cache = model.new_cache(inputs.shape[0], max_seq_len=inputs.shape[1])
    logits = model(inputs[:, :parallel_tokens], cache).logits  # [b, parallel_tokens, V]
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets[:, :parallel_tokens].flatten(), reduction="sum")
    for t in range(parallel_tokens, inputs.shape[1]):
        step_logits = model.step(inputs[:, t], cache)  # [b, V]
        nll = nll + F.cross_entropy(step_logits.float(), targets[:, t], reduction="sum")
    return nll


@torch.no_grad()
def perplexity_at(model: LanguageModel, stream: Tensor | np.ndarray, context: int, max_tokens: int | None = None,
                  max_batch_tokens: int = 65536, precision: str = "fp32",
                  parallel_tokens: int | None = None) -> PerplexityResult:
    """Perplexity on ``stream [N]`` (token ids: a tensor, or an array such as the memory map
    of a token shard, read one batch of windows at a time) with windows of ``context + 1``
    tokens (the ``context`` inputs and their next tokens), at most ``max_tokens`` predicted.
    Windows longer than ``parallel_tokens`` are streamed past it (module docstring)."""
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
