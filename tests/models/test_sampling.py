import pytest
import torch

from bmojo.models.sampling import sample_next_token


def test_greedy_cases_pick_the_argmax():
    logits = torch.randn(4, 50)
    best = logits.argmax(-1)
    assert torch.equal(sample_next_token(logits, temperature=0.0), best)
    assert torch.equal(sample_next_token(logits, top_k=1), best)
    assert torch.equal(sample_next_token(logits, top_p=1e-6), best)


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, -1.0, -2.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next_token(logits, top_k=2, generator=g).tolist()) == {0, 1}
    probs = torch.softmax(logits[0], -1)
    # top_p just above p(0) keeps tokens 0 and 1 only
    kept = sample_next_token(logits, top_p=float(probs[0]) + 1e-3, generator=g)
    assert set(kept.tolist()) == {0, 1}


def test_temperature_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).repeat(20000, 1)
    draws = sample_next_token(logits, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=3).float() / draws.numel()
    torch.testing.assert_close(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.02, rtol=0)


@pytest.mark.parametrize("kwargs", [dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)])
def test_invalid_sampling_arguments(kwargs):
    with pytest.raises(ValueError):
        sample_next_token(torch.randn(1, 5), **kwargs)
