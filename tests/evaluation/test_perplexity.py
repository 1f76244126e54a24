"""Perplexity by context length (bmojo.evaluation.perplexity)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bmojo import LanguageModel, ModelConfig
from bmojo.evaluation.perplexity import perplexity_at, plot_perplexity

V = 40


def tiny_model(arch="bmojo", seed=0):
    torch.manual_seed(seed)
    config = ModelConfig.preset(arch, vocab_size=V, d_model=32, n_layers=2, n_heads=2, window=4, fading_span=4,
                                chunk_size=4, eidetic_per_chunk=2, eidetic_capacity=4, d_state=8, ssm_headdim=16,
                                mlp_ratio=0.0, tie_embeddings=False)
    return LanguageModel(config).eval()


def stream(n=300, seed=1):
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed))


def test_a_model_without_preference_has_the_vocabulary_as_perplexity():
    model = tiny_model()
    torch.nn.init.zeros_(model.lm_head.weight)  # every token equally likely
    result = perplexity_at(model, stream(), 16)
    assert result.perplexity == pytest.approx(V, rel=1e-5)
    assert result.tokens == (300 - 1) // 16 * 16


@pytest.mark.parametrize("arch", ["bmojo", "transformer"])
def test_each_token_is_scored_from_its_own_window_prefix(arch):
    """Brute force: the loss of window position t is that of the model run on the window's
    first t + 1 tokens alone."""
    model = tiny_model(arch)
    tokens = stream(2 * 12 + 1)
    nll = []
    with torch.no_grad():
        for w in range(2):
            window = tokens[w * 12: w * 12 + 13]
            for t in range(12):
                logits = model(window[None, : t + 1]).logits[0, -1]
                nll.append(F.cross_entropy(logits, window[t + 1]).item())
    result = perplexity_at(model, tokens, 12)
    assert result.tokens == 24
    assert result.loss == pytest.approx(sum(nll) / len(nll), rel=1e-4)


def test_batching_and_memory_maps_do_not_change_the_result(tmp_path):
    model = tiny_model()
    tokens = stream(400)
    whole = perplexity_at(model, tokens, 20)
    in_small_batches = perplexity_at(model, tokens, 20, max_batch_tokens=40)
    path = tmp_path / "val.bin"
    tokens.numpy().astype(np.uint16).tofile(path)
    mapped = perplexity_at(model, np.memmap(path, dtype=np.uint16, mode="r"), 20)
    assert in_small_batches.loss == pytest.approx(whole.loss, rel=1e-5)
    assert mapped.loss == pytest.approx(whole.loss, rel=1e-6) and mapped.tokens == whole.tokens


@pytest.mark.parametrize("arch", ["bmojo", "transformer", "swa", "mamba2", "hybrid", "bmojo-f"])
@pytest.mark.parametrize("parallel_tokens", [1, 7, 16])
def test_a_window_in_pieces_through_the_cache_gives_the_parallel_result(arch, parallel_tokens):
    """A window of 30 read in pieces crosses several chunks, the window and the fading span,
    and fills the eidetic memory."""
    model = tiny_model(arch)
    tokens = stream(3 * 30 + 1)
    parallel = perplexity_at(model, tokens, 30)
    in_pieces = perplexity_at(model, tokens, 30, parallel_tokens=parallel_tokens)
    assert in_pieces.tokens == parallel.tokens == 90
    assert in_pieces.loss == pytest.approx(parallel.loss, rel=1e-5)


def test_a_long_window_is_read_in_pieces_of_parallel_tokens(monkeypatch):
    model = tiny_model()
    pieces = []
    original_forward = model.forward

    def counted_forward(tokens, cache=None):
        pieces.append((tokens.shape[1], None if cache is None else cache.position))
        return original_forward(tokens, cache)

    monkeypatch.setattr(model, "forward", counted_forward)
    perplexity_at(model, stream(2 * 20 + 1), 20, parallel_tokens=8)
    assert pieces == [(8, 0), (8, 8), (4, 16)]  # both windows in one batch: three pieces, the cache continued
    pieces.clear()
    perplexity_at(model, stream(2 * 20 + 1), 20, parallel_tokens=20)
    assert pieces == [(20, None)]


def test_max_tokens_and_errors():
    model = tiny_model()
    assert perplexity_at(model, stream(), 10, max_tokens=50).tokens == 50
    with pytest.raises(ValueError, match="too few for one window"):
        perplexity_at(model, stream(10), 16)
    with pytest.raises(ValueError, match="context length must be >= 1"):
        perplexity_at(model, stream(), 0)
    with pytest.raises(ValueError, match="parallel_tokens must be >= 1"):
        perplexity_at(model, stream(), 10, parallel_tokens=0)


def test_plot(tmp_path):
    model = tiny_model()
    curves = {"a": [perplexity_at(model, stream(), n) for n in (8, 16, 32)]}
    plot_perplexity(curves, tmp_path / "ppl.png", {"a": 16})
    assert (tmp_path / "ppl.png").read_bytes()[:4] == b"\x89PNG"
    assert all(math.isfinite(r.perplexity) for r in curves["a"])
