from types import SimpleNamespace

import pytest
import torch

from bmojo.data.synthetic import MQARConfig, generate
from bmojo.evaluation import distance_bucket, evaluate_recall


@pytest.mark.parametrize("distance, bucket", [(1, "1-1"), (2, "2-3"), (3, "2-3"), (4, "4-7"), (100, "64-127")])
def test_distance_buckets_are_powers_of_two(distance, bucket):
    assert distance_bucket(distance) == bucket


class LabelOracle(torch.nn.Module):
    """Answers every query right, except queries whose key lies more than ``horizon`` back."""

    def __init__(self, batch, vocab, horizon):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.answers = {tuple(row.tolist()): (lab, dist) for row, lab, dist in
                        zip(batch.inputs, batch.labels, batch.distances, strict=True)}
        self.vocab, self.horizon = vocab, horizon

    def forward(self, inputs):
        logits = torch.zeros(*inputs.shape, self.vocab)
        for b, row in enumerate(inputs):
            labels, distances = self.answers[tuple(row.tolist())]
            for t in range(inputs.shape[1]):
                if labels[t] >= 0 and distances[t] <= self.horizon:
                    logits[b, t, labels[t]] = 1.0
        return SimpleNamespace(logits=logits)


def test_breakdowns_match_a_hand_count():
    batches = [generate(MQARConfig(vocab_size=64, seq_len=48, num_kv_pairs=n, power_a=1.0), 12, seed=n)
               for n in (4, 8)]
    horizon = 20
    report = evaluate_recall(LabelOracle(_cat(batches), 64, horizon), batches, batch_size=5, far_from=horizon + 1)
    distances = torch.cat([b.distances[b.labels >= 0] for b in batches])
    assert report.num_queries == distances.numel() == 12 * 4 + 12 * 8
    assert report.accuracy == pytest.approx((distances <= horizon).float().mean().item())
    assert report.far_accuracy == 0.0
    for name, acc in report.by_distance.items():
        low = int(name.split("-")[0])
        if 2 * low - 1 <= horizon:
            assert acc == 1.0
        elif low > horizon:
            assert acc == 0.0
    for pairs, batch in zip((4, 8), batches, strict=True):
        d = batch.distances[batch.labels >= 0]
        assert report.by_kv_pairs[pairs] == pytest.approx((d <= horizon).float().mean().item())
    assert "accuracy" in report.format() and "by distance" in report.format()


def _cat(batches):
    inputs = [row for b in batches for row in b.inputs]
    labels = [row for b in batches for row in b.labels]
    distances = [row for b in batches for row in b.distances]
    return SimpleNamespace(inputs=inputs, labels=labels, distances=distances)
