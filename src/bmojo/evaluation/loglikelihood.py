"""Log-likelihood of continuations, on token ids: the ``loglikelihood`` request of lm-evaluation-harness."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bmojo.models.lm import LanguageModel


@torch.no_grad()
def loglikelihood(
    model: LanguageModel,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 16,
) -> list[tuple[float, bool]]:
    """For each ``(context, continuation)``: the sum of ``log p(continuation token | everything before it)``
    and whether every continuation token is the model's argmax (greedy decoding would produce it).

    Requests are scored ``batch_size`` at a time, longest first, right-padded: the model is causal, so padding
    after a sequence cannot change its scores. Both parts must hold at least one token (lm-evaluation-harness
    puts an end-of-text token before an empty context)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for i, (context, continuation) in enumerate(requests):
        if len(context) == 0 or len(continuation) == 0:
            raise ValueError(f"request {i}: context and continuation must each hold at least one token, got "
                             f"{len(context)} and {len(continuation)}")
        if not all(0 <= token < model.config.vocab_size for token in (*context, *continuation)):
            raise ValueError(f"request {i}: token ids must be in [0, {model.config.vocab_size})")
    device = model.embed.weight.device
    # the model reads every token but the last one, which it only predicts
    inputs = [list(context) + list(continuation)[:-1] for context, continuation in requests]
    order = sorted(range(len(requests)), key=lambda i: -len(inputs[i]))
    scores: dict[int, tuple[float, bool]] = {}
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        tokens = torch.zeros(len(batch), len(inputs[batch[0]]), dtype=torch.long)
        for row, i in enumerate(batch):
            tokens[row, :len(inputs[i])] = torch.tensor(inputs[i])
        logits = model(tokens.to(device)).logits
        for row, i in enumerate(batch):
            context, continuation = requests[i]
            targets = torch.tensor(list(continuation), device=device)
            predicted = logits[row, len(context) - 1:len(inputs[i])].float()  # [len(continuation), V]
            logprobs = torch.log_softmax(predicted, dim=-1)
            total = logprobs.gather(-1, targets[:, None]).sum().item()
            scores[i] = (total, bool((predicted.argmax(dim=-1) == targets).all()))
    return [scores[i] for i in range(len(requests))]
