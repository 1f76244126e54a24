import pytest
import torch

from bmojo import LanguageModel, ModelConfig
from bmojo.evaluation.loglikelihood import loglikelihood

TINY = dict(vocab_size=37, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, window=4, fading_span=3,
            chunk_size=4, eidetic_per_chunk=2, eidetic_capacity=4, d_state=8, ssm_headdim=16, mlp_ratio=2.0)


def tiny_model(name: str) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(ModelConfig.preset(name, **TINY)).eval()


def random_requests(n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    requests = []
    for _ in range(n):
        n_context, n_continuation = (int(v) for v in torch.randint(1, 15, (2,), generator=g))
        sequence = torch.randint(0, TINY["vocab_size"], (n_context + n_continuation,), generator=g).tolist()
        requests.append((sequence[:n_context], sequence[n_context:]))
    return requests


@torch.no_grad()
def brute_force(model: LanguageModel, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """One prefix at a time: log p(token | all tokens before it), recomputed from scratch for each token."""
    total, greedy = 0.0, True
    sequence = context + continuation
    for t in range(len(context), len(sequence)):
        logits = model(torch.tensor([sequence[:t]])).logits[0, -1].double()
        total += torch.log_softmax(logits, dim=-1)[sequence[t]].item()
        greedy &= int(logits.argmax()) == sequence[t]
    return total, greedy


@pytest.mark.parametrize("name", ["bmojo", "transformer", "mamba2", "hybrid"])
def test_matches_brute_force_in_any_batching(name):
    model = tiny_model(name)
    requests = random_requests(7)
    expected = [brute_force(model, context, continuation) for context, continuation in requests]
    for batch_size in (1, 3, 16):  # right padding in a batch must not change any score
        got = loglikelihood(model, requests, batch_size=batch_size)
        assert [greedy for _, greedy in got] == [greedy for _, greedy in expected]
        torch.testing.assert_close([score for score, _ in got], [score for score, _ in expected],
                                   atol=1e-4, rtol=1e-5)


def test_greedy_flag():
    model = tiny_model("bmojo")
    context = [3, 1, 4, 1, 5, 9, 2, 6]
    greedy = model.generate(torch.tensor([context]), 5, temperature=0)[0, len(context):].tolist()
    other = greedy[:2] + [(greedy[2] + 1) % TINY["vocab_size"]] + greedy[3:]
    (greedy_score, is_greedy), (other_score, other_is_greedy) = loglikelihood(model, [(context, greedy),
                                                                                     (context, other)])
    assert is_greedy and not other_is_greedy
    assert greedy_score > other_score
    assert greedy_score < 0


def test_invalid_requests():
    model = tiny_model("swa")
    with pytest.raises(ValueError, match="request 1: context and continuation"):
        loglikelihood(model, [([1], [2]), ([], [2])])
    with pytest.raises(ValueError, match="request 0: context and continuation"):
        loglikelihood(model, [([1], [])])
    with pytest.raises(ValueError, match="batch_size"):
        loglikelihood(model, [([1], [2])], batch_size=0)
    with pytest.raises(ValueError, match=r"request 0: token ids must be in \[0, 37\)"):
        loglikelihood(model, [([1], [TINY["vocab_size"]])])
    assert loglikelihood(model, []) == []
