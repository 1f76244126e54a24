"""A language model with long-term eidetic memory in storage (DESIGN.md §5, §7): decoding
equals the parallel forward, the cache stays fixed while only the store grows, and a decode
saved with its disk store resumes in a fresh process exactly where it stopped."""

from __future__ import annotations

import pytest
import torch

from bmojo import LanguageModel, ModelConfig
from bmojo.ops.storage import block_bytes, store_file_name

TINY = dict(vocab_size=37, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, window=4, fading_span=3,
            chunk_size=4, eidetic_per_chunk=2, eidetic_capacity=4, d_state=8, ssm_headdim=16, mlp_ratio=2.0,
            max_seq_len=8, layer_pattern="BF", storage_blocks=2, storage_block_size=3)
L = 57


def tiny_model(**overrides) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(ModelConfig.preset("bmojo", **{**TINY, **overrides})).eval()


def tokens(batch=2, length=L, seed=1):
    return torch.randint(0, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("on_disk", [False, True])
@pytest.mark.parametrize("prefix", [1, 10, 33])
def test_prefill_then_decode_equals_full_forward(tmp_path, on_disk, prefix):
    model = tiny_model()
    x = tokens()
    with torch.no_grad():
        full = model(x).logits
        cache = model.new_cache(2, storage_dir=tmp_path if on_disk else None)
        state_bytes = cache.nbytes()
        logits = [model(x[:, :prefix], cache).logits]
        for t in range(prefix, L):
            logits.append(model(x[:, t:t + 1], cache).logits)
    torch.testing.assert_close(torch.cat(logits, 1), full, atol=1e-4, rtol=0)
    assert cache.nbytes() == state_bytes  # the fixed-size state does not grow; the store does
    assert [s.written for s in cache.stores()] == [model.blocks[0].mixer.stored_blocks(L // 4)]
    assert cache.store_nbytes() > 0
    assert (tmp_path / store_file_name(0)).is_file() == on_disk
    assert not (tmp_path / store_file_name(1)).exists()  # the F layer has no store
    # Storage matters: the same weights without it give other logits.
    assert not torch.allclose(tiny_model(storage_blocks=0)(x).logits, full, atol=1e-4)


@pytest.mark.parametrize("on_disk", [False, True])
def test_chunked_prefill_fills_the_store_as_decoding_does(tmp_path, on_disk):
    """A prompt in pieces writes the same blocks to the store as one prefill, and the logits
    of the pieces and of the decode after them are the full forward's."""
    model = tiny_model()
    x = tokens()
    with torch.no_grad():
        full = model(x).logits
        whole = model.new_cache(2)
        model(x[:, :45], whole)
        cache = model.new_cache(2, storage_dir=tmp_path if on_disk else None)
        logits = [model(x[:, a:b], cache).logits for a, b in ((0, 6), (6, 19), (19, 20), (20, 45))]
        logits += [model(x[:, t:t + 1], cache).logits for t in range(45, L)]
    torch.testing.assert_close(torch.cat(logits, 1), full, atol=1e-4, rtol=0)
    (store,), (expected,) = cache.stores(), whole.stores()
    assert store.written == model.blocks[0].mixer.stored_blocks(L // 4) > expected.written > 0
    torch.testing.assert_close(store.summaries()[: expected.count], expected.summaries(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("on_disk", [False, True])
def test_bf16_model_stores_bf16_and_decodes_like_its_parallel_forward(tmp_path, on_disk):
    model = tiny_model().to(torch.bfloat16)
    x = tokens()
    with torch.no_grad():
        full = model(x).logits
        cache = model.new_cache(2, storage_dir=tmp_path if on_disk else None)
        logits = [model(x[:, :10], cache).logits] + [model(x[:, t:t + 1], cache).logits for t in range(10, L)]
    assert [store.dtype for store in cache.stores()] == [torch.bfloat16]
    decoded = torch.cat(logits, 1)
    assert decoded.dtype == full.dtype == torch.bfloat16
    torch.testing.assert_close(decoded.float(), full.float(), atol=2e-2, rtol=0)  # bf16 rounding, not drift


@pytest.mark.parametrize("source", ["raw", "evicted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_disk_store_resumes_after_a_restart(tmp_path, dtype, source):
    """Decode 30 tokens, save the cache next to its store files, rebuild the model and the
    cache from disk in fresh objects, decode the rest: identical to one uninterrupted decode."""
    x = tokens(length=70)
    model = tiny_model(storage_source=source).to(dtype)
    with torch.no_grad():
        cache = model.new_cache(2, storage_dir=tmp_path / "a")
        reference = [model(x[:, :12], cache).logits] + [model(x[:, t:t + 1], cache).logits for t in range(12, 70)]
        cache = model.new_cache(2, storage_dir=tmp_path / "b")
        model(x[:, :12], cache)
        for t in range(12, 30):
            model(x[:, t:t + 1], cache)
        cache.save(tmp_path / "cache.pt")
    del cache, model
    model = LanguageModel(ModelConfig.preset("bmojo", **TINY, storage_source=source)).to(dtype)  # as a process would
    model.load_state_dict(tiny_model(storage_source=source).to(dtype).state_dict())
    model.eval()
    with torch.no_grad():
        cache = model.load_cache(tmp_path / "cache.pt", storage_dir=tmp_path / "b")
        assert cache.position == 30
        resumed = [model(x[:, t:t + 1], cache).logits for t in range(30, 70)]
    torch.testing.assert_close(torch.cat(resumed, 1), torch.cat(reference, 1)[:, 30:], atol=0, rtol=0)


def test_resume_errors_are_clear(tmp_path):
    model = tiny_model()
    x = tokens(length=40)
    with torch.no_grad():
        cache = model.new_cache(2, storage_dir=tmp_path)
        model(x, cache)
        cache.save(tmp_path / "cache.pt")
        ram = model.new_cache(2)
        model(x, ram)
    with pytest.raises(ValueError, match="RAM"):
        ram.save(tmp_path / "ram.pt")
    with pytest.raises(ValueError, match="pass the storage_dir"):
        model.load_cache(tmp_path / "cache.pt")
    store = tmp_path / store_file_name(0)
    data = store.read_bytes()
    store.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{store_file_name(0)} is truncated"):
        model.load_cache(tmp_path / "cache.pt", storage_dir=tmp_path)
    store.write_bytes(data)
    with torch.no_grad():  # a store from a longer decode does not match this cache
        other = model.new_cache(2, storage_dir=tmp_path / "other")
        model(tokens(length=56), other)
    (tmp_path / "other" / store_file_name(0)).replace(store)
    with pytest.raises(ValueError, match="different decodes"):
        model.load_cache(tmp_path / "cache.pt", storage_dir=tmp_path)
    with pytest.raises(ValueError, match="no layer has storage"):
        tiny_model(storage_blocks=0).new_cache(1, storage_dir=tmp_path / "x")


def test_budget_evict_in_a_model(tmp_path):
    model = tiny_model(storage_budget_bytes=5 * block_bytes(3, 2, 8, 4), storage_overflow="evict")
    x = tokens(length=80)
    with torch.no_grad():
        full = model(x).logits
        cache = model.new_cache(2, storage_dir=tmp_path)
        logits = [model(x[:, :20], cache).logits] + [model(x[:, t:t + 1], cache).logits for t in range(20, 80)]
    torch.testing.assert_close(torch.cat(logits, 1), full, atol=1e-4, rtol=0)
    store = cache.stores()[0]
    assert store.count == 5 and store.written > 5 and store.slots == 5


def test_a_cache_of_other_shapes_does_not_load(tmp_path):
    """A cache saved by a model with another fading span (so other ring sizes) fails at load,
    naming the field, instead of decoding from slots laid out for another size."""
    x = tokens(length=20)
    with torch.no_grad():
        cache = tiny_model(storage_blocks=0, fading_span=4).new_cache(2)
        tiny_model(storage_blocks=0, fading_span=4)(x, cache)
        cache.save(tmp_path / "cache.pt")
    with pytest.raises(ValueError, match=r"layer 0\.fading\.k: \(2, 8, 2, 8\), expected shape \(2, 12, 2, 8\)"):
        tiny_model(storage_blocks=0, fading_span=8).load_cache(tmp_path / "cache.pt")
    loaded = tiny_model(storage_blocks=0, fading_span=4).load_cache(tmp_path / "cache.pt")
    assert loaded.position == 20
