"""The decoding caches' key/value buffers (DESIGN.md §7): a ring keeps the last ``S`` positions
at slot ``position mod S``; a growable buffer keeps all. Checked against a dict of what each
position was last written with, across writes that fit in the slots left, wrap around, or
exceed the ring."""

from __future__ import annotations

import pytest
import torch

from bmojo.layers.kv_buffer import KVBuffer


def _written(start: int, n: int) -> torch.Tensor:
    """Keys whose every entry is its position: ``[1, n, 1, 2]``."""
    return torch.arange(start, start + n, dtype=torch.float32)[None, :, None, None].expand(1, n, 1, 2)


@pytest.mark.parametrize("growable", [False, True])
def test_buffer_holds_the_last_positions_at_their_slots(growable):
    buffer = KVBuffer.empty(1, 4, 1, 2, growable, "cpu", torch.float32)
    expected: dict[int, int] = {}  # slot -> position
    start = 0
    for n in (2, 1, 0, 3, 1, 6, 2, 1):  # fits, fits, nothing, wraps, fits, exceeds the ring, ...
        buffer.write(_written(start, n), -_written(start, n), start)
        start += n
        slots = buffer.pos.shape[0]
        for position in range(max(0, start - slots), start):
            expected[position % slots] = position
        held = {slot: int(position) for slot, position in enumerate(buffer.pos) if position >= 0}
        assert held == expected, (n, start)
        for slot, position in held.items():
            assert torch.equal(buffer.k[0, slot], torch.full((1, 2), float(position)))
            assert torch.equal(buffer.v[0, slot], torch.full((1, 2), -float(position)))
    assert (buffer.pos.shape[0] >= start) == growable


def test_empty_write_to_an_empty_growable_buffer():
    buffer = KVBuffer.empty(1, 0, 1, 2, True, "cpu", torch.float32)
    buffer.write(_written(0, 0), _written(0, 0), 0)
    assert buffer.pos.shape == (0,)
    buffer.write(_written(0, 3), _written(0, 3), 0)
    assert buffer.pos.tolist() == [0, 1, 2]
