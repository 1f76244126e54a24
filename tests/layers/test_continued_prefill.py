"""Chunked prefill (DESIGN.md §7, §8.3): a sequence fed to a mixer in pieces, each continuing
from the cache the previous ones left (``forward(x, cache, start)``), gives the outputs of
one parallel pass over the whole sequence, and leaves the cache a token-by-token decode
leaves: decoding after it continues identically."""

from __future__ import annotations

import pytest
import torch
from test_bmojo_mixer import BATCH, D_MODEL, _assert_same_memory, _selection_kwargs, make_input, make_mixer
from test_bmojo_storage import make_storage_mixer

from bmojo.layers import Attention, BMojoMixer, Mamba2Mixer

L = 50
# Piece boundaries: inside chunks and on them (C = 4), pieces shorter than the window (W = 4)
# and one token long, a first piece shorter than W + F, and long pieces past W + F + M.
SCHEDULES = {
    "unaligned": (7, 8, 21, 50),
    "small": (1, 2, 3, 5, 30, 31, 50),
    "aligned": (4, 28, 50),
    "two": (37, 50),
}


def _pieces(mixer, x: torch.Tensor, ends: tuple[int, ...], cache) -> torch.Tensor:
    outs, start = [], 0
    for end in ends:
        outs.append(mixer(x[:, start:end], cache, start))
        start = end
    return torch.cat(outs, 1)


def _step(mixer, x: torch.Tensor, cache, t: int) -> torch.Tensor:
    return mixer.step(x[:, t], cache) if isinstance(mixer, Mamba2Mixer) else mixer.step(x[:, t], cache, t)


def _new_cache(mixer):
    # a full-attention buffer sized for 8 positions, so that the pieces make it grow
    return mixer.new_cache(BATCH, 8) if isinstance(mixer, Attention) else mixer.new_cache(BATCH)


def _check(mixer, x: torch.Tensor, ends: tuple[int, ...], atol: float = 1e-5) -> None:
    """Pieces up to ``ends[-1]`` then decoding to the end equal the whole parallel pass; the
    cache after the pieces equals the one decoding every token leaves."""
    length = x.shape[1]
    split = ends[-1] - 9  # the pieces stop 9 tokens early; decoding does the rest
    ends = tuple(e for e in ends[:-1] if e < split) + (split,)
    with torch.no_grad():
        full = mixer(x)
        cache = _new_cache(mixer)
        head = _pieces(mixer, x, ends, cache)
        decoded = _new_cache(mixer)
        for t in range(split):
            _step(mixer, x, decoded, t)
        if isinstance(mixer, BMojoMixer) and mixer.has_memory:
            _assert_same_memory(cache, decoded)
            torch.testing.assert_close(cache.cand_score, decoded.cand_score, atol=1e-5, rtol=1e-5)
        tail = torch.stack([_step(mixer, x, cache, t) for t in range(split, length)], 1)
    torch.testing.assert_close(head, full[:, :split], atol=atol, rtol=atol)
    torch.testing.assert_close(tail, full[:, split:], atol=atol, rtol=atol)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("d_conv", [1, 4])
def test_mamba2(schedule: str, d_conv: int) -> None:
    torch.manual_seed(0)
    mixer = Mamba2Mixer(D_MODEL, d_state=8, d_conv=d_conv, headdim=16, chunk_size=8).eval()
    _check(mixer, make_input(L, seed=1), SCHEDULES[schedule])


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("window", [None, 1, 4, 9])
def test_attention(schedule: str, window: int | None) -> None:
    torch.manual_seed(2)
    mixer = Attention(D_MODEL, 4, 2, window=window, qk_norm=True, block_size=4).eval()
    _check(mixer, make_input(L, seed=3), SCHEDULES[schedule])


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("selection", ["topk", "topk+tau", "random", "recent"])
@pytest.mark.parametrize("rope", ["none", "absolute", "window_edge"])
@pytest.mark.parametrize("policy", ["fifo", "score"])
def test_bmojo(policy: str, rope: str, selection: str, schedule: str) -> None:
    x = make_input(L, seed=4)

    def factory(**kw):
        return make_mixer(seed=5, policy=policy, rope=rope, **kw)

    _check(factory(**_selection_kwargs(selection, factory, x)), x, SCHEDULES[schedule])


@pytest.mark.parametrize(("fading_span", "capacity", "window", "chunk"),
                         [(0, 0, 4, 4), (3, 0, 4, 4), (0, 4, 4, 4), (3, 4, 9, 4), (3, 6, 4, 6), (2, 4, 1, 4)])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_bmojo_other_geometries(fading_span: int, capacity: int, window: int, chunk: int, schedule: str) -> None:
    mixer = make_mixer(seed=6, fading_span=fading_span, capacity=capacity, window=window, chunk_size=chunk,
                       k=2, policy="fifo")
    _check(mixer, make_input(L, seed=7), SCHEDULES[schedule])


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize(("r", "block", "capacity", "budget", "overflow", "source"),
                         [(2, 3, 4, 0, "error", "raw"), (3, 2, 0, 0, "error", "raw"), (2, 4, 4, 0, "error", "raw"),
                          (2, 3, 4, 4, "evict", "raw"), (2, 3, 4, 0, "error", "evicted"),
                          (1, 2, 6, 3, "evict", "evicted")])
def test_bmojo_with_storage(r: int, block: int, capacity: int, budget: int, overflow: str, source: str,
                            schedule: str) -> None:
    mixer = make_storage_mixer(seed=8, r=r, block=block, capacity=capacity, budget_blocks=budget,
                               overflow=overflow, rope="absolute", source=source)
    _check(mixer, make_input(61, seed=9), SCHEDULES[schedule] + (61,))


def test_bmojo_prefill_from_zero_empties_a_used_cache() -> None:
    """``start = 0`` is a new sequence: nothing of what the cache held before is seen."""
    mixer = make_mixer(seed=10)
    x = make_input(L, seed=11)
    with torch.no_grad():
        cache = mixer.new_cache(BATCH)
        mixer(make_input(30, seed=12), cache)
        again = _pieces(mixer, x, (13, 29), cache)
        fresh = _pieces(mixer, x, (13, 29), mixer.new_cache(BATCH))
    torch.testing.assert_close(again, fresh, atol=0, rtol=0)


def test_gradients_reach_the_new_tokens() -> None:
    """A continued piece is differentiable in its own inputs, and equal to the whole pass's."""
    mixer = make_mixer(seed=13)
    x = make_input(L, seed=14).requires_grad_(True)
    g = torch.randn(BATCH, L - 21, D_MODEL, generator=torch.Generator().manual_seed(15))
    (mixer(x)[:, 21:] * g).sum().backward()
    expected = x.grad[:, 21:].clone()
    piece = x.detach()[:, 21:].clone().requires_grad_(True)
    cache = mixer.new_cache(BATCH)
    with torch.no_grad():
        mixer(x[:, :21], cache)
    (mixer(piece, cache, 21) * g).sum().backward()
    torch.testing.assert_close(piece.grad, expected, atol=1e-5, rtol=1e-5)
    assert x.grad[:, :21].abs().max() > 0  # the whole pass also reaches the cached tokens
