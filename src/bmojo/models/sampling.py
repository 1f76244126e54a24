"""Next-token sampling: temperature, top-k and nucleus (top-p) filtering."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor


def sample_next_token(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``logits [B, V]`` -> token ids ``[B]``. ``temperature == 0`` is greedy decoding."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already cover top_p
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def stream_generate(
    model,
    tokens: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    cache=None,
    prefill_piece: int | None = None,
) -> Iterator[Tensor]:
    """Prefill ``tokens [B, L]`` once into a fixed-size cache (``cache``, empty, e.g. one with
    a disk block store; default: a fresh one), then yield each new token ``[B]`` as soon as it
    is sampled; each step costs the same whatever the context length (DESIGN.md §7).
    ``prefill_piece`` feeds the prompt in pieces of that many tokens (chunked prefill: the
    same cache and logits, with the prefill's activations bounded by the piece, not the prompt).
    ``model`` is a :class:`bmojo.models.lm.LanguageModel`."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if prefill_piece is not None and prefill_piece < 1:
        raise ValueError(f"prefill_piece must be >= 1, got {prefill_piece}")
    tokens = tokens.to(model.embed.weight.device)
    cache = model.new_cache(tokens.shape[0]) if cache is None else cache
    piece = prefill_piece or tokens.shape[1]
    for start in range(0, tokens.shape[1], piece):
        logits = model(tokens[:, start:start + piece], cache).logits[:, -1]  # [B, V]
    generator = None
    if seed is not None:
        generator = torch.Generator(device=tokens.device).manual_seed(seed)
    for i in range(max_new_tokens):
        token = sample_next_token(logits, temperature, top_k, top_p, generator)
        yield token
        if i + 1 < max_new_tokens:
            logits = model.step(token, cache)
